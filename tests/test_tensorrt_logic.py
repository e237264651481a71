"""TensorRT: everything that does not need a GPU, tested for real; the GPU build and run are
skipped with the reason when TensorRT or a CUDA device is missing (no fake tensorrt module)."""
import importlib.util
from pathlib import Path

import pytest
from edgemeta.export import EngineOptions
from edgemeta.export.tensorrt import BatchProfile, engine_file_name, engine_record
from edgemeta.runtime import BundleError, ConfigError, DependencyError, load_bundle
from edgemeta.runtime.backends import matching_engine, open_backend
from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend, choose_providers
from edgemeta.runtime.backends.tensorrt import plan_chunks
from edgemeta.runtime.bundle import write_manifest
from edgemeta.runtime.device_info import cpu_model, device_identity, engine_mismatches, parse_l4t_release

ORIN = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "l4t": "36.4.0"}


def test_batch_profile_parsing():
    assert BatchProfile.parse("1:8:32") == BatchProfile(1, 8, 32)
    assert BatchProfile.parse("4") == BatchProfile(4, 4, 4)
    assert BatchProfile(1, 8, 32).shapes(3, 64, 64) == ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))
    for bad in ("8:1:32", "0:1:2", "a:b:c", "1:2", "1:2:3:4"):
        with pytest.raises(ConfigError):
            BatchProfile.parse(bad)


def test_l4t_release_parsing():
    text = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13"
    assert parse_l4t_release(text) == "36.4.0"
    assert parse_l4t_release("# R35 (release), REVISION: 5.0, GCID: 1") == "35.5.0"
    assert parse_l4t_release("nonsense") is None


def test_cpu_model_names_the_x86_family_that_a_bare_vm_name_hides():
    epyc = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n" \
           "processor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
    assert cpu_model(epyc) == "AMD EPYC (family 26, model 2)"
    jetson = "processor\t: 0\nBogoMIPS\t: 62.50\nCPU part\t: 0xd42\n\nHardware\t: NVIDIA Orin\n"
    assert cpu_model(jetson) == "NVIDIA Orin"


