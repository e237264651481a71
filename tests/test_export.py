"""Export: ONNX checks, op audit, parity on real images, dynamic batch, INT8/FP16, manifest, BYO ONNX."""
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli
from edgemeta.export.onnx_graph import ALLOWED_OPS, ExportEmbedder, audit_ops, export_onnx, parity
from edgemeta.runtime import BundleError, InputSpec, load_bundle
from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgemeta.runtime.bundle import read_manifest, validate_manifest, write_manifest
from edgemeta.runtime.store import EnrollmentStore

from edgemeta.backbones import Embedder


@pytest.mark.parametrize("name,args", [("conv4", {}), ("resnet12", {"widths": [16, 32, 48, 64]}), ("edgenet", {})])
@pytest.mark.parametrize("l2", [False, True])
def test_every_backbone_exports_checks_audits_and_matches_torch_on_real_images(tmp_path, omniglot, name, args, l2):
    spec = InputSpec(28, 28, "L", (0.9,), (0.25,))
    embedder = Embedder(name, spec, args).eval()
    with torch.no_grad():  # give BatchNorm non-trivial statistics so folding is really tested
        for m in embedder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model = export_onnx(embedder, spec, tmp_path / "m.onnx", l2_normalize=l2)
    ops = audit_ops(model)
    assert set(ops) <= ALLOWED_OPS and "BatchNormalization" not in ops  # folded into Conv
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")), full_check=True)
    pixels = omniglot.pixels[::97][:48].transpose(0, 3, 1, 2).astype(np.float32)
    check = parity(tmp_path / "m.onnx", ExportEmbedder(embedder, l2).eval(), pixels)
    assert check["max_rel_error"] < 1e-4 and check["images"] == 48
    backend = OnnxRuntimeBackend(tmp_path / "m.onnx", spec, embedder.embed_dim, "cpu")
    for batch in (1, 17):  # dynamic batch axis
        assert backend.embed(pixels[:batch]).shape == (batch, embedder.embed_dim)
    if l2:
        np.testing.assert_allclose(np.linalg.norm(backend.embed(pixels[:5]), axis=1), 1.0, rtol=1e-5)


def test_op_audit_names_the_offending_node():
    node = onnx.helper.make_node("NonMaxSuppression", ["a"], ["b"], name="nms_1")
    graph = onnx.helper.make_graph([node], "g", [], [])
    with pytest.raises(BundleError, match=r"NonMaxSuppression \(node 'nms_1'\)"):
        audit_ops(onnx.helper.make_model(graph))
    custom = onnx.helper.make_node("FusedConv", ["a"], ["b"], name="fc", domain="com.microsoft")
    with pytest.raises(BundleError, match="com.microsoft::FusedConv"):
        audit_ops(onnx.helper.make_model(onnx.helper.make_graph([custom], "g", [], [])))


def test_cli_export_writes_a_verified_bundle_with_int8_and_fp16(tiny_bundle):
    m = read_manifest(tiny_bundle)
    assert list(m["files"]) == ["embed.onnx", "embed.int8.onnx", "embed.int8-cpu.onnx", "embed.fp16.onnx"]
    assert m["input"]["name"] == "pixels" and m["input"]["layout"] == "NCHW" and m["output"]["dim"] == 64
    parity_check = m["variants"]["fp32"]["parity"]
    assert parity_check["max_rel_error"] < 1e-4 and parity_check["real_images"] == 64
    int8 = m["variants"]["int8"]
    # INT8 on Omniglot Conv4: accuracy change bounded by 1 point on the fixed episodes
    assert abs(int8["accuracy_delta_points"]) <= 1.0
    assert int8["calibration_images"] == 128 and int8["speedup_batch1"] > 0
    assert m["files"]["embed.int8.onnx"]["bytes"] < m["files"]["embed.onnx"]["bytes"] / 2
    fp16 = m["variants"]["fp16"]["parity"]   # checked like fp32, against the fp32 graph on real images
    assert fp16["images"] == 64 and 0 < fp16["max_rel_error"] < 1e-2 and fp16["reference"].startswith("embed.onnx")
    load_bundle(tiny_bundle)  # every sha256 verifies


def test_exported_graph_keeps_the_relu_on_the_convolution(tiny_bundle, tiny_run):
    """Training pools before the ReLU (same function); the export restores Conv → Relu → MaxPool,
    the pattern inference runtimes fuse, so every Relu reads a Conv's output."""
    from edgemeta.checkpoint import load_checkpoint
    assert load_checkpoint(tiny_run / "best.safetensors").meta["backbone"]["name"] == "conv4"
    graph = onnx.load(str(tiny_bundle / "embed.onnx")).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    relus = [node for node in graph.node if node.op_type == "Relu"]
    assert len(relus) == 4 and all(producer[node.input[0]] == "Conv" for node in relus)


