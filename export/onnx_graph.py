"""torch Embedder → ONNX: export with a dynamic batch axis, full checker, shape inference, op audit,
and parity against torch on real images."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from edgemeta.runtime.errors import BundleError

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "pixels", "embedding"
PARITY_RTOL = 1e-4

# Operators the exported graphs may use: each is implemented by ONNX Runtime's CPU provider and
# listed as supported by TensorRT's ONNX parser (onnx-tensorrt, docs/operators.md, TensorRT 10.x
# branch), for the default ONNX domain only. Graphs with anything else are refused at export, so a
# bundle never fails to parse on the device. Extend only after checking both lists.
ALLOWED_OPS = frozenset({
    "Add", "ArgMax", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv",
    "DequantizeLinear", "Div", "Flatten", "Gather", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid",
    "HardSwish", "Identity", "LeakyRelu", "MatMul", "Max", "MaxPool", "Min", "Mul", "Pad", "Pow",
    "QuantizeLinear", "Reciprocal", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Sigmoid",
    "Softmax", "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze",
})


class ExportEmbedder(torch.nn.Module):
    """The Embedder, optionally followed by centering (subtract a fixed mean embedding) and L2
    normalisation, written with plain ops: SimpleShot's CL2N costs the device nothing."""

    def __init__(self, embedder: torch.nn.Module, l2_normalize: bool = False, center: np.ndarray | None = None):
        super().__init__()
        self.embedder, self.l2_normalize = embedder, l2_normalize
        self.register_buffer("center", None if center is None else torch.as_tensor(center, dtype=torch.float32)[None])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.embedder(pixels)
        if self.center is not None:
            z = z - self.center
        if self.l2_normalize:
            z = z / torch.sqrt(torch.clamp((z * z).sum(1, keepdim=True), min=1e-24))
        return z


def export_onnx(embedder: torch.nn.Module, spec, path: str | Path, l2_normalize: bool = False,
                center: np.ndarray | None = None) -> onnx.ModelProto:
    """Export in eval mode (BatchNorm folded into the convolutions by constant folding), check the
    model fully, infer shapes, audit the operators, and save. Returns the saved model."""
    module = ExportEmbedder(embedder.eval(), l2_normalize, center).eval()
    example = torch.zeros(2, spec.channels, spec.height, spec.width)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter: it targets opset 17 (what JetPack 6's TensorRT parses
        # best) and folds BatchNorm; the dynamo exporter emits opset ≥ 18.
        torch.onnx.export(module, (example,), buffer,  # type: ignore[arg-type]  # it writes to file objects too
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=OPSET, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    model = fold_constants(strip_identities(model))
    model.producer_name = "edgemeta"
    model = check_model(model)
    onnx.save(model, str(path))
    return model


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Evaluate every node whose inputs are all constants (Constant nodes, initializers) and keep its
    outputs as initializers. The TorchScript exporter leaves such subgraphs where its own folding
    gives up (a constant Pad's pads are built with ConstantOfShape, Slice with step −1, Transpose),
    and neither every runtime nor the op audit should see them."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator
    graph = model.graph
    known = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    keep, folded = [], {}
    for node in graph.node:
        if all((not name) or name in known for name in node.input) and not any(n in graph_inputs for n in node.input):
            single = onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_tensor_value_info(o, 0, None)
                                                                  for o in node.output])
            for name in node.input:
                if name:
                    single.initializer.append(numpy_helper.from_array(known[name], name))
            values = ReferenceEvaluator(onnx.helper.make_model(single, opset_imports=model.opset_import)).run(None, {})
            for name, value in zip(node.output, values):
                known[name] = folded[name] = np.asarray(value)
        else:
            keep.append(node)
    if folded:
        used = {name for node in keep for name in node.input} | {o.name for o in graph.output}
        del graph.node[:]
        graph.node.extend(keep)
        remaining = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(remaining)
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items() if k in used)
    return model


def strip_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove Identity nodes (left by the exporter) by rewiring their consumers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(keep)
    return model


def check_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.checker with full_check (includes strict shape inference), then audit the operators."""
    try:
        onnx.checker.check_model(model, full_check=True)
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BundleError(f"the ONNX model does not pass onnx.checker: {exc}") from None
    audit_ops(model)
    return model


def audit_ops(model: onnx.ModelProto) -> list[str]:
    """Refuse any node whose operator is outside ALLOWED_OPS or the default domain; returns the op types used."""
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ALLOWED_OPS:
            domain = f"{node.domain}::" if node.domain else ""
            raise BundleError(f"operator {domain}{node.op_type} (node {node.name!r}) is not supported by both "
                              "ONNX Runtime and TensorRT's ONNX parser; change the model so it is not needed")
    return sorted({n.op_type for n in model.graph.node})


def graph_io(model: onnx.ModelProto) -> tuple[str, list, str, list]:
    """Input name and shape, output name and shape (dims are ints or strings for symbolic axes)."""
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    inp, out = model.graph.input[0], model.graph.output[0]
    return inp.name, dims(inp), out.name, dims(out)


def parity(onnx_path: str | Path, reference: torch.nn.Module | str | Path, pixels: np.ndarray, batch_size: int = 64) -> dict:
    """Max abs and relative error of ONNX Runtime (CPU) on `onnx_path` against a reference on the
    same float32 NCHW pixels: the torch module it was exported from, or another ONNX graph (the
    fp32 one, for a variant)."""
    import onnxruntime as ort

    def session_of(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session = session_of(onnx_path)
    name = session.get_inputs()[0].name
    if isinstance(reference, torch.nn.Module):
        def run_reference(x):
            with torch.no_grad():
                return reference(torch.from_numpy(x)).numpy()
        described = "torch eager fp32"
    else:
        ref_session = session_of(reference)
        run_reference = lambda x: ref_session.run(None, {ref_session.get_inputs()[0].name: x})[0]  # noqa: E731
        described = f"{Path(reference).name} on onnxruntime CPU"
    max_abs, max_ref = 0.0, 0.0
    for i in range(0, len(pixels), batch_size):
        x = pixels[i:i + batch_size]
        ref = run_reference(x)
        got = session.run(None, {name: x})[0]
        for side, values in (("reference", ref), ("ONNX Runtime", got)):
            if not np.isfinite(values).all():  # max() would skip a NaN and report a perfect match
                raise BundleError(f"the model gives non-finite embeddings ({side}, images {i}–{i + len(x) - 1}); "
                                  "its weights are broken (NaN/inf) — retrain or use another checkpoint")
        max_abs = max(max_abs, float(np.abs(got - ref).max()))
        max_ref = max(max_ref, float(np.abs(ref).max()))
    return {"images": int(len(pixels)), "max_abs_error": max_abs, "max_rel_error": max_abs / max(max_ref, 1e-12),
            "reference": described, "runtime": f"onnxruntime {ort.__version__} CPU"}
