"""`edgemeta freeze`: one ONNX graph = the bundle's backbone + a store's fitted head as plain layers,
for pipelines that want a single model (Triton, DeepStream's nvinfer as a secondary classifier).

The head is linear once fitted. A prototype head with euclidean distance scores
−‖x − c‖² = 2c·x − ‖c‖² − ‖x‖², and the last term is the same for every class, so the logits are
a MatMul and an Add; cosine normalises then multiplies; ridge and logistic are linear already.
The graph returns `probabilities` [N, C] (softmax), `distance` [N] (to the nearest prototype, in
the metric the runtime rejects "unknown" with) and `probabilities_known` (the probabilities gated by
the runtime's `unknown="auto"` rule: each class's limit, the negative examples). Written beside it: labels.txt, a Triton model
repository entry and a DeepStream nvinfer config. The folder is a bundle of its own (manifest,
sha256s, the class list and the store's model sha), so `edgemeta predict` and `inspect` take it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from edgemeta.runtime.backends.base import MAX_BATCH
from edgemeta.runtime.bundle import register_file, write_manifest
from edgemeta.runtime.errors import ConfigError, StoreError
from edgemeta.runtime.heads import check_flavour
from edgemeta.runtime.progress import SILENT, Progress
from onnx import TensorProto, helper, numpy_helper

from .bundle_builder import bundle_target
from .onnx_graph import check_model

PROBABILITIES, DISTANCE = "probabilities", "distance"
# probabilities × (distance ≤ the auto rejection threshold): all zero for an "unknown" input, so a
# consumer that knows only a probability threshold (DeepStream's classifier-threshold) rejects it too
KNOWN_PROBABILITIES = "probabilities_known"
# nvinfer's scaling: GPU (scaling-compute-hw=1) with filter 4 (NvBufSurfTransformInter_Algo3, Lanczos
# on the GPU), the closest to edgemeta's LANCZOS resize (runtime/preprocess.RESAMPLE)
DEEPSTREAM_SCALING_FILTER, DEEPSTREAM_SCALING_HW = 4, 1
# nvinfer's GRAY input: with scaling-compute-hw=1 (the GPU, what edgemeta writes) the frame is
# converted to GRAY8 on the GPU, full range like edgemeta's own greyscale conversion: no stretch.
# Only on the VIC (scaling-compute-hw=2) is it the NV12 frame's Y plane, limited-range luma
# (16–235), which y = s · (x − offset) with s = 255/219, offset 16 stretches to the full range.
LIMITED_RANGE_SCALE, LIMITED_RANGE_OFFSET = 255.0 / 219.0, 16.0


def freeze(bundle_dir: str | Path, store_dir: str | Path, out: str | Path, variant: str = "fp32",
           overwrite: bool = False, max_batch: int = MAX_BATCH, progress: Progress = SILENT) -> dict:
    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.store import EnrollmentStore
    if not EnrollmentStore(store_dir).exists():
        raise StoreError(f"no store at {store_dir} (no enrollment.npz there); enroll classes first")
    clf = FewShotClassifier.load(bundle_dir, store=store_dir, variant=variant, backend="onnxruntime")
    state = clf._state
    if state.head.kind not in FROZEN_HEADS:  # a head registered at run time, without its graph
        raise ConfigError(f"a frozen graph has no layers for the {state.head.kind!r} head; freeze a store fitted "
                          f"with one of {', '.join(FROZEN_HEADS)}")
    if not state.classes:
        raise StoreError(f"the store at {store_dir} has no classes to freeze")
    bundle = clf.bundle
    if clf.variant == "int8-cpu":
        # a TensorRT-parseable INT8 freeze on any machine: the S8S8 graph, never the U8S8 one the CPU
        # provider ran the store with (TensorRT takes zero points of 0 and INT8 only), the shots
        # re-embedded with it from the store's kept images
        clf, state = _reembedded_for_s8s8(clf, state, store_dir)
    model = onnx.load(str(bundle.variant_path(variant)))
    metric = state.head.rejection_metric(bundle.l2_normalized)
    names = _append_head(model, state.head, state.fitted, metric)
    model = check_model(model)
    labels = state.labels
    rule = clf.rejection_rule(state, metric)  # what predict(reject="auto") applies, into the graph
    _append_rejection_gate(model, names, rule, metric)
    model = check_model(model)
    if variant == "int8":  # what TensorRT needs of a Q/DQ graph, checked on the frozen one too
        from .quantize import audit_qdq
        audit_qdq(model)
    deepstream_skip = _deepstream_refusal(labels, variant)
    variant = clf.variant
    with bundle_target(Path(out), overwrite, (Path(bundle_dir), Path(store_dir))) as building:
        onnx.save(model, str(building / "classifier.onnx"))
        (building / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
        manifest = {k: v for k, v in bundle.manifest.items() if k not in ("files", "variants", "engines")}
        manifest.update(files={}, variants={}, engines=[])
        manifest["output"] = {"name": PROBABILITIES, "dim": len(labels), "l2_normalized": False,
                              "distance": DISTANCE, "embedding_dim": bundle.embedding_dim}
        manifest["frozen"] = {"classes": labels, "shots": [c.shots for c in state.classes],
                              "store_model_sha256": state.model_sha256, "variant": variant,
                              "head": state.head.to_dict(), "distance_metric": metric,
                              "auto": {"rule": rule.how, "limits": None if rule.limits is None else
                                       [round(float(v), 7) for v in rule.limits],
                                       "negatives": len(state.negatives)},
                              "source_bundle_sha256": bundle.model_sha256}
        register_file(building, manifest, "classifier.onnx", "frozen-classifier")
        register_file(building, manifest, "labels.txt", "labels")
        manifest["variants"]["fp32"] = {"file": "classifier.onnx", "parity": None, "frozen_from": variant}
        _write_triton(building, manifest, max_batch)
        if deepstream_skip is None:
            _write_deepstream(building, manifest, max_batch, model)
        manifest["frozen"]["deepstream"] = {"written": deepstream_skip is None, "why_not": deepstream_skip}
        write_manifest(building, manifest)
    progress.message(f"frozen: {len(labels)} classes, head {state.head.kind}, distance {metric}")
    if deepstream_skip is not None:
        progress.message(f"no DeepStream config: {deepstream_skip}")
    return manifest


def _reembedded_for_s8s8(clf, state, store_dir):
    """(a classifier on the bundle's S8S8 INT8 graph, the store's classes re-embedded with it) — or
    StoreError saying why not (no kept images)."""
    from dataclasses import replace

    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from edgemeta.runtime.classifier import fit_head
    from edgemeta.runtime.store import frozen
    missing = [c.label for c in state.classes if not c.images]
    if missing:
        raise StoreError(f"the store at {store_dir} was enrolled with the CPU's INT8 graph (U8S8), which TensorRT "
                         f"cannot parse, and class {missing[0]!r} kept no images to re-embed with the TensorRT one "
                         "(S8S8): enroll with kept images, or freeze --variant fp32 or fp16")
    bundle = clf.bundle
    backend = OnnxRuntimeBackend(bundle.variant_path("int8"), bundle.spec, bundle.embedding_dim, "cpu")
    s8 = FewShotClassifier(bundle, backend, state.head, variant="int8")
    classes, negatives = s8.reembed(state.classes, state.negatives, clf.store.image_path, keep_limits=True)
    s8._state = replace(state, variant="int8", classes=classes, negatives=negatives,
                        fitted={k: frozen(v) for k, v in fit_head(state.head, classes).items()})
    return s8, s8._state


def _deepstream_refusal(labels: list[str], variant: str) -> str | None:
    """Why DeepStream's nvinfer could not run this frozen classifier as edgemeta does, or None."""
    if variant == "int8":
        return ("an INT8 (Q/DQ) graph needs a strongly typed TensorRT build, which nvinfer's network-mode does not "
                "make (mode 0 builds it without INT8, mode 1 without a calibration file falls back to FP16); "
                "freeze the fp32 or fp16 variant for DeepStream, or serve this one with Triton or `edgemeta watch`")
    bad = [label for label in labels if ";" in label]
    if bad:
        return f"label {bad[0]!r} holds ';', which separates labels in nvinfer's label file; rename the class"
    return None