def test_int8_and_fp16_variants_run_and_stay_close_to_fp32(tiny_bundle, omniglot):
    b = load_bundle(tiny_bundle)
    x = omniglot.pixels[:32].transpose(0, 3, 1, 2).astype(np.float32)
    ref = OnnxRuntimeBackend(b.variant_path("fp32"), b.spec, 64, "cpu").embed(x)
    for variant, tol in (("fp16", 0.01), ("int8", 0.1)):
        got = OnnxRuntimeBackend(b.variant_path(variant), b.spec, 64, "cpu").embed(x)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 1 - tol, variant


def test_exported_onnx_also_runs_in_the_onnx_reference_evaluator(tiny_bundle, omniglot):
    """An independent consumer besides ONNX Runtime: onnx's own reference implementation."""
    from onnx.reference import ReferenceEvaluator
    b = load_bundle(tiny_bundle)
    x = omniglot.pixels[:3].transpose(0, 3, 1, 2).astype(np.float32)
    ref = ReferenceEvaluator(str(b.variant_path("fp32"))).run(None, {"pixels": x})[0]
    ort_out = OnnxRuntimeBackend(b.variant_path("fp32"), b.spec, 64, "cpu").embed(x)
    np.testing.assert_allclose(ref, ort_out, rtol=1e-4, atol=1e-4)


def test_a_tampered_file_is_refused_when_used_and_inspect_names_it(tiny_bundle, tmp_path, tagalog, monkeypatch):
    """Each file is checked against its sha256 when first asked for: a damaged fp32 graph stops
    enroll; a damaged INT8 graph stops only the INT8 variant (fp32 commands do not hash it), and
    `edgemeta inspect` checks every file. (A machine that has not run the graph before: no optimised
    copy of it in the cache, tests/test_ort_graph_cache.py.)"""
    monkeypatch.setenv("EDGEMETA_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "x.png"
    image.write_bytes(tagalog[sorted(tagalog)[0]][0])
    for damaged, used in (("embed.onnx", ["enroll"]), ("embed.int8-cpu.onnx", ["enroll", "--variant", "int8"])):
        copy = tmp_path / damaged
        shutil.copytree(tiny_bundle, copy)
        data = bytearray((copy / damaged).read_bytes())
        data[-10] ^= 0xFF
        (copy / damaged).write_bytes(bytes(data))
        b = load_bundle(copy)                                   # the manifest alone: nothing hashed yet
        with pytest.raises(BundleError, match=f"{damaged} does not match its sha256"):
            b.verify_every_file()
        result = run_cli(used[0], copy, image, "--store", tmp_path / f"s-{damaged}", "--label", "a", *used[1:])
        assert result.exit_code == 2 and f"{damaged} does not match its sha256" in result.output
        assert EnrollmentStore(tmp_path / f"s-{damaged}").read() is None    # nothing enrolled
        inspected = run_cli("inspect", copy)
        assert inspected.exit_code == 2 and f"{damaged} does not match its sha256" in inspected.output
    fp32 = run_cli("enroll", tmp_path / "embed.int8-cpu.onnx", image, "--store", tmp_path / "s-fp32", "--label", "a")
    assert fp32.exit_code == 0 and "enrolled 'a'" in fp32.stdout


def test_a_truncated_or_foreign_manifest_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    text = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match="truncated or not JSON"):
        load_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(copy)


def test_manifest_schema_round_trip_and_version_rules(tiny_bundle, tmp_path):
    m = read_manifest(tiny_bundle)
    write_manifest(tmp_path, m)
    assert read_manifest(tmp_path) == m
    validate_manifest({**m, "schema_version": "1.7"})  # newer minor: readable
    with pytest.raises(BundleError, match="schema version 2.0.*Re-export"):
        validate_manifest({**m, "schema_version": "2.0"})
    broken = json.loads(json.dumps(m))
    broken["output"]["dim"] = "64"
    with pytest.raises(BundleError, match="'output.dim' should be int"):
        validate_manifest(broken)
    del broken["input"]
    with pytest.raises(BundleError, match="missing field 'input'"):
        validate_manifest(broken)


