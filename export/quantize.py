"""INT8 (static, QDQ, per-channel) and FP16 variants of an fp32 ONNX embedding model.

Two INT8 graphs, one per kind of runtime. For TensorRT: QuantizeLinear/DequantizeLinear pairs with
symmetric signed int8 weights (per channel) and activations, float biases — what TensorRT builds with
explicit quantization (no calibrator on the device). For ONNX Runtime on a CPU: unsigned asymmetric
activations with signed per-channel weights and int32 biases (U8S8), the form ORT's CPU kernels
(VNNI / AVX2 u8×s8 dot products) run fast; ORT runs the symmetric S8S8 graph 0.5–0.7× fp32 there.
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
                  batch_size: int = 8, target: str = "tensorrt") -> dict:
    """Static INT8 quantization calibrated on real images, for `target` "tensorrt" (S8S8) or "cpu"
    (U8S8, ONNX Runtime's CPU provider); returns what was done, for the manifest. The calibration
    graph keeps every activation of a batch until its min and max are taken (Lite2 at 224 px: about
    170 MB an image), so it runs in small batches; the ranges are the same for any batch size."""
    if target not in ("tensorrt", "cpu"):
        raise ValueError(f"target must be tensorrt or cpu, not {target!r}")
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = calibration_batches(calib_pixels, batch_size)

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        if target == "cpu":
            quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, extra_options={"WeightSymmetric": True})
        else:
            placement = tensorrt_qdq_nodes(prepared)
            quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_quantize=placement["nodes"],
                            # biases stay float: TensorRT's DequantizeLinear takes int8/fp8/int4 inputs only, and an
                            # int32 bias behind a DequantizeLinear will not parse (onnxruntime#17738, NVIDIA/TensorRT#3360)
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    if target == "tensorrt":
        keep_qdq_only_before(out_path, TENSORRT_QUANTIZED_OPS)
    if target == "cpu":
        return {"method": "static QDQ (U8S8), MinMax calibration", "weights": "int8 symmetric per-channel",
                "activations": "uint8 asymmetric per-tensor", "biases": "int32", "runs_on": "ONNX Runtime CPU",
                "calibration_images": int(len(calib_pixels))}
    audit_qdq(out_path)
    return {"method": "static QDQ, MinMax calibration", "weights": "int8 symmetric per-channel",
            "activations": "int8 symmetric per-tensor", "biases": "float32",
            "calibration_images": int(len(calib_pixels)), "placement": {**placement, **qdq_counts(out_path)}}


TENSORRT_QUANTIZED_OPS = ("Conv", "MatMul", "Gemm", "Add")


def keep_qdq_only_before(path: str | Path, ops: tuple[str, ...]) -> None:
    """Rewire every consumer of a dequantized activation that is not one of `ops` to the float tensor
    the QuantizeLinear took (ONNX Runtime also quantizes each quantized node's output, which puts a
    Q/DQ pair between a Conv and its ReLU), then drop the pairs nothing reads. Weight
    DequantizeLinears (of initializers) are left as they are."""
    import onnx
    model = onnx.load(str(path))
    nodes = list(model.graph.node)
    source = {n.output[0]: n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}   # q output → float input
    dequantized = {n.output[0]: source[n.input[0]] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in source}
    for n in nodes:
        if n.op_type in ops or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(n.input):
            if name in dequantized:
                n.input[i] = dequantized[name]
    outputs = {o.name for o in model.graph.output}
    while True:  # drop what nothing reads any more (DQs, then their Qs)
        read = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and n.output[0] not in read and (n.op_type == "QuantizeLinear" or n.input[0] in source)]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    onnx.save(model, str(path))


def tensorrt_qdq_nodes(model_path: Path) -> dict:
    """Where TensorRT's explicit-quantization guidance puts Q/DQ: on the inputs of Conv, MatMul and
    Gemm (weights and activations) and of residual Adds (two computed inputs), so TensorRT fuses each
    with its neighbours; the graph's input (0–255 pixels, which ONNX Runtime's defaults quantized at
    a scale of about 2) and its normalisation, and the output (the embedding, the CL2N norm) stay
    float, as do ReLU6 Clips, Pads and pooling, which the defaults quantized too. Returns the node names and, for the record, each one's
    op type (a device run's `trtexec --dumpLayerInfo` confirms the fusions against it)."""
    import onnx
    model = onnx.load(str(model_path))
    produced_by_init = {t.name for t in model.graph.initializer} | {i.name for i in model.graph.input}
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    nodes += [n for n in model.graph.node if n.op_type == "Add" and len(n.input) == 2
              and not any(i in produced_by_init for i in n.input)]
    kept = {n.name for n in nodes}
    names = [n.name for n in model.graph.node if n.name in kept]   # graph order
    ops: dict[str, int] = {}
    for n in model.graph.node:
        if n.name in kept:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"nodes": names, "quantized_ops": ops}


def qdq_counts(path: str | Path) -> dict:
    """How many QuantizeLinear and DequantizeLinear nodes a graph holds."""
    import onnx
    model = onnx.load(str(path))
    return {"quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in model.graph.node),
            "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in model.graph.node)}


def audit_qdq(path_or_model) -> None:
    """The INT8 graph is one TensorRT can build: every DequantizeLinear dequantizes int8 (an int8
    initializer, or the output of a QuantizeLinear to int8), every zero point is 0 (TensorRT's
    quantization is symmetric), and the operators pass the op audit."""
    import onnx
    from edgemeta.runtime.errors import BundleError
    from onnx import numpy_helper

    from .onnx_graph import check_model
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model))
    check_model(model)
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in tensors:
            zero = numpy_helper.to_array(tensors[node.input[2]])
            if zero.any():
                raise BundleError(f"INT8 graph: {node.op_type} {node.name!r} has a nonzero zero point; TensorRT "
                                  "takes symmetric quantization only (zero point 0)")
    int8 = onnx.TensorProto.INT8
    initializers = {t.name: t.data_type for t in model.graph.initializer}
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
                 and initializers.get(n.input[2]) == int8}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            source = node.input[0]
            if initializers.get(source, int8) != int8 or (source not in initializers and source not in quantized):
                raise BundleError(f"INT8 graph: DequantizeLinear {node.name!r} dequantizes {source!r}, which is not "
                                  "int8; TensorRT accepts only int8 inputs there")


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> dict:
    """A float16 copy of the graph with float32 inputs and outputs kept (casts at the edges)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    topological_sort(model)  # the converter appends its input casts at the end; parsers want order
    onnx.save(model, str(out_path))
    return {"method": "float16 weights and activations, float32 I/O"}


def topological_sort(model) -> None:
    """Reorder the graph's nodes so that every node comes after the nodes producing its inputs (as
    the ONNX spec and strict checkers require), keeping the original order among independent nodes."""
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        progressed = False
        for node in list(pending):
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
                pending.remove(node)
                progressed = True
        if not progressed:
            from edgemeta.runtime.errors import BundleError
            raise BundleError(f"the graph has a cycle or an input no node produces (at {pending[0].name!r})")
    del graph.node[:]
    graph.node.extend(ordered)