def _append_rejection_gate(model: onnx.ModelProto, names: dict, rule, metric: str) -> None:
    """A third output: the probabilities gated by the auto rejection rule (all zero for an "unknown"
    input), from ops both runtimes take. The nearest class's limit is gathered from a per-class
    vector (`rule.limits`, the runtime's); with negative examples, the distance to the nearest one
    must exceed the distance to the nearest class. Each test is clamp(margin · 1e6, 0, 1): 1 when
    the margin is over 1e-6, 0 when it is negative."""
    graph = model.graph
    nodes = []

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"gate_{output}", **attrs))
        return output

    zero, unit = _const(graph, "gate_zero", np.array(0.0, np.float32)), _const(graph, "gate_unit", np.array(1.0, np.float32))
    steep = _const(graph, "gate_steep", np.array(1e6, np.float32))

    def step(margin: str, name: str) -> str:  # 1 where margin > 1e-6, 0 where margin ≤ 0
        return node("Min", [node("Max", [node("Mul", [margin, steep], f"{name}_steep"), zero], f"{name}_low"), unit], name)

    tests = []
    if rule.limits is not None:
        nearest = node("ArgMax", [names["similarity"]], "gate_nearest", axis=1, keepdims=0)
        limit = node("Gather", [_const(graph, "gate_limits", np.asarray(rule.limits, np.float32)), nearest], "gate_limit", axis=0)
        tests.append(step(node("Sub", [limit, DISTANCE], "gate_margin"), "gate_near_class"))
    if rule.negatives is not None:
        negs = rule.negatives.astype(np.float32)
        if metric == "cosine":
            negs_unit = negs / np.maximum(np.linalg.norm(negs, axis=1, keepdims=True), 1e-12)
            cos = node("MatMul", [names["unit"], _const(graph, "gate_negatives_unit_t", negs_unit.T.copy())], "gate_neg_cos")
            d_neg = node("Sub", [unit, node("ReduceMax", [cos], "gate_neg_cos_max", axes=[1], keepdims=0)], "gate_neg_distance")
        else:
            score = node("Sub", [node("MatMul", [names["embedding"], _const(graph, "gate_negatives2_t", (2 * negs).T.copy())],
                                      "gate_neg_2xn"), _const(graph, "gate_negatives_sq", (negs * negs).sum(1))], "gate_neg_score")
            d2 = node("Sub", [names["x2"], node("ReduceMax", [score], "gate_neg_score_max", axes=[1], keepdims=0)], "gate_neg_d2")
            d_neg = node("Sqrt", [node("Max", [d2, zero], "gate_neg_d2_pos")], "gate_neg_distance")
        tests.append(step(node("Sub", [d_neg, DISTANCE], "gate_neg_margin"), "gate_far_from_negatives"))
    if not tests:  # a single one-shot class without a prior: nothing to reject against
        gate = node("Identity", [unit], "gate_all")
    else:
        gate = tests[0] if len(tests) == 1 else node("Mul", tests, "gate_both")
        gate = node("Unsqueeze", [gate, _const(graph, "gate_axis", np.array([1], np.int64))], "gate")
    graph.node.extend(nodes)
    graph.node.append(helper.make_node("Mul", [PROBABILITIES, gate], [KNOWN_PROBABILITIES], name="gate_probabilities"))
    probs = graph.output[0]
    graph.output.append(helper.make_tensor_value_info(KNOWN_PROBABILITIES, TensorProto.FLOAT,
                                                      [d.dim_param or d.dim_value for d in probs.type.tensor_type.shape.dim]))


