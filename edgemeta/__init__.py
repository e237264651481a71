"""edgemeta: few-shot image classification from meta-training to an edge device.

This module stays import-light (no torch) because `edgemeta.runtime` lives under it and must
import on a device without torch.
"""
__version__ = "0.2.0"