@pytest.mark.parametrize("device,expected", [
    (ORIN, []),
    ({**ORIN, "tensorrt_version": "10.7.0"}, ["TensorRT 10.3.0, this device has 10.7.0"]),
    ({**ORIN, "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}, ["compute capability 8.7 (Orin), this GPU is 9.0"]),
    ({**ORIN, "l4t": "36.3.0"}, ["L4T 36.4.0, this device runs L4T 36.3.0"]),
    ({"tensorrt_version": None, "gpu_name": None, "compute_capability": None, "l4t": None},
     ["TensorRT is not installed", "no CUDA device"]),
])
def test_engine_compatibility_rules(device, expected):
    reasons = engine_mismatches(ORIN, device)
    assert len(reasons) == len(expected)
    for reason, fragment in zip(reasons, expected):
        assert fragment in reason


def test_engine_records_and_names_carry_what_makes_them_valid():
    p = BatchProfile(1, 8, 32)
    name = engine_file_name("int8", p, ORIN, dla_core=0)
    assert name == "embed.int8.b1-8-32.orin.trt10.3.0.dla0.engine"
    rec = engine_record(name, "int8", p, ORIN, "abc", 0, 1024, 12.34)
    assert rec["profile"] == {"min": 1, "opt": 8, "max": 32} and rec["l4t"] == "36.4.0" and rec["build_seconds"] == 12.3
    with pytest.raises(BundleError):
        engine_record(name, "fp32", p, {"tensorrt_version": None}, "abc", None, 1, 1.0)


def test_chunking_respects_the_profile():
    assert plan_chunks(70, 1, 32) == [(0, 32, 32), (32, 64, 32), (64, 70, 6)]
    assert plan_chunks(3, 4, 8) == [(0, 3, 4)]  # padded up to the profile's min
    assert plan_chunks(0, 1, 8) == []
    with pytest.raises(ValueError):
        plan_chunks(5, 0, 8)


def test_auto_backend_skips_a_foreign_engine_with_a_warning_and_tensorrt_refuses(tiny_bundle, tmp_path):
    import shutil
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "e.engine").write_bytes(b"plan")
    b = load_bundle(copy)
    m = b.manifest
    m["files"]["e.engine"] = {"sha256": __import__("hashlib").sha256(b"plan").hexdigest(), "bytes": 4, "role": "tensorrt-fp32"}
    m["engines"] = [engine_record("e.engine", "fp32", BatchProfile(1, 8, 32), ORIN, "x", None, 1024, 1.0)]
    write_manifest(copy, m)
    b = load_bundle(copy)
    here = {"tensorrt_version": None, "gpu_name": None, "compute_capability": None, "l4t": None}
    engine, reasons = matching_engine(b, here)
    assert engine is None and "TensorRT is not installed" in reasons[0]
    assert matching_engine(b, ORIN)[0]["file"] == "e.engine"
    with pytest.warns(RuntimeWarning, match="rebuild it on this device with `edgemeta build-engine"):
        backend = open_backend(b, "auto", device=here)
    assert isinstance(backend, OnnxRuntimeBackend)
    with pytest.raises(BundleError, match="no fp32 TensorRT engine in this bundle runs on this device"):
        open_backend(b, "tensorrt", device=here)


def test_provider_choice_prefers_tensorrt_then_cuda_then_cpu():
    all3 = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto", all3) == all3
    assert choose_providers("auto", ["CPUExecutionProvider", "CUDAExecutionProvider"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("cpu", all3) == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="not available"):
        choose_providers("CUDAExecutionProvider", ["CPUExecutionProvider"])


def test_engine_build_without_tensorrt_says_how_to_install(tiny_bundle):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; the GPU test below covers the build")
    from edgemeta.export import add_engine
    with pytest.raises(DependencyError, match=r"pip install 'tensorrt-cu12.*\[tensorrt\] extra"):
        add_engine(tiny_bundle)


_HAS_GPU = importlib.util.find_spec("tensorrt") is not None and device_identity()["compute_capability"] is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_GPU, reason="needs TensorRT 10 and a CUDA device (Jetson with JetPack ≥ 6.1, or a GPU machine); "
                                         "not installable on the CPU CI machines")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_build_and_run_match_onnxruntime(tiny_bundle, tmp_path, omniglot, precision):
    """On a GPU: each precision builds, a second build reuses the timing cache, batches below the
    profile minimum are padded and larger ones chunked, and the backend closes."""
    import shutil

    import numpy as np
    from edgemeta.export import add_engine
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    cache = tmp_path / "cache.bin"
    record = add_engine(copy, EngineOptions(precision, "2:4:16", timing_cache=str(cache)))
    assert cache.exists() and cache.stat().st_size > 0
    add_engine(copy, EngineOptions(precision, "2:4:16", timing_cache=str(cache)))  # reloads the cache
    b = load_bundle(copy)
    backend = open_backend(b, "tensorrt", variant=precision)
    ref = OnnxRuntimeBackend(b.variant_path(precision), b.spec, 64, "cpu")
    tolerance = {"fp32": 1e-3, "fp16": 2e-2, "int8": 5e-2}[precision]
    for n in (1, 37):  # 1 < profile min 2: padded; 37 > max 16: chunked
        x = omniglot.pixels[:n].transpose(0, 3, 1, 2).astype(np.float32)
        got, want = backend.embed(x), ref.embed(x)
        assert np.abs(got - want).max() <= tolerance * max(1.0, np.abs(want).max())
    assert record["precision"] == precision and record["tf32"] is False
    backend.close()


def test_one_missing_dependency_message_names_the_extra(monkeypatch):
    from edgemeta.runtime import extras
    with pytest.raises(DependencyError, match=r"--plot needs no_such_pkg: pip install no_such_pkg"):
        extras.require("no_such_pkg", purpose="--plot")
    # edgemeta is installed from a wheel or a checkout, not PyPI: the hint names the extra's packages
    assert "'tensorrt-cu12" in extras.install_hint("tensorrt") and "[tensorrt] extra" in extras.install_hint("tensorrt")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("tensorrt", "cuda") else real(name, *a))
    with pytest.raises(DependencyError, match="python3-libnvinfer .*pip install 'tensorrt-cu12"):
        extras.load("tensorrt", "the TensorRT backend")
    monkeypatch.setattr(importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name)))
    with pytest.raises(DependencyError, match="needs cuda-python"):
        extras.cudart("the TensorRT backend")


