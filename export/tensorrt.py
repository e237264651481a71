"""TensorRT engines from a bundle's ONNX, with the TensorRT 10 Python API (JetPack 6), built on the
device that will run them.

Precision comes from the graph, not from builder flags: the network is created STRONGLY_TYPED and
built from the fp32, fp16 or INT8-QDQ ONNX variant. That is the path TensorRT 10 and 11 share
(weak typing and BuilderFlag.FP16/INT8 are deprecated since 10.12 and removed in 11).

Everything that does not need a GPU — profile parsing, options, the manifest record — is plain
Python and tested; `build_engine` itself needs `tensorrt` and a CUDA device.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from edgemeta.runtime import extras
from edgemeta.runtime.bundle import VARIANTS
from edgemeta.runtime.device_info import device_identity
from edgemeta.runtime.errors import BundleError, ConfigError, DependencyError
from edgemeta.runtime.files import atomic_write

ENGINE_PRECISIONS = VARIANTS  # an engine is built from the ONNX variant of the same name


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the batch axis: min ≤ opt ≤ max."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """'1:8:32' → BatchProfile(1, 8, 32); a single number N means N:N:N."""
        parts = str(text).strip().split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"batch profile {text!r} must be MIN:OPT:MAX integers, e.g. 1:8:32") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise ConfigError(f"batch profile {text!r} must have three parts MIN:OPT:MAX, e.g. 1:8:32")
        lo, opt, hi = values
        if not 1 <= lo <= opt <= hi:
            raise ConfigError(f"batch profile {text!r} needs 1 ≤ MIN ≤ OPT ≤ MAX")
        return cls(lo, opt, hi)

    def shapes(self, channels: int, height: int, width: int) -> tuple[tuple[int, ...], ...]:
        return tuple((b, channels, height, width) for b in (self.min, self.opt, self.max))

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @property
    def static(self) -> bool:
        return self.min == self.opt == self.max

    @property
    def text(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def engine_file_name(precision: str, profile: BatchProfile, device: dict, dla_core: int | None = None) -> str:
    """Engine names say what makes them valid: precision, batch profile, GPU, TensorRT version."""
    gpu = (device.get("gpu_name") or "gpu").lower().replace(" ", "-")
    dla = f".dla{dla_core}" if dla_core is not None else ""
    return f"embed.{precision}.b{profile.min}-{profile.opt}-{profile.max}.{gpu}.trt{device.get('tensorrt_version')}{dla}.engine"


def engine_record(file: str, precision: str, profile: BatchProfile, device: dict, source_sha256: str,
                  dla_core: int | None, workspace_mb: int, build_seconds: float, placement: dict | None = None,
                  tf32: bool | None = None) -> dict:
    """The manifest entry of an engine: everything the runtime checks before using it. Orin modules
    all report "Orin" 8.7, so the SM count and the DLA core count are recorded and compared too."""
    if not device.get("tensorrt_version") or not device.get("compute_capability"):
        raise BundleError("cannot record an engine without the TensorRT version and GPU it was built on")
    # TF32 is TensorRT's default on Ampere/Orin; edgemeta clears it for fp32 builds only
    tf32 = precision != "fp32" if tf32 is None else tf32
    return {"file": file, "precision": precision, "tf32": tf32, "profile": profile.to_dict(),
            "tensorrt_version": device["tensorrt_version"], "gpu_name": device["gpu_name"],
            "compute_capability": device["compute_capability"], "sm_count": device.get("sm_count"),
            "dla_cores": device.get("dla_cores"), "l4t": device.get("l4t"),
            "dla_core": dla_core, "placement": placement, "source_onnx_sha256": source_sha256,
            "workspace_mb": workspace_mb, "build_seconds": round(build_seconds, 1)}


MIN_TENSORRT_MAJOR = 10  # strongly typed networks; JetPack 6.0 ships 8.6, JetPack ≥ 6.1 ships 10.3


def require_tensorrt(trt, purpose: str) -> None:
    """TensorRT ≥ 10 or one clear error (JetPack 6.0's TensorRT 8.6 has no strongly typed networks)."""
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < MIN_TENSORRT_MAJOR:
        raise DependencyError(f"{purpose} needs TensorRT ≥ {MIN_TENSORRT_MAJOR} (JetPack ≥ 6.1, L4T R36.4); "
                              f"this machine has TensorRT {trt.__version__}")


def build_engine(onnx_path: str | Path, engine_path: str | Path, input_name: str, input_shape_chw: tuple[int, int, int],
                 profile: BatchProfile, workspace_mb: int = 1024, timing_cache: str | Path | None = None,
                 dla_core: int | None = None, precision: str = "fp32", log=lambda msg: None) -> dict:
    """Parse the ONNX file, build a serialized engine and write it. Returns the device identity (read
    before the build, so a device problem fails in seconds, not after minutes), the build time and,
    for DLA builds, which layers run on the DLA and which fell back to the GPU."""
    trt = extras.load("tensorrt", "building a TensorRT engine")
    require_tensorrt(trt, "building an engine")
    device = device_identity()
    if not device.get("compute_capability"):
        raise BundleError(f"no usable CUDA device here ({device.get('cuda_error') or 'cuda-python found none'}); "
                          "engines are built on the device that runs them")
    if dla_core is not None:
        if precision == "fp32":
            raise ConfigError("DLA runs fp16 or int8 only: export with --fp16 or --int8 for --dla")
        if not profile.static:
            raise ConfigError(f"DLA engines need a static batch (MIN = OPT = MAX, e.g. --batch 8), not {profile.text}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if dla_core is not None and not 0 <= dla_core < builder.num_DLA_cores:
        raise ConfigError(f"--dla {dla_core}: this device has {builder.num_DLA_cores} DLA core(s)"
                          + (f" (0…{builder.num_DLA_cores - 1})" if builder.num_DLA_cores else " (Jetson AGX/NX Orin have them)"))
    # TensorRT 10.x documents DLA builds only the way trtexec makes them (--useDLACore --fp16/--int8
    # --allowGPUFallback): a weakly typed network with precision flags. Whether 10.x accepts a strongly
    # typed network on the DLA is not documented, so DLA builds follow trtexec; GPU builds are
    # strongly typed (precision from the ONNX variant), the path TensorRT 11 keeps.
    weak_for_dla = dla_core is not None and int(str(trt.__version__).split(".")[0]) == 10
    flags = 0 if weak_for_dla else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BundleError(f"TensorRT could not parse {onnx_path}: " + " | ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # an "fp32" engine really fp32 (TF32 is on by default on Ampere/Orin)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, *profile.shapes(*input_shape_chw))
    config.add_optimization_profile(opt_profile)
    cache_path = Path(timing_cache) if timing_cache else None
    _load_timing_cache(config, cache_path, log)
    dla_capable = None
    if dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        # the inspector reports layer types only at DETAILED verbosity (default: names alone)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if weak_for_dla:
            config.set_flag(trt.BuilderFlag.FP16)
            if precision == "int8":
                config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization from the QDQ graph
            log("DLA build as trtexec does it in TensorRT 10 (weakly typed network, --fp16/--int8 flags)")
        # asked once the precision flags are set: the DLA runs fp16/int8 layers only
        dla_capable = sum(bool(config.can_run_on_DLA(network.get_layer(i))) for i in range(network.num_layers))
    t0 = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"TensorRT failed to build an engine from {onnx_path}; see the log above")
    plan = bytes(serialized)
    atomic_write(engine_path, plan)
    if cache_path is not None:
        _save_timing_cache(config, cache_path, log)
    placement = None
    if dla_core is not None:
        placement = {"network_layers": network.num_layers, "dla_capable_layers": dla_capable,
                     **(_layer_placement(trt, plan, logger, dla_core) or {})}
    return {"device": device, "build_seconds": time.time() - t0, "placement": placement,
            "typing": "weak (trtexec's DLA path)" if weak_for_dla else "strong"}


def _load_timing_cache(config, cache_path: Path | None, log) -> None:
    """Load a timing cache; a stale, corrupt or unreadable one (after a JetPack upgrade, a torn copy)
    is replaced by a fresh cache with a warning, before the build rather than after it — whether
    TensorRT returns None, refuses it, or raises (as Polygraphy's wrappers do)."""
    data = cache_path.read_bytes() if cache_path is not None and cache_path.exists() else b""
    try:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
    except Exception as exc:  # TensorRT's bindings raise their own types
        log(f"timing cache {cache_path} is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    if data:
        log(f"timing cache {cache_path} does not fit this TensorRT or device; building with a fresh one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BundleError("TensorRT could not create a timing cache")


def _save_timing_cache(config, cache_path: Path, log) -> None:
    """Save the timing cache atomically, under a lock: two builds may share one cache file, so what
    another build saved meanwhile is merged in (ITimingCache.combine), never overwritten. Only a
    real, non-empty cache is written."""
    cache = config.get_timing_cache()
    if cache is None or not bytes(cache.serialize()):
        log("TensorRT returned an empty timing cache; nothing saved")
        return
    import fcntl
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_path.with_name(cache_path.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if cache_path.exists():
            try:
                saved = config.create_timing_cache(cache_path.read_bytes())
                if saved is not None:
                    # ignore_mismatch=True: TensorRT merges the saved cache into this one even when it was
                    # made on another device or TensorRT version (it does not skip such entries), so
                    # a timing cache file is meant for one device (docs/jetson.md)
                    cache.combine(saved, True)
            except Exception as exc:
                log(f"the timing cache saved meanwhile at {cache_path} could not be merged ({exc}); replacing it")
        atomic_write(cache_path, bytes(cache.serialize()))


def _layer_placement(trt, plan: bytes, logger, dla_core: int) -> dict | None:
    """Which engine layers run on the DLA, from the engine inspector: at DETAILED verbosity each
    layer is an object whose LayerType says where it runs (trusted alone: a GPU Myelin subgraph is a
    `{ForeignNode[...]}` too). At the default verbosity only names are given and placement is not
    known (dla_layers None). None where there is no inspector."""
    import json
    runtime = trt.Runtime(logger)
    runtime.DLA_core = dla_core
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None or not hasattr(engine, "create_engine_inspector"):
        return None
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", [])

    if not layers or not all(isinstance(layer, dict) for layer in layers):
        return {"dla_layers": None, "gpu_layers": None, "layers": len(layers), "inspector": "names"}
    dla = sum("DLA" in str(layer.get("LayerType", "")) for layer in layers)
    return {"dla_layers": dla, "gpu_layers": len(layers) - dla, "layers": len(layers), "inspector": "detailed"}
