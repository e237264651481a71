"""INT8 (static, QDQ, per-channel) and FP16 variants of an fp32 ONNX embedding model.

The INT8 graph uses QuantizeLinear/DequantizeLinear pairs with symmetric signed int8 for weights
(per channel) and activations: ONNX Runtime runs it on the CPU, and TensorRT builds it with explicit
quantization (no calibrator needed on the device).
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def calibration_batches(pixels: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Float32 NCHW batches covering every calibration image once, in order; the last may be short."""
    if batch_size < 1:
        raise ValueError("batch_size must be ≥ 1")
    for i in range(0, len(pixels), batch_size):
        yield pixels[i:i + batch_size]


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_pixels: np.ndarray, input_name: str,
                  batch_size: int = 32) -> dict:
    """Static INT8 quantization calibrated on real images; returns what was done, for the manifest."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = calibration_batches(calib_pixels, batch_size)

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return {"method": "static QDQ, MinMax calibration", "weights": "int8 symmetric per-channel",
            "activations": "int8 symmetric per-tensor", "calibration_images": int(len(calib_pixels))}


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> dict:
    """A float16 copy of the graph with float32 inputs and outputs kept (casts at the edges)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    onnx.save(model, str(out_path))
    return {"method": "float16 weights and activations, float32 I/O"}
