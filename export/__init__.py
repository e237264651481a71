"""edgemeta.export: checkpoint → parity-checked ONNX → INT8/FP16 → TensorRT engine → bundle.

Offline work only; the device side that reads bundles is edgemeta.runtime.
"""
from .bundle_builder import EngineOptions, ExportOptions, add_engine, export_checkpoint, wrap_onnx

__all__ = ["EngineOptions", "ExportOptions", "add_engine", "export_checkpoint", "wrap_onnx"]