def test_export_refuses_to_overwrite_and_leaves_nothing_half_written(tiny_run, tmp_path, omniglot_paths):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # a folder that is not a bundle is never replaced
        result = run_cli("export", tiny_run / "best.safetensors", "--out", out, "--calib-data", omniglot_paths[0], *extra)
        assert result.exit_code == 2 and "not an edgemeta bundle" in result.output
        assert (out / "keep.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bring_your_own_onnx_model(tmp_path, omniglot_paths):
    spec = InputSpec(28, 28, "L", (0.5,), (0.5,))
    embedder = Embedder("edgenet", spec).eval()
    export_onnx(embedder, spec, tmp_path / "mine.onnx")
    result = run_cli("export", tmp_path / "mine.onnx", "--onnx", "--input-size", "28", "--colour", "L",
                     "--out", tmp_path / "b", "--calib-data", omniglot_paths[0])
    assert result.exit_code == 0, result.output
    b = load_bundle(tmp_path / "b")
    assert b.embedding_dim == 128 and b.manifest["model"]["backbone"] == "external"
    bad = run_cli("export", tmp_path / "mine.onnx", "--onnx", "--input-size", "28", "--colour", "RGB",
                  "--out", tmp_path / "c")
    assert bad.exit_code == 2 and "takes 1 channels" in bad.output
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    junk = run_cli("export", tmp_path / "junk.onnx", "--onnx", "--input-size", "28", "--out", tmp_path / "d")
    assert junk.exit_code == 2 and "not a readable ONNX model" in junk.output


def test_inspect_bundle_shows_files_checksums_and_what_runs_here(tiny_bundle):
    out = run_cli("inspect", tiny_bundle)
    assert out.exit_code == 0, out.output
    for text in ("edgemeta-bundle 1.0", "embed.int8.onnx", "✓", "runs here: embed.onnx", "onnxruntime", "parity rel"):
        assert text in out.stdout


def test_int8_variant_keeps_biases_float_so_tensorrt_can_parse_it(tiny_bundle):
    """Every DequantizeLinear in embed.int8.onnx dequantizes int8 (no int32 bias behind one)."""
    import onnx
    from edgemeta.export.quantize import audit_qdq
    model = onnx.load(str(tiny_bundle / "embed.int8.onnx"))
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    dq_inputs = [n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq_inputs and all(dtypes.get(name, onnx.TensorProto.INT8) == onnx.TensorProto.INT8 for name in dq_inputs)
    assert not any(t.data_type == onnx.TensorProto.INT32 for t in model.graph.initializer)
    audit_qdq(tiny_bundle / "embed.int8.onnx")
    # and the audit does catch an int32 bias behind a DequantizeLinear
    bias = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    bias.data_type = onnx.TensorProto.INT32
    bad = tiny_bundle.parent / "bad.int8.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(Exception, match="not int8|does not pass"):
        audit_qdq(bad)


def test_int8_has_a_tensorrt_graph_and_a_faster_cpu_graph_and_the_cpu_backend_takes_the_latter(tiny_bundle):
    """The S8S8 QDQ graph is for TensorRT; ONNX Runtime's CPU provider gets the U8S8 graph, each
    measured against fp32 at export (accuracy delta, speed-up) and chosen by the backend."""
    from edgemeta.runtime import load_bundle
    from edgemeta.runtime.backends import open_backend
    b = load_bundle(tiny_bundle)
    int8 = b.manifest["variants"]["int8"]
    assert int8["file"] == "embed.int8.onnx" and int8["cpu"]["file"] == "embed.int8-cpu.onnx"
    assert int8["cpu"]["activations"].startswith("uint8") and "accuracy_delta_points" in int8["cpu"]
    assert b.manifest["files"]["embed.int8-cpu.onnx"]["role"] == "int8-cpu"
    backend = open_backend(b, "onnxruntime", "int8", providers="cpu")
    assert backend.describe()["model"] == "embed.int8-cpu.onnx"
    assert b.variant_path("int8").name == "embed.int8.onnx"   # what TensorRT and the GPU providers build from


def test_fp32_exports_anywhere_and_int8_asks_for_real_images(tmp_path, monkeypatch):
    """A CIFAR-FS checkpoint where CIFAR-FS is not at hand: fp32 exports, its parity checked on
    deterministic synthetic images (said in the output and the manifest); INT8 needs --calib-data."""
    import json

    from conftest import ROOT, run_cli
    monkeypatch.setenv("EDGEMETA_DATA", str(tmp_path / "no-data-here"))
    ckpt = ROOT / "checkpoints" / "cifarfs-edgenet-rotation-distill.safetensors"
    r = run_cli("export", ckpt, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert "parity is checked on 64 deterministic synthetic images" in " ".join(r.output.split())
    parity = json.loads((tmp_path / "b" / "manifest.json").read_text())["variants"]["fp32"]["parity"]
    assert parity["synthetic_images"] == 64 and parity["real_images"] == 0 and parity["max_rel_error"] < 1e-4
    r = run_cli("export", ckpt, "--out", tmp_path / "c", "--int8")
    assert r.exit_code == 2 and "INT8 is calibrated on real images: pass --calib-data" in " ".join(r.output.split())


def test_reference_images_decode_only_the_calibration_sample_and_the_int8_check(omniglot_paths, omniglot, monkeypatch):
    """An export reads a few hundred images, not the whole calibration set (CIFAR-FS at 224 px is 7 GB
    decoded): the same seeded sample and check set as picking from the full load, and nothing more."""
    from edgemeta.export.bundle_builder import reference_images
    from edgemeta.export.int8_report import CHECK_CLASSES, CHECK_IMAGES_PER_CLASS
    from edgemeta.runtime.preprocess import pixels_to_batch

    from edgemeta.data import loading, select_split
    decoded = []
    real_decode = loading._decode_one
    monkeypatch.setattr(loading, "_decode_one", lambda parts, read, spec: decoded.append(parts) or real_decode(parts, read, spec))
    spec = InputSpec(28, 28, "L")
    calibration, check = reference_images([str(p) for p in omniglot_paths], spec, 100, int8_check=True)
    pick = np.sort(np.random.default_rng(0).choice(len(omniglot), 100, replace=False))
    np.testing.assert_array_equal(calibration, pixels_to_batch(omniglot.pixels[pick]))
    test = select_split(omniglot, "test")  # the check: evenly spread test-split classes, their first images
    chosen = np.unique(np.linspace(0, test.n_classes - 1, CHECK_CLASSES).round().astype(int))
    expected = test.select_classes(chosen)
    keep = np.sort(np.concatenate([idx[:CHECK_IMAGES_PER_CLASS] for idx in expected.class_indices()]))
    assert check.classes == expected.classes and check.n_classes == CHECK_CLASSES
    np.testing.assert_array_equal(check.labels, expected.labels[keep])
    np.testing.assert_array_equal(check.pixels, expected.pixels[keep])
    assert len(decoded) == len(set(map(tuple, decoded))) <= 100 + len(keep) < len(omniglot) / 8
    decoded.clear()
    probe, none = reference_images([str(p) for p in omniglot_paths], spec, 8)
    assert none is None and probe.shape == (8, 1, 28, 28) and len(decoded) == 8


@pytest.mark.parametrize("target", ["tensorrt", "cpu"])
def test_int8_calibration_gives_the_same_graph_in_any_batch_size(tiny_bundle, omniglot, tmp_path, target):
    """MinMax ranges are a min and a max over every image: calibrating in small batches (as exports do,
    to bound the calibration graph's memory) changes nothing in the quantized graph."""
    from edgemeta.export.quantize import quantize_int8
    from edgemeta.runtime.preprocess import pixels_to_batch
    calib = pixels_to_batch(omniglot.pixels[::41][:96])
    graphs = {}
    for batch in (8, 96):
        quantize_int8(tiny_bundle / "embed.onnx", tmp_path / f"q{batch}.onnx", calib, "pixels", batch_size=batch, target=target)
        graphs[batch] = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / f"q{batch}.onnx")).graph.initializer}
    assert graphs[8].keys() == graphs[96].keys() and any("scale" in k for k in graphs[8])
    for name, value in graphs[8].items():
        np.testing.assert_array_equal(value, graphs[96][name], err_msg=name)


