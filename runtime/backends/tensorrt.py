"""TensorRT 10 backend: deserialize the engine, one execution context, named I/O tensors
(`set_input_shape`, `set_tensor_address`, `execute_async_v3`) on a CUDA stream through cuda-python.
Pinned host buffers and device buffers are sized once for the profile's max batch and reused;
larger inputs run in chunks, smaller than the profile's min are zero-padded."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .. import extras
from ..errors import BundleError, DependencyError
from ..preprocess import InputSpec
from .base import Backend
from .registry import BackendKind, BackendRequest, BackendUnavailable, register_backend


def plan_chunks(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """Split n images into (start, stop, run_size) chunks the engine's profile accepts: at most
    max_batch each, and run_size ≥ min_batch (the chunk is zero-padded up to it)."""
    if n < 0 or not 1 <= min_batch <= max_batch:
        raise ValueError(f"bad chunk request n={n} profile={min_batch}:{max_batch}")
    chunks = []
    for start in range(0, n, max_batch):
        stop = min(start + max_batch, n)
        chunks.append((start, stop, max(stop - start, min_batch)))
    return chunks


def _cudart():
    return extras.cudart("the TensorRT backend")


def native_handle(obj) -> int:
    """The address a CUDA object (a cudaStream_t) wraps, for TensorRT's execute_async_v3. cuda-python
    ≥ 12.8 has an accessor for it and deprecates int(obj); 12.6 (JetPack 6.1/6.2's) has only int()."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BundleError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (rest or None)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, engine_path: str | Path, spec: InputSpec, embedding_dim: int, dla_core: int | None = None,
                 precision: str | None = None, named_outputs: dict[str, int] | None = None):
        trt = extras.load("tensorrt", "the TensorRT backend")
        from edgemeta.runtime.device_info import rebuild_hint
        major = int(str(trt.__version__).split(".")[0] or 0)
        if major < 10:
            raise BundleError(f"the TensorRT backend needs TensorRT ≥ 10 (JetPack ≥ 6.1); this is {trt.__version__}")
        super().__init__(spec, embedding_dim)
        self.precision, self.dla_core, self.squeeze = precision, dla_core, named_outputs is not None
        self._cudart = cudart = _cudart()
        self.engine_path = Path(engine_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if dla_core is not None:
            self._runtime.DLA_core = dla_core  # before deserialising, as trtexec does (the default is −1)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {engine_path}; {rebuild_hint(self.engine_path.parent)}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BundleError(f"TensorRT could not create an execution context for {engine_path} (out of device memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        # what each output row holds: an embedding bundle has one output [N, D]; a frozen classifier
        # has probabilities [N, C] and distance [N]
        expected: dict[str, int] = dict(named_outputs) if named_outputs else \
            {outputs[0] if len(outputs) == 1 else "?": embedding_dim}
        if len(inputs) != 1 or sorted(outputs) != sorted(expected):
            raise BundleError(f"expected one input and the outputs {sorted(expected)}, engine has {inputs} → {outputs}")
        self.input_name, self.output_names = inputs[0], list(expected)
        self.output_name = self.output_names[0]
        for name in (self.input_name, *self.output_names):  # buffers below are float32: say so if they are not
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            if dtype != np.float32:
                raise BundleError(f"engine tensor {name!r} is {dtype}, edgemeta feeds and reads float32; "
                                  "export the model with float32 inputs and outputs")
        self._row = {}
        for name, width in expected.items():
            shape = tuple(self.engine.get_tensor_shape(name))
            row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            if len(shape) > 2 or (shape[1:] and shape[1] > 0 and row != width):
                raise BundleError(f"engine output {name!r} is {shape}, the manifest says [N, {width}]")
            self._row[name] = width
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self._chw = spec.channels * spec.height * spec.width
        in_bytes = self.max_batch * self._chw * 4
        self._stream = _check(cudart.cudaStreamCreate())
        self._d_in = _check(cudart.cudaMalloc(in_bytes))
        self._h_in_ptr = _check(cudart.cudaMallocHost(in_bytes))
        self._h_in = np.ctypeslib.as_array((ctypes.c_float * (in_bytes // 4)).from_address(int(self._h_in_ptr)))
        self.context.set_tensor_address(self.input_name, int(self._d_in))
        self._d_out, self._h_out_ptr, self._h_out = {}, {}, {}
        for name, width in self._row.items():
            out_bytes = self.max_batch * width * 4
            self._d_out[name] = _check(cudart.cudaMalloc(out_bytes))
            self._h_out_ptr[name] = _check(cudart.cudaMallocHost(out_bytes))
            self._h_out[name] = np.ctypeslib.as_array((ctypes.c_float * (out_bytes // 4)).from_address(int(self._h_out_ptr[name])))
            self.context.set_tensor_address(name, int(self._d_out[name]))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_outputs(batch)[self.output_name]

    def run_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output for float32 NCHW pixels: {name: [N, width]} (width 1 squeezed to [N])."""
        cudart = self._cudart
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        out = {name: np.empty((len(batch), w), np.float32) for name, w in self._row.items()}
        for start, stop, size in plan_chunks(len(batch), self.min_batch, self.max_batch):
            n = stop - start
            self._h_in[: n * self._chw] = batch[start:stop].reshape(-1)
            self._h_in[n * self._chw: size * self._chw] = 0.0
            shape = (size, self.spec.channels, self.spec.height, self.spec.width)
            if not self.context.set_input_shape(self.input_name, shape):
                raise BundleError(f"TensorRT refused input shape {shape} for {self.input_name!r} "
                                  f"(profile batch {self.min_batch}…{self.max_batch})")
            _check(cudart.cudaMemcpyAsync(self._d_in, self._h_in_ptr, size * self._chw * 4,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
            if not self.context.execute_async_v3(native_handle(self._stream)):
                raise BundleError("TensorRT execution failed")
            for name, w in self._row.items():
                _check(cudart.cudaMemcpyAsync(self._h_out_ptr[name], self._d_out[name], size * w * 4,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
            _check(cudart.cudaStreamSynchronize(self._stream))
            for name, w in self._row.items():
                out[name][start:stop] = self._h_out[name][: n * w].reshape(n, w)
        if self.squeeze:  # named outputs of width 1 (a frozen classifier's distance) come back as [N]
            return {name: v[:, 0] if self._row[name] == 1 else v for name, v in out.items()}
        return out

    def close(self) -> None:
        cudart = self._cudart
        device = [getattr(self, "_d_in", None), *getattr(self, "_d_out", {}).values()]
        host = [getattr(self, "_h_in_ptr", None), *getattr(self, "_h_out_ptr", {}).values()]
        for ptr in device:
            if ptr is not None:
                cudart.cudaFree(ptr)
        for ptr in host:
            if ptr is not None:
                cudart.cudaFreeHost(ptr)
        self._d_in = self._h_in_ptr = None
        self._d_out, self._h_out_ptr = {}, {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    @property
    def on_gpu(self) -> bool:
        return True

    def describe(self) -> dict:
        import tensorrt as trt
        return {"backend": self.name, "engine": self.engine_path.name, "tensorrt_version": trt.__version__,
                "precision": self.precision, "dla_core": self.dla_core, "profile": [self.min_batch, self.max_batch]}


def matching_engine(bundle, device: dict | None = None, precision: str | None = None) -> tuple[dict | None, list[str]]:
    """The first engine record valid on this device (optionally of one precision), and the reasons
    the others are not."""
    from ..device_info import device_identity, engine_mismatches
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


def open_tensorrt(bundle, request: BackendRequest) -> TensorRTBackend:
    """The bundle's engine of the variant's precision that matches this device (an fp16 engine never
    serves fp32). Unavailable, quietly for `auto`, where the bundle has no engine at all."""
    from ..device_info import rebuild_hint
    subject = request.subject or f"{request.variant} TensorRT engine in this bundle runs on this device"
    if not bundle.engines:  # before reading the device's identity (cuda-python, package metadata)
        raise BackendUnavailable(f"no {subject}: the bundle has none; {rebuild_hint(bundle.path)}", quiet=True)
    engine, reasons = matching_engine(bundle, request.device, precision=request.variant)
    if engine is not None:
        dim = sum(request.outputs.values()) if request.outputs else bundle.embedding_dim
        try:
            return TensorRTBackend(bundle.file(engine["file"]), bundle.spec, dim, dla_core=engine.get("dla_core"),
                                   precision=engine["precision"], named_outputs=request.outputs)
        except (BundleError, DependencyError, MemoryError) as exc:
            raise BackendUnavailable(f"no {subject}: {engine['file']} matches but did not load: {exc}; "
                                     f"{rebuild_hint(bundle.path)}", cause=exc) from None
    raise BackendUnavailable(f"no {subject}: {' | '.join(reasons) or 'none of its precision'}; {rebuild_hint(bundle.path)}")


def tensorrt_runs_here(bundle, device: dict) -> dict[str, str]:
    """Each engine of the bundle: whether it was built for this device, or what differs."""
    from ..device_info import engine_mismatches, rebuild_hint
    out = {}
    for e in bundle.engines:
        why = engine_mismatches(e, device)
        out[e["file"]] = "yes — tensorrt" if not why else "no — " + "; ".join(why) + f" ({rebuild_hint(bundle.path)})"
    return out


register_backend(BackendKind("tensorrt", open_tensorrt, "a TensorRT engine of the bundle built on this device "
                             "(`edgemeta build-engine`)", auto_rank=0, runs_here=tensorrt_runs_here))
