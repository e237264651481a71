"""Backends behind one `embed` interface, and the choice between them for a bundle.

auto: a TensorRT engine from the bundle that matches this device; otherwise ONNX Runtime with the
best available provider (a mismatching engine is skipped with a warning that says to rebuild it).
`onnxruntime:PROVIDER[,PROVIDER…]` runs ONNX Runtime on the execution providers named (short
names: tensorrt, cuda, openvino, coreml, dml, rocm, cpu — the CPU is always added last), e.g.
`--backend onnxruntime:openvino` on an Intel machine with onnxruntime-openvino installed.
"""
from __future__ import annotations

import warnings

from ..bundle import Bundle
from ..device_info import device_identity, engine_mismatches, rebuild_hint
from ..errors import BundleError, ConfigError, DependencyError
from .base import Backend
from .onnxruntime import OnnxRuntimeBackend, choose_providers, tensorrt_ep_options

BACKENDS = ("auto", "onnxruntime", "tensorrt")  # and onnxruntime:PROVIDER[,…]
PROVIDER_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider",
                  "dml": "DmlExecutionProvider", "rocm": "ROCMExecutionProvider", "cpu": "CPUExecutionProvider"}


def parse_backend(text: str) -> tuple[str, str | list[str]]:
    """'auto' | 'onnxruntime' | 'tensorrt' | 'onnxruntime:openvino,cpu' → (backend, providers)."""
    if text in BACKENDS:
        return text, "auto"
    name, _, listed = text.partition(":")
    if name != "onnxruntime" or not listed:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)} or onnxruntime:PROVIDER[,…] "
                          f"({', '.join(PROVIDER_NAMES)}), not {text!r}")
    providers = []
    for short in listed.split(","):
        full = PROVIDER_NAMES.get(short.strip().lower(), short.strip())
        if not full.endswith("ExecutionProvider"):
            raise ConfigError(f"unknown ONNX Runtime provider {short!r}; known: {', '.join(PROVIDER_NAMES)}")
        providers.append(full)
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")  # the provider every graph can fall back to
    return "onnxruntime", providers


def matching_engine(bundle: Bundle, device: dict | None = None, precision: str | None = None) -> tuple[dict | None, list[str]]:
    """The first engine record valid on this device (optionally of one precision), and the reasons
    the others are not."""
    device = device if device is not None else device_identity()
    reasons = []
    for engine in bundle.engines:
        if precision and engine["precision"] != precision:
            continue
        why = engine_mismatches(engine, device)
        if not why:
            return engine, []
        reasons.append(f"{engine['file']}: {'; '.join(why)}")
    return None, reasons


def runnable_here(bundle: Bundle, device: dict | None = None) -> dict[str, str]:
    """Which backend on this machine can run which file of the bundle, in words."""
    import onnxruntime as ort
    providers = ", ".join(p.replace("ExecutionProvider", "") for p in choose_providers("auto"))
    out = {v["file"]: f"yes — onnxruntime {ort.__version__} ({providers})" for v in bundle.manifest["variants"].values()}
    device = device if device is not None else device_identity()
    for e in bundle.engines:
        why = engine_mismatches(e, device)
        out[e["file"]] = "yes — tensorrt" if not why else "no — " + "; ".join(why) + f" ({rebuild_hint(bundle.path)})"
    return out


def open_engine(bundle: Bundle, backend: str = "auto", variant: str = "fp32", device: dict | None = None,
                named_outputs: dict[str, int] | None = None, subject: str = "", stacklevel: int = 3):
    """The bundle's TensorRT engine for `variant` on this device, or None where ONNX Runtime should
    run instead: backend "onnxruntime", or "auto" with no engine that matches and loads (a warning
    says why). backend "tensorrt" raises instead of falling back. named_outputs: see TensorRTBackend."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "onnxruntime" or (backend == "auto" and not bundle.engines):
        return None
    engine, reasons = matching_engine(bundle, device, precision=variant)  # an fp16 engine never serves fp32
    if engine is not None:
        from .tensorrt import TensorRTBackend
        dim = sum(named_outputs.values()) if named_outputs else bundle.embedding_dim
        try:
            return TensorRTBackend(bundle.path / engine["file"], bundle.spec, dim, dla_core=engine.get("dla_core"),
                                   precision=engine["precision"], named_outputs=named_outputs)
        except (BundleError, DependencyError, MemoryError) as exc:
            if backend == "tensorrt":
                raise
            reasons = [f"{engine['file']} matches but did not load: {exc}"]
    message = (f"no {subject or f'{variant} TensorRT engine in this bundle runs on this device'}: "
               + (" | ".join(reasons) or "the bundle has none") + f"; {rebuild_hint(bundle.path)}")
    if backend == "tensorrt":
        raise BundleError(message)
    warnings.warn(message + ". Falling back to ONNX Runtime.", RuntimeWarning, stacklevel=stacklevel)
    return None


def open_backend(bundle: Bundle, backend: str = "auto", variant: str = "fp32", providers: str | list[str] = "auto",
                 threads: int | None = None, device: dict | None = None) -> Backend:
    """Open the bundle's embedding network on the requested backend. variant "auto": the fastest of
    the bundle's graphs on this machine (runtime.variant_choice), never slower than fp32."""
    backend, named = parse_backend(backend)
    if named != "auto":
        providers = named
    if variant == "auto":
        from ..variant_choice import choose_variant
        variant = choose_variant(bundle, choose_providers(providers))
    engine = open_engine(bundle, backend, variant, device)
    if engine is not None:
        engine.graph = variant
        return engine
    on_cpu = choose_providers(providers) == ["CPUExecutionProvider"]  # the CPU graph where the variant has one
    path = bundle.variant_path(variant, cpu=on_cpu)
    ort_backend = OnnxRuntimeBackend(path, bundle.spec, bundle.embedding_dim, providers, threads,
                                     trt_options=tensorrt_ep_options(bundle, variant))
    ort_backend.graph = f"{variant}-cpu" if path != bundle.variant_path(variant) else variant
    return ort_backend


__all__ = ["BACKENDS", "PROVIDER_NAMES", "parse_backend", "Backend", "OnnxRuntimeBackend", "choose_providers", "matching_engine", "open_backend", "open_engine",
           "runnable_here"]