def test_the_tensorrt_int8_graph_quantizes_where_tensorrt_fuses(tiny_bundle):
    """ONNX Runtime's defaults quantized every tensor — the 0–255 input (scale ≈ 2), before and after
    each activation and pooling, the flatten, the embedding. TensorRT's explicit-quantization
    guidance puts Q/DQ on the inputs of Conv/MatMul/Gemm and residual Adds only; the manifest records
    where (for `trtexec --dumpLayerInfo` on a device to confirm the fusions)."""
    import onnx
    from edgemeta.runtime import load_bundle
    bundle = load_bundle(tiny_bundle)
    entry = bundle.manifest["variants"]["int8"]
    graph = onnx.load(str(bundle.variant_path("int8")))
    consumers: dict[str, list] = {}
    for n in graph.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    assert not [n for n in consumers.get(graph.graph.input[0].name, []) if n.op_type == "QuantizeLinear"]
    for q in (n for n in graph.graph.node if n.op_type == "QuantizeLinear"):
        (dq,) = consumers[q.output[0]]
        assert {c.op_type for c in consumers[dq.output[0]]} <= {"Conv", "MatMul", "Gemm", "Add"}, q.name
    assert not [n for n in consumers.get(graph.graph.output[0].name, []) if n.op_type == "QuantizeLinear"]
    placement = entry["placement"]
    assert placement["quantized_ops"].get("Conv", 0) >= 1 and placement["quantize_nodes"] == \
        sum(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    assert abs(entry["accuracy_delta_points"]) < 3
