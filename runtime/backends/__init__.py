"""Backends behind one `embed` interface, and the choice between them for a bundle.

Each backend is a module here that registers itself (runtime/backends/registry.py); importing it
below is what makes it a `--backend` choice. auto: the first registered backend that runs the
bundle here — a TensorRT engine from the bundle that matches this device, otherwise ONNX Runtime
with the best available provider (an engine that does not match is skipped with a warning that says
to rebuild it). `onnxruntime:PROVIDER[,PROVIDER…]` runs ONNX Runtime on the execution providers named
(short names: tensorrt, cuda, openvino, coreml, dml, rocm, cpu — the CPU is always added last).
"""
from __future__ import annotations

import importlib
import pkgutil

from ..bundle import Bundle
from ..device_info import device_identity
from .base import Backend
from .onnxruntime import PROVIDER_NAMES, OnnxRuntimeBackend, choose_providers
from .registry import BACKEND_KINDS, BackendRequest, backend_help, backend_names, open_with, parse_backend
from .tensorrt import matching_engine

# Every module of this folder that registers a backend is imported here: a new backend module needs
# no import line (a forgotten one used to fail nothing).
_SUPPORT = {"base", "registry", "ort_graph_cache"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT:
        importlib.import_module(f"{__name__}.{_module.name}")


def runnable_here(bundle: Bundle, device: dict | None = None) -> dict[str, str]:
    """Which backend on this machine can run which file of the bundle, in words: each registered
    backend says it for the files it runs (BackendKind.runs_here)."""
    device = device if device is not None else device_identity()
    out: dict[str, str] = {}
    for kind in BACKEND_KINDS.values():
        assert kind.runs_here is not None  # register_backend requires it
        for name, said in kind.runs_here(bundle, device).items():
            out[name] = said if name not in out or said.startswith("yes") else out[name]
    return out


def open_backend(bundle: Bundle, backend: str = "auto", variant: str = "fp32", providers: str | list[str] = "auto",
                 threads: int | None = None, device: dict | None = None, outputs: dict[str, int] | None = None,
                 subject: str = "") -> Backend:
    """Open the bundle's network on the backend named (`auto`, a registered name, or NAME:OPTIONS).
    variant "auto": the fastest of the bundle's graphs on this machine (runtime.variant_choice), never
    slower than fp32. outputs: named outputs and their widths (a frozen classifier's)."""
    name, options = parse_backend(backend)
    if name == "onnxruntime" and options is not None:
        providers = options  # `onnxruntime:PROVIDER,…` names them on the command line
    if variant == "auto":
        from ..variant_choice import choose_variant
        variant = choose_variant(bundle, choose_providers(providers))
    request = BackendRequest(variant, options, providers, threads, device, outputs, subject)
    opened = open_with(bundle, name, request)
    opened.graph = opened.graph or variant
    return opened


__all__ = ["BACKEND_KINDS", "PROVIDER_NAMES", "Backend", "OnnxRuntimeBackend", "backend_help", "backend_names",
           "choose_providers", "matching_engine", "open_backend", "parse_backend", "runnable_here"]