def test_two_onnxruntime_packages_in_one_environment_are_reported_with_the_fix():
    from edgemeta.runtime.backends.onnxruntime import check_one_onnxruntime
    with pytest.warns(RuntimeWarning, match="pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"):
        check_one_onnxruntime(["onnxruntime", "onnxruntime-gpu"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_one_onnxruntime(["onnxruntime"])


def test_onnxruntime_tensorrt_provider_gets_caches_profiles_and_precision_and_falls_back(tiny_bundle, monkeypatch, tmp_path):
    import onnxruntime as ort
    from edgemeta.runtime.backends.onnxruntime import tensorrt_ep_options
    b = load_bundle(tiny_bundle)
    opts = tensorrt_ep_options(b, "int8", cache_root=tmp_path)
    assert opts["trt_int8_enable"] and not opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"]
    assert Path(opts["trt_engine_cache_path"]).name.startswith(f"{b.model_sha256[:16]}-int8-ort")
    assert opts["trt_profile_min_shapes"] == f"{b.input_name}:1x1x28x28" and opts["trt_profile_max_shapes"].endswith(":64x1x28x28")
    # a TensorRT provider that fails to start: a warning, then CUDA/CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession

    def session(path, options=None, providers=None):
        if any((p[0] if isinstance(p, tuple) else p) == "TensorrtExecutionProvider" for p in providers):
            raise RuntimeError("TensorRT EP: libnvinfer.so.10 not found")
        return real(path, options, providers=providers)
    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.warns(RuntimeWarning, match="TensorRT provider failed .*libnvinfer"):
        backend = open_backend(b, "onnxruntime")
    assert backend.providers == ["CPUExecutionProvider"]


def test_a_cuda_error_is_reported_not_hidden_as_no_device(monkeypatch):
    import sys
    import types

    from edgemeta.runtime.device_info import cuda_device, engine_mismatches
    cuda = types.ModuleType("cuda.bindings.runtime")
    cuda.cudaGetDeviceProperties = lambda i: (35, None)  # cudaErrorInsufficientDriver
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda)
    device = {"tensorrt_version": "10.3.0", **cuda_device(), "l4t": None}
    assert device["compute_capability"] is None and "CUDA error 35" in device["cuda_error"]
    reasons = engine_mismatches(ORIN, device)
    assert any("no CUDA device here (CUDA error 35" in r for r in reasons)


def test_one_batch_ceiling_for_profiles_ep_options_chunking_and_the_service(tiny_bundle):
    """MAX_BATCH is the largest batch edgemeta sends: the TensorRT EP profile reaches it, the default
    engine profile reaches it, embed_pixels and the frozen classifier chunk by it, --max-batch stops
    at it (a batch beyond a profile rebuilds or fails on the device)."""
    import inspect

    from edgemeta.export import EngineOptions
    from edgemeta.export.tensorrt import BatchProfile
    from edgemeta.runtime import load_bundle
    from edgemeta.runtime.backends.base import MAX_BATCH, Backend
    from edgemeta.runtime.backends.onnxruntime import tensorrt_ep_options
    from edgemeta.runtime.errors import ConfigError
    from edgemeta.runtime.frozen import FrozenClassifier
    from edgemeta.runtime.serve.settings import ServeSettings
    b = load_bundle(tiny_bundle)
    options = tensorrt_ep_options(b, "fp16", cache_root="/tmp/x")
    assert options["trt_profile_max_shapes"].split(":")[1].startswith(f"{MAX_BATCH}x")
    assert "-ort" in options["trt_engine_cache_path"] and "-trt" in options["trt_engine_cache_path"]
    assert BatchProfile.parse(EngineOptions().batch).max == MAX_BATCH
    assert inspect.signature(Backend.embed_pixels).parameters["batch_size"].default == MAX_BATCH
    assert "MAX_BATCH" in inspect.getsource(FrozenClassifier.run)
    ServeSettings(max_batch=MAX_BATCH)
    with pytest.raises(ConfigError, match=f"--max-batch must be 1–{MAX_BATCH}"):
        ServeSettings(max_batch=MAX_BATCH + 1)