def _const(graph, name: str, array: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def _append_head(model: onnx.ModelProto, head, fitted: dict, metric: str) -> dict:
    """The head's layers after the embedding; returns the names of the tensors the rejection gate
    reuses (embedding, its unit vector or squared norm, the per-class similarity)."""
    graph = model.graph
    emb = graph.output[0].name
    protos = fitted["prototypes"].astype(np.float32)
    nodes = []
    axis1 = _const(graph, "head_axis1", np.array([1], np.int64))

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"head_{output}", **attrs))
        return output

    if metric == "cosine":
        sq = node("ReduceSum", [node("Mul", [emb, emb], "head_xx"), axis1], "head_x2", keepdims=1)
        norm = node("Max", [node("Sqrt", [sq], "head_xnorm"), _const(graph, "head_eps", np.array(1e-12, np.float32))],
                    "head_xnorm_safe")
        unit = node("Div", [emb, norm], "head_unit")
        pn = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
        cos = node("MatMul", [unit, _const(graph, "head_protos_unit_t", pn.T.copy())], "head_cos")
        nearest = node("ReduceMax", [cos], "head_cos_max", axes=[1], keepdims=0)
        node("Sub", [_const(graph, "head_one", np.array(1.0, np.float32)), nearest], DISTANCE)
        similarity = cos
        names = {"embedding": emb, "unit": unit, "similarity": cos}
    else:
        score = node("Sub", [node("MatMul", [emb, _const(graph, "head_protos2_t", (2 * protos).T.copy())], "head_2xc"),
                             _const(graph, "head_protos_sq", (protos * protos).sum(1))], "head_score")  # 2x·c − ‖c‖²
        x2 = node("ReduceSum", [node("Mul", [emb, emb], "head_xx"), axis1], "head_x2", keepdims=0)
        d2 = node("Sub", [x2, node("ReduceMax", [score], "head_score_max", axes=[1], keepdims=0)], "head_d2")
        node("Sqrt", [node("Max", [d2, _const(graph, "head_zero", np.array(0.0, np.float32))], "head_d2_pos")], DISTANCE)
        similarity = score
        names = {"embedding": emb, "x2": x2, "similarity": score}
    logits = FROZEN_HEADS[head.kind](graph, node, emb, similarity, head, fitted)
    node("Softmax", [logits], PROBABILITIES, axis=1)
    graph.node.extend(nodes)
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    del graph.output[:]
    graph.output.extend([helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [batch, protos.shape[0]]),
                         helper.make_tensor_value_info(DISTANCE, TensorProto.FLOAT, [batch])])
    return names


