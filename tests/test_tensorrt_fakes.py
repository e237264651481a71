"""edgemeta's own control flow around TensorRT, tested with small RECORDING FAKES of the `tensorrt`
and cuda-python runtime modules. Nothing here is verified on TensorRT: the fakes only record which
calls edgemeta makes, in which order, and return what the TensorRT 10 Python API documents. The
real engine build and run are covered by the GPU test in test_tensorrt_logic.py and by
scripts/gpu_check_workstation.sh and scripts/gpu_check_device.sh on a machine that has TensorRT."""
from __future__ import annotations

import ctypes
import json
import shutil
import sys
import types

import numpy as np
import pytest
from edgemeta.runtime import BundleError, ConfigError, DependencyError, load_bundle

DIM = 64


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, *entry):
        self.calls.append(entry)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def fake_tensorrt(rec: Recorder, version: str = "10.3.0", dla_cores: int = 0, cache_ok: bool = True,
                  build_ok: bool = True, context_ok: bool = True, out_dtype: str = "FLOAT", shape_ok: bool = True,
                  outputs: dict | None = None, corrupt_cache: bytes | None = None, inspector: str = "detailed",
                  during_build=None):
    outputs = outputs or {"embedding": DIM}  # output name → row width (1: shape [N])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Enum:
        def __init__(self, name):
            self.name = name

        def __repr__(self):
            return self.name

        def __int__(self):
            return 0
    trt.Logger = type("Logger", (), {"WARNING": 2, "ERROR": 1, "__init__": lambda self, level=0: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=Enum("STRONGLY_TYPED"))
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", GPU_FALLBACK="GPU_FALLBACK", FP16="FP16", INT8="INT8")
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.DataType = types.SimpleNamespace(FLOAT="FLOAT", HALF="HALF")
    trt.LayerInformationFormat = types.SimpleNamespace(JSON="JSON")
    trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="DETAILED", LAYER_NAMES_ONLY="LAYER_NAMES_ONLY")
    trt.nptype = lambda dt: {"FLOAT": np.float32, "HALF": np.float16}[dt]

    def recorded_dla_core(owner: str) -> property:
        """`DLA_core` as TensorRT's config and runtime have it; every set is recorded as OWNER.DLA_core."""
        def set_core(self, value):
            rec(f"{owner}.DLA_core", value)
            self._dla = value
        return property(lambda self: self._dla, set_core)

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return b"cache:" + self.data if self.data is not None else b""

        def combine(self, other, ignore_mismatch):
            rec("combine", other.data, ignore_mismatch)
            self.data = self.data + b"+" + other.data

    class Config:
        def __init__(self):
            self.default_device_type, self._dla = "GPU", None
            self.flags: set = set()

        def set_memory_pool_limit(self, pool, size):
            rec("set_memory_pool_limit", pool, size)

        def clear_flag(self, flag):
            rec("clear_flag", flag)

        def set_flag(self, flag):
            rec("set_flag", flag)
            self.flags.add(flag)

        def add_optimization_profile(self, profile):
            rec("add_optimization_profile", profile.shapes)

        def create_timing_cache(self, data):
            rec("create_timing_cache", bytes(data))
            if corrupt_cache is not None and bytes(data) == corrupt_cache:
                raise RuntimeError("TensorRT: corrupt timing cache")
            return Cache(bytes(data)) if cache_ok or not data else None

        def can_run_on_DLA(self, layer):  # noqa: N802 - TensorRT's name
            # as TensorRT: the DLA runs fp16 and int8 layers only, so the answer depends on the flags
            return layer.dla and bool(self.flags & {"FP16", "INT8"})

        @property
        def profiling_verbosity(self):
            return self._verbosity

        @profiling_verbosity.setter
        def profiling_verbosity(self, value):
            rec("profiling_verbosity", value)
            self._verbosity = value

        def set_timing_cache(self, cache, ignore_mismatch):
            rec("set_timing_cache", cache.data, ignore_mismatch)
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        DLA_core = recorded_dla_core("config")

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            self.shapes = (name, lo, opt, hi)

    class Network:  # 5 layers, the 3 convolutions DLA-capable
        num_layers = 5

        def get_layer(self, i):
            return types.SimpleNamespace(dla=i in (0, 1, 3))

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            rec("Builder")

        def create_network(self, flags):
            rec("create_network", "strong" if flags else "weak")
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            rec("build_serialized_network", config.default_device_type)
            if during_build is not None:
                during_build()
            return b"PLAN" if build_ok else None
    trt.Builder = Builder

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            rec("parse_from_file", path)
            return True
    trt.OnnxParser = Parser

    class Context:
        def __init__(self, engine):
            self.engine, self.shape = engine, None

        def set_tensor_address(self, name, address):
            rec("set_tensor_address", name)
            self.engine.addresses[name] = address

        def set_input_shape(self, name, shape):
            rec("set_input_shape", shape)
            self.shape = shape
            return shape_ok

        def execute_async_v3(self, stream):
            rec("execute_async_v3")
            assert stream == 7, stream  # the stream's handle, an int
            n, chw = self.shape[0], int(np.prod(self.shape[1:]))
            cuda = sys.modules["cuda.bindings.runtime"]

            def run():  # on the stream: each output's row i = the mean pixel of image i, repeated
                x = np.frombuffer(cuda.DEVICE[self.engine.addresses["pixels"]], np.float32, n * chw).reshape(n, chw)
                for name, width in outputs.items():
                    out = np.repeat(x.mean(1, keepdims=True), width, 1).astype(np.float32)
                    cuda.DEVICE[self.engine.addresses[name]][: out.nbytes] = out.tobytes()
            cuda.PENDING.append(run)
            return True

    class Engine:
        num_io_tensors = 1 + len(outputs)

        def __init__(self):
            self.addresses = {}

        def get_tensor_name(self, i):
            return ["pixels", *outputs][i]

        def get_tensor_mode(self, name):
            return "INPUT" if name == "pixels" else "OUTPUT"

        def get_tensor_dtype(self, name):
            return "FLOAT" if name == "pixels" else out_dtype

        def get_tensor_shape(self, name):
            if name == "pixels":
                return (-1, 1, 28, 28)
            return (-1,) if outputs[name] == 1 else (-1, outputs[name])

        def get_tensor_profile_shape(self, name, index):
            return (1, 1, 28, 28), (4, 1, 28, 28), (16, 1, 28, 28)

        def create_execution_context(self):
            return Context(self) if context_ok else None

        def create_engine_inspector(self):
            import json
            if inspector == "detailed":   # DETAILED verbosity: one object per layer
                layers = [{"Name": "conv1", "LayerType": "DLA"}, {"Name": "conv2", "LayerType": "DLA"},
                          {"Name": "pool", "LayerType": "Pooling"}, {"Name": "flatten", "LayerType": "Shuffle"}]
            else:                         # default verbosity: names only; a ForeignNode may be DLA or Myelin
                layers = ["{ForeignNode[conv1...conv2]}", "pool", "flatten"]
            if inspector == "myelin":     # a GPU Myelin subgraph: a ForeignNode that is not on the DLA
                layers = [{"Name": "{ForeignNode[conv1...conv2]}", "LayerType": "Myelin"},
                          {"Name": "pool", "LayerType": "DLA"}, {"Name": "flatten", "LayerType": "Shuffle"}]
            return types.SimpleNamespace(get_engine_information=lambda fmt: json.dumps({"Layers": layers}))

    class Runtime:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            self._dla = -1

        DLA_core = recorded_dla_core("runtime")

        def deserialize_cuda_engine(self, plan):
            rec("deserialize_cuda_engine")
            return Engine()
    trt.Runtime = Runtime
    return trt


