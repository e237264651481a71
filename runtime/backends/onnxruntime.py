"""ONNX Runtime backend: CPU everywhere; the TensorRT and CUDA providers where they exist."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ..errors import BundleError, ConfigError
from ..preprocess import InputSpec
from .base import MAX_BATCH, Backend
from .registry import BackendKind, BackendRequest, register_backend

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# `--backend onnxruntime:SHORT[,SHORT…]`: e.g. onnxruntime:openvino on an Intel machine with
# onnxruntime-openvino installed (any provider's full name works too)
PROVIDER_NAMES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
                  "openvino": "OpenVINOExecutionProvider", "coreml": "CoreMLExecutionProvider",
                  "dml": "DmlExecutionProvider", "rocm": "ROCMExecutionProvider", "cpu": "CPUExecutionProvider"}
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                           "DmlExecutionProvider", "MIGraphXExecutionProvider"})


@functools.lru_cache(maxsize=1)
def onnxruntime_packages() -> list[str]:
    """The ONNX Runtime distributions installed in this environment (there should be one), from the
    names of their .dist-info folders on sys.path: one folder listing each, where reading every
    installed distribution's metadata cost 70 ms per call — most of a device command's start-up."""
    import sys
    from pathlib import Path
    names = set()
    for entry in sys.path:
        folder = Path(entry or ".")
        if folder.is_dir():
            for info in folder.glob("onnxruntime*.dist-info"):
                name = info.name.split("-")[0].lower().replace("_", "-")  # onnxruntime_gpu-1.20.dist-info
                if not name.startswith("onnxruntime-extensions"):
                    names.add(name)
    return sorted(names)


def check_one_onnxruntime(packages: list[str] | None = None) -> None:
    """onnxruntime and onnxruntime-gpu share one import name: installed together, one silently
    overwrites the other and the GPU providers vanish (onnxruntime#26996). Warn with the fix."""
    packages = onnxruntime_packages() if packages is None else packages
    if len(packages) > 1:
        import warnings
        gpu = next((p for p in packages if p != "onnxruntime"), packages[-1])
        warnings.warn(f"both {' and '.join(packages)} are installed; they cannot share an environment. "
                      f"Keep one: `pip uninstall -y {' '.join(packages)} && pip install {gpu}`", RuntimeWarning, stacklevel=3)


def choose_providers(requested: str | list[str] = "auto", available: list[str] | None = None) -> list[str]:
    """'auto' → the best available of TensorRT EP, CUDA, CPU (in that order, CPU always last);
    'cpu' → CPU only; a list → those, all of which must be available."""
    import onnxruntime as ort
    available = list(available if available is not None else ort.get_available_providers())
    if requested == "auto":
        check_one_onnxruntime()
        return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    wanted = [requested] if isinstance(requested, str) else list(requested)
    missing = [p for p in wanted if p not in available]
    if missing:
        raise ConfigError(f"ONNX Runtime provider(s) {', '.join(missing)} not available here (have: {', '.join(available)})")
    return wanted


def check_graph_io(session, spec: InputSpec, embedding_dim: int, where: Path) -> None:
    """The graph's own input and output shapes must agree with the manifest (an edited manifest
    would otherwise fail inside ONNX Runtime on the first image)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want_in = [None, spec.channels, spec.height, spec.width]
    shape_in = list(inputs[0].shape) if inputs else []
    shape_out = list(outputs[0].shape) if outputs else []
    fixed = lambda dim: isinstance(dim, int) and dim > 0  # noqa: E731  (symbolic or unknown dims are free)
    if len(inputs) != 1 or len(shape_in) != 4 or any(fixed(g) and w is not None and g != w for g, w in zip(shape_in, want_in)):
        raise BundleError(f"{where} takes input {shape_in}, but the manifest says [N, {spec.channels}, {spec.height}, "
                          f"{spec.width}] ({spec.colour}); the manifest does not belong to this model — re-export the bundle")
    if len(shape_out) != 2 or (fixed(shape_out[1]) and shape_out[1] != embedding_dim):
        raise BundleError(f"{where} returns {shape_out}, but the manifest says embeddings of size {embedding_dim}; "
                          "re-export the bundle")


def _tensorrt_version() -> str:
    """TensorRT's version where its Python package is installed (without importing it), else 'none'."""
    from importlib.metadata import PackageNotFoundError, version
    for name in ("tensorrt", "tensorrt-cu12", "tensorrt_cu12", "tensorrt-libs"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "none"


def graph_precision(bundle, variant: str) -> str:
    """The precision of the graph a variant names: a frozen classifier has one graph (its "fp32"
    file), frozen from the variant its manifest records (an INT8 or FP16 freeze is a Q/DQ or
    float16 graph, whatever the file is called)."""
    frozen = bundle.manifest.get("frozen")
    if frozen is None:
        return variant
    source = str(frozen.get("variant", "fp32"))
    return "int8" if source.startswith("int8") else "fp16" if source == "fp16" else "fp32"


def tensorrt_ep_options(bundle, variant: str, cache_root: str | Path | None = None) -> dict:
    """Options for ONNX Runtime's TensorRT execution provider: engine and timing caches (keyed by the
    model's checksum and variant, so a second run does not rebuild for minutes), the profile shapes
    from the bundle's input spec (batch 1…MAX_BATCH, no rebuild per batch size), and the precision of
    the variant (fp16 or INT8 QDQ). The cache folder's name holds the ONNX Runtime and TensorRT
    versions too: an engine built by another version is never picked up."""
    import os

    import onnxruntime as ort
    spec = bundle.spec
    variant = graph_precision(bundle, variant)
    root = Path(cache_root or os.environ.get("EDGEMETA_TRT_CACHE") or Path.home() / ".cache" / "edgemeta" / "trt-ep")
    folder = root / f"{bundle.model_sha256[:16]}-{variant}-ort{ort.__version__}-trt{_tensorrt_version()}"
    shape = lambda n: f"{bundle.input_name}:{n}x{spec.channels}x{spec.height}x{spec.width}"  # noqa: E731
    return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(folder),
            "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(8), "trt_profile_max_shapes": shape(MAX_BATCH),
            "trt_fp16_enable": variant == "fp16", "trt_int8_enable": variant == "int8"}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    optimized_graph: Path | None = None  # the saved optimised graph this session loaded (ort_graph_cache)

    def __init__(self, model_path: str | Path, spec: InputSpec, embedding_dim: int, providers: str | list[str] = "auto",
                 threads: int | None = None, trt_options: dict | None = None, outputs: dict[str, int] | None = None,
                 optimized: bool = False, save_optimized: Path | None = None):
        """outputs: the graph's named outputs and their widths where it has several (a frozen
        classifier's probabilities [N, C] and distance [N]); the first is what embed returns.
        optimized: the graph is one ONNX Runtime already optimised for this machine (loaded with the
        optimisers off); save_optimized: where to write the optimised graph (ort_graph_cache)."""
        import onnxruntime as ort
        super().__init__(spec, embedding_dim if outputs is None else next(iter(outputs.values())))
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if optimized
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        if save_optimized is not None:
            options.optimized_model_filepath = str(save_optimized)
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.providers = choose_providers(providers)
        self.trt_options = dict(trt_options or {})  # what the TensorRT provider gets, where it is present
        trt = "TensorrtExecutionProvider"
        listed = [(p, trt_options) if p == trt and trt_options else p for p in self.providers]
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=listed)
        except Exception as exc:  # onnxruntime raises its own exception types
            if trt not in self.providers or len(self.providers) == 1:
                raise BundleError(f"ONNX Runtime cannot load {model_path}: {exc}") from None
            import warnings
            warnings.warn(f"ONNX Runtime's TensorRT provider failed ({str(exc).splitlines()[0]}); "
                          "using the CUDA/CPU providers", RuntimeWarning, stacklevel=2)
            self.providers = [p for p in self.providers if p != trt]
            try:
                self.session = ort.InferenceSession(str(model_path), options, providers=self.providers)
            except Exception as exc2:
                raise BundleError(f"ONNX Runtime cannot load {model_path}: {exc2}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.model_path = Path(model_path)
        returned = [o.name for o in self.session.get_outputs()]
        self.output_names = list(outputs) if outputs is not None else returned[:1]
        if returned[:len(self.output_names)] != self.output_names:
            raise BundleError(f"{self.model_path} returns {returned}, not {self.output_names}; re-freeze it")
        check_graph_io(self.session, spec, self.embedding_dim, self.model_path)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)

    def run_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every named output of one call (a frozen classifier's probabilities and distance), as the
        TensorRT backend's run_outputs gives them."""
        values = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(self.output_names, values))

    @property
    def on_gpu(self) -> bool:
        return self.session.get_providers()[0] in GPU_PROVIDERS

    def describe(self) -> dict:
        import onnxruntime as ort
        return {"backend": self.name, "model": self.model_path.name, "providers": self.session.get_providers(),
                "onnxruntime_version": ort.__version__,
                "optimized_graph": self.optimized_graph.name if self.optimized_graph else None}  # no host paths