# The frozen-graph flavour of each registered head (runtime.heads.HEAD_KINDS), keyed by its name:
# (graph, node, embedding, the prototype similarity, head, fitted arrays) → the logits tensor's name.
def _frozen_prototype(graph, node, emb, similarity, head, fitted) -> str:
    return node("Mul", [similarity, _const(graph, "head_scale", np.array(head.scale, np.float32))], "head_logits")


def _frozen_mahalanobis(graph, node, emb, similarity, head, fitted) -> str:  # linear in x: scale · (x Σ⁻¹μ − ½ μᵀΣ⁻¹μ)
    raw = node("MatMul", [emb, _const(graph, "head_maha_w", fitted["weights"].astype(np.float32))], "head_maha")
    shifted = node("Add", [raw, _const(graph, "head_maha_b", fitted["bias"].astype(np.float32))], "head_maha_shifted")
    return node("Mul", [shifted, _const(graph, "head_scale", np.array(head.scale, np.float32))], "head_logits")


def _frozen_ridge(graph, node, emb, similarity, head, fitted) -> str:
    raw = node("MatMul", [emb, _const(graph, "head_ridge_w", fitted["weights"].astype(np.float32))], "head_ridge")
    scaled = node("Mul", [raw, _const(graph, "head_scale", np.array(head.scale, np.float32))], "head_ridge_scaled")
    return node("Add", [scaled, _const(graph, "head_bias", np.array(head.bias, np.float32))], "head_logits")


def _frozen_logistic(graph, node, emb, similarity, head, fitted) -> str:
    raw = node("MatMul", [emb, _const(graph, "head_logistic_w", fitted["weight"].T.astype(np.float32).copy())],
               "head_logistic")
    return node("Add", [raw, _const(graph, "head_logistic_b", fitted["bias"].astype(np.float32))], "head_logits")


FROZEN_HEADS = {"prototype": _frozen_prototype, "mahalanobis": _frozen_mahalanobis, "ridge": _frozen_ridge,
                "logistic": _frozen_logistic}
check_flavour("frozen-graph (export/freeze.py, FROZEN_HEADS)", FROZEN_HEADS)


def _write_triton(folder: Path, manifest: dict, max_batch: int) -> None:
    """A Triton model repository entry: triton/frozen-classifier/{config.pbtxt, 1/model.onnx}."""
    spec = manifest["input"]
    entry = folder / "triton" / "frozen-classifier"
    (entry / "1").mkdir(parents=True)
    shutil.copyfile(folder / "classifier.onnx", entry / "1" / "model.onnx")
    channels = 3 if spec["colour"] == "RGB" else 1
    (entry / "config.pbtxt").write_text(f'''name: "frozen-classifier"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch}
input [
  {{
    name: "{spec['name']}"
    data_type: TYPE_FP32
    dims: [ {channels}, {spec['height']}, {spec['width']} ]
  }}
]
output [
  {{
    name: "{PROBABILITIES}"
    data_type: TYPE_FP32
    dims: [ {manifest['output']['dim']} ]
    label_filename: "labels.txt"
  }},
  {{
    name: "{DISTANCE}"
    data_type: TYPE_FP32
    dims: [ 1 ]
    reshape: {{ shape: [ ] }}
  }},
  {{
    name: "{KNOWN_PROBABILITIES}"
    data_type: TYPE_FP32
    dims: [ {manifest['output']['dim']} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{ }}
{_triton_accelerator(manifest["frozen"]["variant"])}''')
    shutil.copyfile(folder / "labels.txt", entry / "labels.txt")