def fake_cudart(rec: Recorder):
    cuda = types.ModuleType("cuda.bindings.runtime")
    cuda.DEVICE, cuda.PENDING, cuda.HOST = {}, [], {}
    cuda.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H")
    props = types.SimpleNamespace(name=b"Orin", major=8, minor=7, multiProcessorCount=16)
    cuda.cudaGetDeviceProperties = lambda i: (0, props)
    cuda.cudaStreamCreate = lambda: (rec("cudaStreamCreate"), (0, FakeStream(rec)))[1]

    def malloc(size):
        ptr = 1000 + len(cuda.DEVICE)
        cuda.DEVICE[ptr] = bytearray(size)
        return 0, ptr

    def malloc_host(size):
        buf = (ctypes.c_char * size)()
        cuda.HOST[ctypes.addressof(buf)] = buf
        return 0, ctypes.addressof(buf)

    def memcpy(dst, src, size, kind, stream):
        rec("cudaMemcpyAsync", kind)

        def run():  # copies land when the stream runs, i.e. at synchronise
            if kind == "H2D":
                cuda.DEVICE[dst][:size] = ctypes.string_at(src, size)
            else:
                ctypes.memmove(dst, bytes(cuda.DEVICE[src][:size]), size)
        cuda.PENDING.append(run)
        return (0,)

    def synchronize(stream):
        rec("cudaStreamSynchronize")
        while cuda.PENDING:
            cuda.PENDING.pop(0)()
        return (0,)
    cuda.cudaMalloc, cuda.cudaMallocHost, cuda.cudaMemcpyAsync = malloc, malloc_host, memcpy
    cuda.cudaStreamSynchronize = synchronize
    cuda.cudaFree = lambda p: rec("cudaFree")
    cuda.cudaFreeHost = lambda p: rec("cudaFreeHost")
    cuda.cudaStreamDestroy = lambda s: rec("cudaStreamDestroy")
    return cuda


