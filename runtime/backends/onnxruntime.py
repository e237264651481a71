"""ONNX Runtime backend: CPU everywhere; the TensorRT and CUDA providers where they exist."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BundleError, ConfigError
from ..preprocess import InputSpec
from .base import Backend

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(requested: str | list[str] = "auto", available: list[str] | None = None) -> list[str]:
    """'auto' → the best available of TensorRT EP, CUDA, CPU (in that order, CPU always last);
    'cpu' → CPU only; a list → those, all of which must be available."""
    import onnxruntime as ort
    available = list(available if available is not None else ort.get_available_providers())
    if requested == "auto":
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


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model_path: str | Path, spec: InputSpec, embedding_dim: int, providers: str | list[str] = "auto",
                 threads: int | None = None):
        import onnxruntime as ort
        super().__init__(spec, embedding_dim)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.providers = choose_providers(providers)
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"ONNX Runtime cannot load {model_path}: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.model_path = Path(model_path)
        check_graph_io(self.session, spec, embedding_dim, self.model_path)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)

    def describe(self) -> dict:
        import onnxruntime as ort
        return {"backend": self.name, "model": self.model_path.name, "providers": self.session.get_providers(),
                "onnxruntime_version": ort.__version__}