def deepstream_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """The frozen graph with the gated probabilities as its only output. nvinfer binds every
    non-input tensor of an engine as an output layer and labels layer l with line l of its labels
    file (`output-blob-names` does not select outputs of an ONNX model): with the ungated
    probabilities first, a rejected object would still get a label."""
    only = onnx.ModelProto()
    only.CopyFrom(model)
    keep = [o for o in only.graph.output if o.name == KNOWN_PROBABILITIES]
    del only.graph.output[:]
    only.graph.output.extend(keep)
    return check_model(only)


def _triton_accelerator(variant: str) -> str:
    """An INT8 or FP16 freeze on Triton's ONNX Runtime backend: its TensorRT accelerator in that
    precision (without it the Q/DQ or float16 graph runs on the CUDA provider)."""
    mode = "INT8" if variant.startswith("int8") else "FP16" if variant == "fp16" else None
    if mode is None:
        return ""
    return f'''optimization {{
  execution_accelerators {{
    gpu_execution_accelerator : [ {{
      name : "tensorrt"
      parameters {{ key: "precision_mode" value: "{mode}" }}
    }} ]
  }}
}}
'''


def _write_deepstream(folder: Path, manifest: dict, max_batch: int, model: onnx.ModelProto) -> None:
    """A DeepStream nvinfer config for the frozen graph as a secondary classifier on a detector's
    objects. Pixels go in as 0–255 floats (the graph normalises); greyscale models get the GPU's
    full-range GRAY8 (the VIC's limited-range Y plane needs the stretch the config's comment gives);
    the resize is GPU Lanczos; the output read is
    the rejection-gated probabilities, so an "unknown" object gets no label (classifier-threshold).
    nvinfer's label file is one line per output layer, labels separated by ';'."""
    spec = manifest["input"]
    channels = 3 if spec["colour"] == "RGB" else 1
    scale, offset = (1.0, "0;0;0") if channels == 3 else (1.0, "0")   # the GPU's GRAY8 is full range
    (folder / "deepstream").mkdir()
    onnx.save(deepstream_graph(model), str(folder / "deepstream" / "classifier.onnx"))
    (folder / "deepstream" / "labels.txt").write_text(";".join(manifest["frozen"]["classes"]) + "\n")
    (folder / "deepstream" / "config_infer_secondary_classifier.txt").write_text(f"""# nvinfer config written by `edgemeta freeze` (see docs/jetson.md, DeepStream)
[property]
gpu-id=0
# the frozen graph with its gated probabilities as the only output (nvinfer labels every output layer)
onnx-file=classifier.onnx
# the engine nvinfer builds on first run and reuses after
model-engine-file=classifier.onnx_b{max_batch}_gpu0_fp32.engine
labelfile-path=labels.txt
batch-size={max_batch}
network-type=1
process-mode=2
network-mode=0
net-scale-factor={scale:.9g}
offsets={offset}
model-color-format={0 if channels == 3 else 2}
infer-dims={channels};{spec['height']};{spec['width']}
maintain-aspect-ratio=0
scaling-filter={DEEPSTREAM_SCALING_FILTER}
# GPU scaling and conversion; a greyscale model on the VIC instead (scaling-compute-hw=2) reads the NV12
# Y plane, limited range: then set net-scale-factor={LIMITED_RANGE_SCALE:.9g} and offsets={LIMITED_RANGE_OFFSET:g}
scaling-compute-hw={DEEPSTREAM_SCALING_HW}
output-blob-names={KNOWN_PROBABILITIES}
# probabilities_known is all zero beyond the rejection distance: such objects get no label ("unknown")
classifier-threshold=0.01
gie-unique-id=2
# fill in: the gie-unique-id of your detector and the class ids of the objects to classify
operate-on-gie-id=1
#operate-on-class-ids=0
""")


__all__ = ["freeze"]