class FakeStream:
    """A cudaStream_t whose int() (deprecated in cuda-python ≥ 12.8) is recorded."""

    def __init__(self, rec):
        self.rec = rec

    def __int__(self):
        self.rec("int(stream)")
        return 7


def fake_bindings_utils(rec):
    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = lambda obj: (rec("get_cuda_native_handle"), 7)[1]
    return utils


@pytest.fixture
def fakes(monkeypatch):
    """Install the fakes as `tensorrt` and `cuda.bindings.runtime`; returns (recorder, install)."""
    rec = Recorder()

    def install(native_handle: bool = True, **kw):
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(rec, **kw))
        monkeypatch.setitem(sys.modules, "cuda", types.ModuleType("cuda"))
        monkeypatch.setitem(sys.modules, "cuda.bindings", types.ModuleType("cuda.bindings"))
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_cudart(rec))
        if native_handle:  # cuda-python ≥ 12.8; without it, 12.6 as on JetPack 6.1/6.2
            monkeypatch.setitem(sys.modules, "cuda.bindings.utils", fake_bindings_utils(rec))
        else:
            monkeypatch.setitem(sys.modules, "cuda.bindings.utils", None)
        import importlib.util as iu
        real = iu.find_spec
        monkeypatch.setattr(iu, "find_spec", lambda name, *a: object() if name in ("tensorrt", "cuda") else real(name, *a))
    return rec, install


def copy_bundle(tiny_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    return out


def test_fp32_build_clears_tf32_and_is_strongly_typed(fakes, tiny_bundle, tmp_path):
    from edgemeta.export import EngineOptions, add_engine
    rec, install = fakes
    install()
    bundle = copy_bundle(tiny_bundle, tmp_path)
    record = add_engine(bundle, EngineOptions("fp32", "1:4:16"))
    assert ("clear_flag", "TF32") in rec.calls and ("set_flag", "GPU_FALLBACK") not in rec.calls
    assert ("create_network", "strong") in rec.calls and ("set_flag", "FP16") not in rec.calls
    assert rec.names().index("parse_from_file") < rec.names().index("build_serialized_network")
    assert record["tf32"] is False and record["sm_count"] == 16 and record["gpu_name"] == "Orin"
    assert (bundle / record["file"]).read_bytes() == b"PLAN" and not list(bundle.glob(".building-*"))
    assert load_bundle(bundle).engines[0]["file"] == record["file"]


def test_dla_needs_a_static_batch_and_a_real_core(fakes, tiny_bundle, tmp_path):
    from edgemeta.export import EngineOptions, add_engine
    rec, install = fakes
    install(dla_cores=2)
    bundle = copy_bundle(tiny_bundle, tmp_path)
    with pytest.raises(ConfigError, match="static batch"):
        add_engine(bundle, EngineOptions("fp16", "1:8:32", dla_core=0))
    with pytest.raises(ConfigError, match="this device has 2 DLA core"):
        add_engine(bundle, EngineOptions("fp16", "8", dla_core=2))
    with pytest.raises(ConfigError, match="fp16 or int8"):
        add_engine(bundle, EngineOptions("fp32", "8", dla_core=0))
    record = add_engine(bundle, EngineOptions("fp16", "8", dla_core=1))
    assert ("config.DLA_core", 1) in rec.calls and ("set_flag", "GPU_FALLBACK") in rec.calls
    assert ("profiling_verbosity", "DETAILED") in rec.calls and record["tf32"] is True   # fp16: TF32 left on
    assert record["placement"] == {"network_layers": 5, "dla_capable_layers": 3, "dla_layers": 2, "gpu_layers": 2,
                                   "layers": 4, "inspector": "detailed"}
    assert ("build_serialized_network", "DLA") in rec.calls and record["dla_core"] == 1
    assert ("clear_flag", "TF32") not in rec.calls
    # TensorRT 10 documents DLA only as trtexec builds it: weakly typed, precision flags
    assert ("create_network", "weak") in rec.calls and ("set_flag", "FP16") in rec.calls


def test_old_tensorrt_is_refused_before_anything_is_built(fakes, tiny_bundle, tmp_path):
    from edgemeta.export import EngineOptions, add_engine
    rec, install = fakes
    install(version="8.6.2")
    with pytest.raises(DependencyError, match="TensorRT ≥ 10 .*JetPack ≥ 6.1"):
        add_engine(copy_bundle(tiny_bundle, tmp_path), EngineOptions())
    assert "Builder" not in rec.names()


def test_a_stale_timing_cache_is_replaced_and_saved_only_when_real(fakes, tiny_bundle, tmp_path):
    from edgemeta.export import EngineOptions, add_engine
    rec, install = fakes
    install(cache_ok=False)
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"from-an-older-jetpack")
    messages = []
    progress = types.SimpleNamespace(message=messages.append)
    add_engine(copy_bundle(tiny_bundle, tmp_path), EngineOptions(timing_cache=str(cache)), progress=progress)
    loads = [c for c in rec.calls if c[0] == "create_timing_cache"]
    assert loads[:2] == [("create_timing_cache", b"from-an-older-jetpack"), ("create_timing_cache", b"")]
    assert "combine" not in rec.names()   # the stale file on disk at save time is not merged in
    assert any("fresh one" in m for m in messages)
    assert cache.read_bytes() == b"cache:"  # the fresh cache, written atomically after the build


