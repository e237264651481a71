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
from edgemeta.runtime.errors import BundleError, ConfigError

ENGINE_PRECISIONS = VARIANTS  # an engine is built from the ONNX variant of the same name


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the batch axis: min ≤ opt ≤ max."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
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


def engine_file_name(precision: str, profile: BatchProfile, device: dict, dla_core: int | None = None) -> str:
    """Engine names say what makes them valid: precision, batch profile, GPU, TensorRT version."""
    gpu = (device.get("gpu_name") or "gpu").lower().replace(" ", "-")
    dla = f".dla{dla_core}" if dla_core is not None else ""
    return f"embed.{precision}.b{profile.min}-{profile.opt}-{profile.max}.{gpu}.trt{device.get('tensorrt_version')}{dla}.engine"


def engine_record(file: str, precision: str, profile: BatchProfile, device: dict, source_sha256: str,
                  dla_core: int | None, workspace_mb: int, build_seconds: float) -> dict:
    """The manifest entry of an engine: everything the runtime checks before using it."""
    if not device.get("tensorrt_version") or not device.get("compute_capability"):
        raise BundleError("cannot record an engine without the TensorRT version and GPU it was built on")
    return {"file": file, "precision": precision, "profile": profile.to_dict(),
            "tensorrt_version": device["tensorrt_version"], "gpu_name": device["gpu_name"],
            "compute_capability": device["compute_capability"], "l4t": device.get("l4t"),
            "dla_core": dla_core, "source_onnx_sha256": source_sha256, "workspace_mb": workspace_mb,
            "build_seconds": round(build_seconds, 1)}


def build_engine(onnx_path: str | Path, engine_path: str | Path, input_name: str, input_shape_chw: tuple[int, int, int],
                 profile: BatchProfile, workspace_mb: int = 1024, timing_cache: str | Path | None = None,
                 dla_core: int | None = None, precision: str = "fp32") -> dict:
    """Parse the ONNX file, build a serialized engine and write it. Returns the device identity and
    build time. Every parser error is reported; the timing cache is loaded and saved back."""
    trt = extras.load("tensorrt", "building a TensorRT engine")
    if dla_core is not None and precision == "fp32":
        raise ConfigError("DLA runs fp16 or int8 only: export with --fp16 or --int8 for --dla")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BundleError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(input_name, *profile.shapes(*input_shape_chw))
    config.add_optimization_profile(opt_profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if dla_core is not None:
        if builder.num_DLA_cores == 0:
            raise ConfigError("--dla asked for, but this device has no DLA cores (Jetson Xavier / Orin have them)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    t0 = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError(f"TensorRT failed to build an engine from {onnx_path}; see the log above")
    Path(engine_path).write_bytes(bytes(serialized))
    if cache_path is not None:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"device": device_identity(), "build_seconds": time.time() - t0}
