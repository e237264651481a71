"""`edgemeta freeze`: the frozen graph (backbone + fitted head) gives the runtime's labels and top-k
order exactly (away from ties), probabilities and distances within the float32 bound of their
float64 reference (tests/numeric.py), and the runtime's "unknown" answers, for every head kind; it passes the op audit; it
is a bundle `predict` and `inspect` take with no store; Triton and DeepStream configs come with it."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from edgemeta.runtime import FewShotClassifier, load_bundle
from edgemeta.runtime.frozen import FrozenClassifier
from edgemeta.runtime.heads import head_names
from numeric import UNIT_ROUNDOFF, assert_within, dot_bound, softmax64, softmax_bound


@pytest.fixture(scope="module")
def queries(tagalog):
    return [img for c in sorted(tagalog)[:5] for img in tagalog[c][12:16]]


@pytest.mark.parametrize("head", head_names())
@pytest.mark.parametrize("l2", [False, True])
def test_frozen_graph_matches_the_runtime(tiny_run, tiny_bundle, tagalog, queries, tmp_path, omniglot_paths, head, l2):
    bundle = tiny_bundle
    if l2:  # an L2-normalised bundle: cosine prototypes and cosine rejection distances
        bundle = tmp_path / "l2"
        r = run_cli("export", tiny_run / "best.safetensors", "--out", bundle, "--l2-normalize",
                    "--calib-data", omniglot_paths[0])
        assert r.exit_code == 0, r.output
    clf = FewShotClassifier.load(bundle, store=tmp_path / "s", head=head)
    for c in sorted(tagalog)[:5]:
        clf.enroll(c, tagalog[c][:3])
    clf.add_negatives([tagalog[sorted(tagalog)[7]][0]])  # a negative example goes into the gate too
    r = run_cli("freeze", bundle, "--store", tmp_path / "s", "--out", tmp_path / "frozen")
    assert r.exit_code == 0, r.output
    frozen = FrozenClassifier.load(tmp_path / "frozen")
    want, got = clf.predict(queries, top_k=3), frozen.predict(queries, top_k=3)
    # the head's arithmetic against its float64 reference, on the embeddings the frozen graph computed
    embeddings = frozen_embeddings(tmp_path / "frozen", clf, queries)
    state = clf._state
    logits64, logit_bound = head_reference(state, embeddings)
    assert_within(got.probabilities, np.take_along_axis(softmax64(logits64), order_of(got, state), 1),
                  np.take_along_axis(softmax_bound(softmax64(logits64), logit_bound), order_of(got, state), 1),
                  f"{head} probabilities")
    distance64, distance_bound = distance_reference(state, embeddings, clf.head.rejection_metric(clf.bundle.l2_normalized))
    assert_within(got.distances, distance64, distance_bound, f"{head} distances")
    # what a user sees, exactly: the labels and the top-3 order wherever the logits are not tied
    # within the bound, and the same "unknown" answers under auto
    top = np.sort(logits64, 1)[:, ::-1]
    slack = 2 * logit_bound.max(1)
    first = top[:, 0] - top[:, 1] > slack                      # top-1 not tied within the bound
    order = first & (top[:, 1] - top[:, 2] > slack)              # nor the next two
    assert order.sum() >= len(queries) // 2
    assert [lab for lab, f in zip(got.labels, first) if f] == [lab for lab, f in zip(want.labels, first) if f]
    assert [[n for n, _ in g] for g, o in zip(got.top_k, order) if o] == [[n for n, _ in w] for w, o in zip(want.top_k, order) if o]
    assert frozen.predict(queries, reject="auto").labels == clf.predict(queries, reject="auto").labels


def frozen_embeddings(folder, clf, images) -> np.ndarray:
    """The embeddings inside the frozen graph (its backbone's output made a graph output)."""
    import onnx
    import onnxruntime as ort
    from edgemeta.runtime.preprocess import load_images, pixels_to_batch
    model = onnx.load(str(folder / "classifier.onnx"))
    source = onnx.load(str(clf.bundle.variant_path("fp32")))
    name = source.graph.output[0].name
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    batch = pixels_to_batch(load_images(images, clf.bundle.spec))
    return session.run([name], {session.get_inputs()[0].name: batch})[0]


def head_reference(state, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 logits of the fitted head on float32 embeddings x, the float32 rounding bound of each):
    the graph's MatMul of D terms, then an Add/Mul of the bias and scale (each a few u more)."""
    h, f = state.head, state.fitted
    x64 = x.astype(np.float64)
    d = x.shape[1]
    if h.kind == "prototype":
        p = f["prototypes"].astype(np.float64)
        if h.metric == "cosine":
            unit, pn = x64 / np.linalg.norm(x64, axis=1, keepdims=True), p / np.linalg.norm(p, axis=1, keepdims=True)
            logits = h.scale * unit @ pn.T
            mag = h.scale * np.abs(unit) @ np.abs(pn).T
            return logits, dot_bound(mag, d, stages=4)  # norms, division, MatMul, scale
        logits = h.scale * (2 * x64 @ p.T - (p * p).sum(1))
        mag = h.scale * (2 * np.abs(x64) @ np.abs(p).T + (p * p).sum(1))
        return logits, dot_bound(mag, d, stages=3)
    if h.kind == "logistic":
        w, b = f["weight"].astype(np.float64).T, f["bias"].astype(np.float64)
        scale = 1.0
    elif h.kind == "ridge":
        w, b, scale = f["weights"].astype(np.float64), np.full(f["weights"].shape[1], h.bias), h.scale
    else:  # mahalanobis
        w, b, scale = f["weights"].astype(np.float64), f["bias"].astype(np.float64), h.scale
    logits = scale * (x64 @ w) + (b if h.kind == "ridge" else scale * b)
    mag = abs(scale) * (np.abs(x64) @ np.abs(w) + np.abs(b))
    return logits, dot_bound(mag, d, stages=3)


def distance_reference(state, x: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(float64 distance to the nearest prototype, its float32 bound)."""
    p = state.fitted["prototypes"].astype(np.float64)
    x64, d = x.astype(np.float64), x.shape[1]
    if metric == "cosine":
        unit, pn = x64 / np.linalg.norm(x64, axis=1, keepdims=True), p / np.linalg.norm(p, axis=1, keepdims=True)
        return 1 - (unit @ pn.T).max(1), dot_bound(1.0, d, stages=4)
    sq = (x64 * x64).sum(1)[:, None] - 2 * x64 @ p.T + (p * p).sum(1)
    dist = np.sqrt(np.maximum(sq.min(1), 0))
    mag = (x64 * x64).sum(1) + 2 * (np.abs(x64) @ np.abs(p).T).max(1) + (p * p).sum(1).max()
    # Δ√s ≤ Δs / (√s + √(s − Δs)): bounded by Δs / √s away from 0, by √Δs at 0
    ds = dot_bound(mag, d, stages=3)
    return dist, np.minimum(ds / np.maximum(dist, 1e-30), np.sqrt(ds)) + 2 * UNIT_ROUNDOFF * dist


def order_of(prediction, state) -> np.ndarray:
    labels = list(state.labels)
    return np.array([[labels.index(name) for name, _ in row] for row in prediction.top_k])


def test_frozen_folder_is_a_bundle_with_triton_and_deepstream_configs(tiny_bundle, tagalog, queries, tmp_path):
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    chars = sorted(tagalog)[:5]
    for c in chars:
        clf.enroll(c, tagalog[c][:3])
    assert run_cli("freeze", tiny_bundle, "--store", tmp_path / "s", "--out", tmp_path / "f").exit_code == 0
    b = load_bundle(tmp_path / "f")  # manifest and sha256s verified
    assert b.manifest["frozen"]["classes"] == chars and (tmp_path / "f" / "labels.txt").read_text().split("\n")[:-1] == chars
    assert b.manifest["frozen"]["store_model_sha256"] == clf.bundle.model_sha256
    config = triton_config(tmp_path / "f" / "triton" / "frozen-classifier" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 64 and config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 28, 28]
    assert [(o.name, list(o.dims)) for o in config.output] == [("probabilities", [5]), ("distance", [1]),
                                                                ("probabilities_known", [5])]
    assert (tmp_path / "f" / "triton" / "frozen-classifier" / "1" / "model.onnx").exists()
    ds = (tmp_path / "f" / "deepstream" / "config_infer_secondary_classifier.txt").read_text()
    for key in ("network-type=1", "process-mode=2", "output-blob-names=probabilities_known", "infer-dims=1;28;28",
                "batch-size=64", "onnx-file=classifier.onnx",
                "labelfile-path=labels.txt", "model-color-format=2", "scaling-filter=4", "scaling-compute-hw=1",
                "offsets=0\n", "net-scale-factor=1\n", "operate-on-gie-id=1", "classifier-threshold=0.01"):
        assert key in ds, key
    # nvinfer's parseLabelsFile: one line per output layer, the layer's labels separated by ';'
    assert (tmp_path / "f" / "deepstream" / "labels.txt").read_text() == ";".join(chars) + "\n"
    (tmp_path / "q.png").write_bytes(queries[0])
    r = run_cli("predict", tmp_path / "f", tmp_path / "q.png", "--json")
    assert r.exit_code == 0, r.output and json.loads(r.stdout)[0]["label"] == chars[0]
    assert "frozen classifier" in run_cli("predict", tmp_path / "f", tmp_path / "q.png", "--store", tmp_path / "s").stderr
    assert run_cli("inspect", tmp_path / "f").exit_code == 0
    with pytest.raises(Exception, match="frozen classifier"):
        FewShotClassifier.load(tmp_path / "f")


def test_deepstream_reads_unknown_the_way_nvinfer_reads_outputs(tiny_bundle, tagalog, queries, tmp_path):
    """A replay of nvinfer's output loop on the DeepStream graph (recorded behaviour, not verified on
    DeepStream): every non-input binding is an output layer (`if (!info.isInput)
    m_OutputLayerInfo.push_back(info)`), layer l takes line l of the labels file
    (parseAttributesFromSoftmaxLayers), and a layer's top class is a label only above
    classifier-threshold. Inputs the auto rule rejects must get no label from any layer."""
    import onnxruntime as ort
    from edgemeta.runtime.preprocess import load_images, pixels_to_batch
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    for c in sorted(tagalog)[:5]:
        clf.enroll(c, tagalog[c][:3])
    assert run_cli("freeze", tiny_bundle, "--store", tmp_path / "s", "--out", tmp_path / "f").exit_code == 0
    ds = tmp_path / "f" / "deepstream"
    config = dict(line.split("=", 1) for line in (ds / "config_infer_secondary_classifier.txt").read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    threshold = float(config["classifier-threshold"])
    label_lines = [line.split(";") for line in (ds / config["labelfile-path"]).read_text().splitlines() if line]
    session = ort.InferenceSession(str(ds / config["onnx-file"]), providers=["CPUExecutionProvider"])
    noise = [np.random.default_rng(i).integers(0, 256, (28, 28, 1), dtype=np.uint8) for i in range(6)]
    pixels = np.concatenate([load_images(queries, clf.bundle.spec), np.stack(noise)])
    layers = session.run(None, {session.get_inputs()[0].name: pixels_to_batch(pixels)})
    assert len(layers) == len(label_lines) == 1        # one output layer, one labels line
    expected = clf.predict(pixels, reject="auto").labels
    assert "unknown" in expected and set(expected) - {"unknown"}
    for i, want in enumerate(expected):
        said = []
        for layer, labels in zip(layers, label_lines):
            best = int(np.argmax(layer[i]))
            if layer[i][best] > threshold:
                said.append(labels[best])
        assert said == ([] if want == "unknown" else [want]), (i, said, want)


def triton_config(path):
    """Parse a config.pbtxt with Triton's own ModelConfig protobuf (from tritonclient, loaded
    without grpc): an unknown field or a wrong type fails here as it would in Triton."""
    import importlib.util
    from pathlib import Path
    pytest.importorskip("google.protobuf")
    tritonclient = pytest.importorskip("tritonclient")
    from google.protobuf import text_format
    spec = importlib.util.spec_from_file_location("model_config_pb2", Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py")
    pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb2)
    return text_format.Parse(Path(path).read_text(), pb2.ModelConfig())


def test_the_gated_output_is_zero_exactly_for_rejected_inputs(tiny_bundle, tagalog, queries, tmp_path):
    """probabilities_known (what DeepStream reads) = probabilities where the auto rule keeps the
    input, all zero where it answers "unknown"."""
    import onnxruntime as ort
    from edgemeta.runtime.preprocess import load_images, pixels_to_batch
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    for c in sorted(tagalog)[:5]:
        clf.enroll(c, tagalog[c][:3])
    assert run_cli("freeze", tiny_bundle, "--store", tmp_path / "s", "--out", tmp_path / "f").exit_code == 0
    noise = [np.random.default_rng(i).integers(0, 256, (28, 28, 1), dtype=np.uint8) for i in range(4)]
    pixels = np.concatenate([load_images(queries, clf.bundle.spec), np.stack(noise)])
    session = ort.InferenceSession(str(tmp_path / "f" / "classifier.onnx"))
    probs, dist, known = session.run(None, {session.get_inputs()[0].name: pixels_to_batch(pixels)})
    limits = load_bundle(tmp_path / "f").manifest["frozen"]["auto"]["limits"]
    assert limits == pytest.approx(clf.rejection_rule().limits.tolist())
    rejected = np.array([lab == "unknown" for lab in clf.predict(pixels, reject="auto").labels])
    assert rejected.any() and (~rejected).any()
    np.testing.assert_array_equal(known[rejected], 0)
    np.testing.assert_allclose(known[~rejected], probs[~rejected], rtol=1e-6)


def test_deepstream_output_is_refused_where_nvinfer_cannot_run_it(tiny_bundle, tagalog, tmp_path):
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    clf.enroll("cup;mug", tagalog[sorted(tagalog)[0]][:2])
    r = run_cli("freeze", tiny_bundle, "--store", tmp_path / "s", "--out", tmp_path / "f")
    assert r.exit_code == 0 and "no DeepStream config: label 'cup;mug' holds ';'" in " ".join(r.output.split())
    assert not (tmp_path / "f" / "deepstream").exists() and (tmp_path / "f" / "triton").is_dir()
    assert load_bundle(tmp_path / "f").manifest["frozen"]["deepstream"]["written"] is False


def test_an_int8_freeze_on_a_cpu_machine_is_the_graph_tensorrt_parses(tiny_bundle, tagalog, queries, tmp_path):
    """With the CPU onnxruntime an INT8 store is enrolled through the U8S8 graph (UINT8 zero points
    TensorRT cannot parse); its freeze is made from the S8S8 graph, the kept shots re-embedded with
    it, and passes the Q/DQ audit TensorRT needs — whichever onnxruntime is installed. A store
    without kept images is refused, saying why."""
    import onnx
    from edgemeta.export.quantize import audit_qdq
    from onnx import numpy_helper
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s8", variant="int8")
    assert clf.variant == "int8-cpu"
    for c in sorted(tagalog)[:5]:
        clf.enroll(c, tagalog[c][:3])
    r = run_cli("freeze", tiny_bundle, "--store", tmp_path / "s8", "--out", tmp_path / "f8", "--variant", "int8")
    assert r.exit_code == 0, r.output
    assert "no DeepStream config: an INT8 (Q/DQ) graph needs a strongly typed TensorRT build" in " ".join(r.output.split())
    assert not (tmp_path / "f8" / "deepstream").exists()
    frozen = FrozenClassifier.load(tmp_path / "f8")
    assert frozen.frozen["variant"] == "int8"
    graph = onnx.load(str(tmp_path / "f8" / "classifier.onnx"))
    audit_qdq(graph)
    tensors = {t.name: t for t in graph.graph.initializer}
    zero_points = [numpy_helper.to_array(tensors[n.input[2]]) for n in graph.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    want, got = clf.predict(queries), frozen.predict(queries)
    assert np.mean([a == b for a, b in zip(got.labels, want.labels)]) >= 0.9   # two INT8 graphs of one model
    bare = FewShotClassifier.load(tiny_bundle, store=tmp_path / "bare", variant="int8", keep_images=False)
    bare.enroll("a", tagalog[sorted(tagalog)[0]][:2])
    r = run_cli("freeze", tiny_bundle, "--store", tmp_path / "bare", "--out", tmp_path / "fb", "--variant", "int8")
    assert r.exit_code == 2 and "kept no images to re-embed" in r.output and not (tmp_path / "fb").exists()


def test_bench_takes_a_frozen_classifier(tiny_bundle, tagalog, tmp_path, omniglot_paths):
    from edgemeta.runtime.bench import validate_bench
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    for c in sorted(tagalog)[:3]:
        clf.enroll(c, tagalog[c][:2])
    assert run_cli("freeze", tiny_bundle, "--store", tmp_path / "s", "--out", tmp_path / "f").exit_code == 0
    r = run_cli("bench", tmp_path / "f", "--batch", "1,4", "--repeat", "3", "--images", omniglot_paths[0],
                "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "b.json").read_text())
    validate_bench(result)
    assert [g["batch"] for g in result["graph"]] == [1, 4] and all(g["p50_ms"] > 0 for g in result["graph"])
    assert [p["batch"] for p in result["predict"]] == [1, 4] and result["bundle"]["classes"] == 3
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_the_frozen_classifier_runs_through_a_backend_with_the_tensorrt_provider_options(tiny_bundle, tagalog, tmp_path,
                                                                                         monkeypatch):
    """Not a bare session: the ONNX Runtime Backend, with the TensorRT provider's engine and timing
    caches and batch profile where that provider is present (no rebuild at every process start on a
    Jetson), and its fallback; on a CPU, none."""
    import onnxruntime as ort
    from edgemeta.runtime.backends.base import MAX_BATCH
    from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    for c in sorted(tagalog)[:3]:
        clf.enroll(c, tagalog[c][:2])
    assert run_cli("freeze", tiny_bundle, "--store", tmp_path / "s", "--out", tmp_path / "f").exit_code == 0
    frozen = FrozenClassifier.load(tmp_path / "f")
    assert isinstance(frozen.backend, OnnxRuntimeBackend) and frozen.backend.describe()["model"] == "classifier.onnx"
    assert frozen.backend.trt_options == {}  # CPU only here
    # where the TensorRT provider is listed (it fails to start here: a warning, then the CPU)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession

    def session(path, options=None, providers=None):
        if any((p[0] if isinstance(p, tuple) else p) == "TensorrtExecutionProvider" for p in providers):
            assert dict(providers[0][1])["trt_engine_cache_enable"]
            raise RuntimeError("TensorRT EP: libnvinfer.so.10 not found")
        return real(path, options, providers=providers)
    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.warns(RuntimeWarning, match="TensorRT provider failed"):
        frozen = FrozenClassifier.load(tmp_path / "f")
    options = frozen.backend.trt_options
    assert options["trt_engine_cache_enable"] and options["trt_profile_max_shapes"].split(":")[1].startswith(f"{MAX_BATCH}x")
    probs, dist, known = frozen.run(np.zeros((MAX_BATCH + 3, 28, 28, 1), np.uint8))   # chunked by MAX_BATCH
    assert probs.shape == known.shape == (MAX_BATCH + 3, 3) and dist.shape == (MAX_BATCH + 3,)