def test_a_failed_build_leaves_no_orphan_and_the_manifest_unchanged(fakes, tiny_bundle, tmp_path):
    from edgemeta.export import EngineOptions, add_engine
    rec, install = fakes
    install(build_ok=False)
    bundle = copy_bundle(tiny_bundle, tmp_path)
    before = (bundle / "manifest.json").read_text()
    with pytest.raises(BundleError, match="failed to build"):
        add_engine(bundle, EngineOptions())
    assert (bundle / "manifest.json").read_text() == before
    assert not [p for p in bundle.iterdir() if "engine" in p.name]


def _engine_bundle(tiny_bundle, tmp_path, precision="fp32", dla_core=None):
    from edgemeta.export.tensorrt import BatchProfile, engine_record
    from edgemeta.runtime.bundle import register_file, write_manifest
    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / "e.engine").write_bytes(b"PLAN")
    manifest = json.loads((bundle / "manifest.json").read_text())
    register_file(bundle, manifest, "e.engine", f"tensorrt-{precision}")
    device = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "sm_count": 16,
              "dla_cores": 2, "l4t": None}
    manifest["engines"] = [engine_record("e.engine", precision, BatchProfile(1, 4, 16), device, "x", dla_core, 64, 1.0)]
    write_manifest(bundle, manifest)
    return load_bundle(bundle), device


def test_the_backend_sets_the_dla_core_before_deserialising_and_chunks_with_ordered_copies(fakes, tiny_bundle, tmp_path):
    from edgemeta.runtime.backends import open_backend
    from edgemeta.runtime.backends.tensorrt import TensorRTBackend
    rec, install = fakes
    install(dla_cores=2)
    bundle, device = _engine_bundle(tiny_bundle, tmp_path, "fp16", dla_core=1)
    backend = open_backend(bundle, "tensorrt", variant="fp16", device=device)
    assert isinstance(backend, TensorRTBackend)
    assert rec.names().index("runtime.DLA_core") < rec.names().index("deserialize_cuda_engine")
    x = np.random.default_rng(0).uniform(0, 255, (37, 1, 28, 28)).astype(np.float32)  # 37 > max 16: 3 chunks
    rec.calls.clear()
    out = backend.embed(x)
    np.testing.assert_allclose(out[:, 0], x.reshape(37, -1).mean(1), rtol=1e-5)
    shapes = [c[1][0] for c in rec.calls if c[0] == "set_input_shape"]
    assert shapes == [16, 16, 5]
    per_chunk = ["set_input_shape", "cudaMemcpyAsync", "get_cuda_native_handle", "execute_async_v3", "cudaMemcpyAsync",
                 "cudaStreamSynchronize"]
    assert rec.names() == per_chunk * 3   # the stream's handle through the accessor, never the deprecated int()
    backend.close()
    assert {"cudaFree", "cudaFreeHost", "cudaStreamDestroy"} <= set(rec.names())