def parse_providers(listed: str) -> list[str]:
    """'openvino,cpu' → ONNX Runtime provider names (short names or full ones), the CPU added last."""
    providers = []
    for short in listed.split(","):
        full = PROVIDER_NAMES.get(short.strip().lower(), short.strip())
        if not full.endswith("ExecutionProvider"):
            raise ConfigError(f"unknown ONNX Runtime provider {short!r}; known: {', '.join(PROVIDER_NAMES)}")
        providers.append(full)
    if "CPUExecutionProvider" not in providers:
        providers.append("CPUExecutionProvider")  # the provider every graph can fall back to
    return providers


def open_onnxruntime(bundle, request: BackendRequest) -> OnnxRuntimeBackend:
    """The bundle's graph for the variant on ONNX Runtime; on a CPU-only provider list the variant's
    CPU graph where it has one (the U8S8 INT8 graph)."""
    providers = choose_providers(request.providers)
    if providers == ["CPUExecutionProvider"]:
        name = bundle.variant_file(request.variant, cpu=True)
        backend = _open_on_cpu(bundle, name, request)
        backend.graph = request.variant if name == bundle.variant_file(request.variant) else f"{request.variant}-cpu"
        return backend
    trt = tensorrt_ep_options(bundle, request.variant) if "TensorrtExecutionProvider" in providers else None
    backend = OnnxRuntimeBackend(bundle.variant_path(request.variant), bundle.spec, bundle.embedding_dim, providers,
                                 request.threads, trt_options=trt, outputs=request.outputs)
    backend.graph = request.variant
    return backend