def test_cuda_python_12_6_without_the_accessor_passes_the_stream_by_int(fakes, tiny_bundle, tmp_path):
    """JetPack 6.1/6.2 pin cuda-python 12.6, which has no get_cuda_native_handle yet."""
    from edgemeta.runtime.backends import open_backend
    rec, install = fakes
    install(native_handle=False)
    bundle, device = _engine_bundle(tiny_bundle, tmp_path, "fp16")
    backend = open_backend(bundle, "tensorrt", variant="fp16", device=device)
    backend.embed(np.zeros((2, 1, 28, 28), np.float32))
    assert "int(stream)" in rec.names() and "get_cuda_native_handle" not in rec.names()
    backend.close()


def test_engine_selection_by_variant_and_fallback_when_an_engine_will_not_load(fakes, tiny_bundle, tmp_path):
    from edgemeta.runtime.backends import OnnxRuntimeBackend, open_backend
    rec, install = fakes
    install(context_ok=False)
    bundle, device = _engine_bundle(tiny_bundle, tmp_path, "fp16")
    with pytest.warns(RuntimeWarning, match="no fp32 TensorRT engine"):  # an fp16 engine never serves fp32
        assert isinstance(open_backend(bundle, "auto", variant="fp32", device=device), OnnxRuntimeBackend)
    with pytest.warns(RuntimeWarning, match="did not load: TensorRT could not create an execution context"):
        assert isinstance(open_backend(bundle, "auto", variant="fp16", device=device), OnnxRuntimeBackend)
    with pytest.raises(BundleError, match="execution context"):
        open_backend(bundle, "tensorrt", variant="fp16", device=device)


@pytest.mark.parametrize("kw, why", [({"out_dtype": "HALF"}, "float16, edgemeta feeds and reads float32"),
                                     ({"shape_ok": False}, "refused input shape")])
def test_engine_tensors_are_checked(fakes, tiny_bundle, tmp_path, kw, why):
    from edgemeta.runtime.backends import open_backend
    rec, install = fakes
    install(**kw)
    bundle, device = _engine_bundle(tiny_bundle, tmp_path)
    with pytest.raises(BundleError, match=why):
        backend = open_backend(bundle, "tensorrt", device=device)
        backend.embed(np.zeros((2, 1, 28, 28), np.float32))


def graph_outputs(onnx_path) -> dict[str, int]:
    """The fake engine's outputs as the real graph declares them (name → row width, 1 for [N]), in
    the graph's order: a TensorRT engine built from it binds every one."""
    import onnx
    model = onnx.load(str(onnx_path))
    return {o.name: (o.type.tensor_type.shape.dim[1].dim_value if len(o.type.tensor_type.shape.dim) > 1 else 1)
            for o in model.graph.output}


def test_a_frozen_classifier_gets_an_engine_with_every_output(fakes, tiny_bundle, tagalog, tmp_path):
    from edgemeta.export import EngineOptions, add_engine
    from edgemeta.export.freeze import freeze
    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.backends import OnnxRuntimeBackend
    from edgemeta.runtime.backends.tensorrt import TensorRTBackend
    from edgemeta.runtime.frozen import FrozenClassifier
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    for c in sorted(tagalog)[:3]:
        clf.enroll(c, tagalog[c][:2])
    freeze(tiny_bundle, tmp_path / "s", tmp_path / "f")
    rec, install = fakes
    outputs = graph_outputs(tmp_path / "f" / "classifier.onnx")
    assert list(outputs) == ["probabilities", "distance", "probabilities_known"]
    install(outputs=outputs)
    with pytest.raises(BundleError, match="--precision fp32"):
        add_engine(tmp_path / "f", EngineOptions("fp16", "1:4:16"))
    record = add_engine(tmp_path / "f", EngineOptions("fp32", "1:4:16"))
    device = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "sm_count": 16,
              "dla_cores": 0, "l4t": None}
    frozen = FrozenClassifier.load(tmp_path / "f", backend="tensorrt", device=device)
    assert isinstance(frozen.backend, TensorRTBackend) and frozen.backend.engine_path.name == record["file"]
    x = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    probs, dist, known = frozen.run(x)
    assert probs.shape == known.shape == (5, 3) and dist.shape == (5,)
    np.testing.assert_allclose(dist, x.reshape(5, -1).mean(1), rtol=1e-5)  # what the fake engine returns
    # ONNX Runtime when asked, and when auto finds no engine for this device
    assert isinstance(FrozenClassifier.load(tmp_path / "f", backend="onnxruntime").backend, OnnxRuntimeBackend)
    with pytest.warns(RuntimeWarning, match="no TensorRT engine of this frozen classifier runs here"):
        other = {**device, "compute_capability": "8.9", "gpu_name": "RTX"}
        assert isinstance(FrozenClassifier.load(tmp_path / "f", device=other).backend, OnnxRuntimeBackend)


def test_dla_layers_are_counted_by_their_type_after_the_precision_flags(fakes, tiny_bundle, tmp_path):
    """DLA placement trusts the layer type (a GPU Myelin subgraph is a ForeignNode too), and DLA
    capability is asked after the precision flags are set (the DLA runs fp16/int8 layers only: asked
    before, every layer said no). At the names-only verbosity placement is unknown, not guessed."""
    from edgemeta.export import EngineOptions, add_engine
    rec, install = fakes
    install(dla_cores=1, inspector="myelin")
    record = add_engine(copy_bundle(tiny_bundle, tmp_path), EngineOptions("int8", "8", dla_core=0))
    assert record["placement"]["dla_layers"] == 1 and record["placement"]["gpu_layers"] == 2
    assert record["placement"]["dla_capable_layers"] == 3
    install(dla_cores=1, inspector="names")
    record = add_engine(copy_bundle(tiny_bundle, tmp_path / "n"), EngineOptions("int8", "8", dla_core=0))
    assert record["placement"]["dla_layers"] is None and record["placement"]["inspector"] == "names"


def test_a_corrupt_timing_cache_that_raises_is_replaced_and_a_concurrent_save_is_merged(fakes, tiny_bundle, tmp_path):
    from edgemeta.export import EngineOptions, add_engine
    rec, install = fakes
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"torn")
    # while this build runs, another build on the device saves its own cache to the same file
    install(corrupt_cache=b"torn", during_build=lambda: cache.write_bytes(b"other"))
    messages = []
    add_engine(copy_bundle(tiny_bundle, tmp_path), EngineOptions(timing_cache=str(cache)),
               progress=types.SimpleNamespace(message=messages.append))
    assert any("unreadable (TensorRT: corrupt timing cache)" in m for m in messages) and any("fresh one" in m for m in messages)
    assert ("combine", b"other", True) in rec.calls                 # merged under the lock, not overwritten
    assert cache.read_bytes() == b"cache:+other"


def test_an_int8_freeze_is_int8_in_the_tensorrt_ep_in_triton_and_in_its_engine(fakes, tiny_bundle, tagalog, tmp_path):
    """An INT8 freeze was opened with trt_int8_enable=False, its Triton config had no TensorRT
    accelerator, and its engine was named and recorded as fp32 (recording fakes, not TensorRT)."""
    from edgemeta.export import EngineOptions, add_engine
    from edgemeta.export.freeze import freeze
    from edgemeta.runtime import FewShotClassifier, load_bundle
    from edgemeta.runtime.backends.onnxruntime import tensorrt_ep_options
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s", variant="int8")
    for c in sorted(tagalog)[:3]:
        clf.enroll(c, tagalog[c][:2])
    freeze(tiny_bundle, tmp_path / "s", tmp_path / "f", variant="int8")
    frozen = load_bundle(tmp_path / "f")
    options = tensorrt_ep_options(frozen, "fp32", cache_root=tmp_path / "cache")
    assert options["trt_int8_enable"] is True and options["trt_fp16_enable"] is False
    from test_freeze import triton_config  # Triton's own ModelConfig protobuf
    config = triton_config(tmp_path / "f" / "triton" / "frozen-classifier" / "config.pbtxt")
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and dict(accelerator.parameters) == {"precision_mode": "INT8"}
    rec, install = fakes
    install(outputs=graph_outputs(tmp_path / "f" / "classifier.onnx"))
    with pytest.raises(BundleError, match="--precision int8"):
        add_engine(tmp_path / "f", EngineOptions("fp16", "1:4:16"))
    record = add_engine(tmp_path / "f", EngineOptions("int8", "1:4:16"))
    assert record["precision"] == "int8" and ".int8." in record["file"]