def _open_on_cpu(bundle, name: str, request: BackendRequest) -> OnnxRuntimeBackend:
    """The CPU provider's session for the bundle's graph `name`: from the graph ONNX Runtime saved,
    optimised, on an earlier run on this machine, else from the bundle's (verified) file, saving the
    optimised graph for the next run."""
    from . import ort_graph_cache as cache
    path = bundle.file(name)  # the bundle's file checked against its sha256 first: a damaged graph is never
    key = cache.graph_key(bundle.manifest["files"][name]["sha256"])  # hidden by its optimised copy
    opened = functools.partial(OnnxRuntimeBackend, spec=bundle.spec, embedding_dim=bundle.embedding_dim,
                               providers=["CPUExecutionProvider"], threads=request.threads, outputs=request.outputs)
    saved = cache.cached_graph(key)
    if saved is not None:
        try:
            backend = opened(saved, optimized=True)
            backend.model_path = bundle.path / name  # what it runs, as the bundle names it
            backend.optimized_graph = saved
            return backend
        except BundleError:
            saved.unlink(missing_ok=True)  # ONNX Runtime refused it: made again below
    target = cache.save_target(key)
    if target is not None:
        try:
            backend = opened(path, save_optimized=target)
        except BundleError:  # the graph is fine but its optimised copy could not be written
            target.unlink(missing_ok=True)
        else:
            cache.keep(target, key)
            return backend
    return opened(path)


def onnxruntime_runs_here(bundle, device: dict) -> dict[str, str]:
    """Every ONNX graph of the bundle, on the providers auto would choose here."""
    import onnxruntime as ort
    providers = ", ".join(p.replace("ExecutionProvider", "") for p in choose_providers("auto"))
    return {v["file"]: f"yes — onnxruntime {ort.__version__} ({providers})" for v in bundle.manifest["variants"].values()}


register_backend(BackendKind(
    "onnxruntime", open_onnxruntime, "ONNX Runtime with the best available provider (TensorRT EP, CUDA, CPU)",
    auto_rank=100, options=f"PROVIDER[,…] ({', '.join(PROVIDER_NAMES)})", parse_options=parse_providers,
    runs_here=onnxruntime_runs_here))
