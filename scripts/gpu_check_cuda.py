"""The GPU check for an x86 CUDA machine without TensorRT (a lent accelerator), one JSON of results.

What it checks, each where the machine has what it needs (otherwise the check says why it was
skipped — never a silent pass):

- cuda-bindings: edgemeta's device identity (runtime.device_info.cuda_device) and the device
  buffers and stream the TensorRT backend uses (cudaMalloc / cudaMallocHost / cudaMemcpyAsync on a
  stream created through runtime.backends.tensorrt's helpers): a host → device → host round trip
  must return the same bytes;
- onnxruntime-gpu's CUDA provider: the bundle's fp32 and FP16 graphs and the frozen classifier on
  the CUDA provider against the CPU provider's fp32 (labels equal, cosine of the embeddings, largest
  error), on real drawings.

Prepare the folder here (the training extra): `bash scripts/gpu_check_workstation.sh build/gpu-check`
(an Omniglot bundle with INT8 and FP16 variants, a store, a frozen classifier and reference
embeddings, under 10 MB). On the GPU machine, no install and no network:

    python scripts/gpu_check_cuda.py build/gpu-check OUT/gpu-check.json

The repository's edgemeta is imported from the source tree (no install); numpy and onnxruntime(-gpu)
must be on the machine, cuda-bindings (cuda-python) for the first check.
"""
from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_source_tree() -> None:
    """`edgemeta` and `edgemeta.runtime` from this checkout, as the installed package lays them out
    (runtime/ is edgemeta.runtime), without installing anything."""
    if "edgemeta" in sys.modules:
        return
    for name, folder in (("edgemeta", ROOT / "edgemeta"), ("edgemeta.runtime", ROOT / "runtime")):
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if name == "edgemeta.runtime":
            sys.modules["edgemeta"].runtime = module  # type: ignore[attr-defined]


class Skip(Exception):
    """What a check needs is not on this machine (said in the results, not counted as a failure)."""


def check(results: dict, name: str):
    """Run one check into results[name]: its dict, or the exception that stopped it."""
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except Skip as exc:
            out = {"ok": False, "skipped": str(exc)}
        except Exception as exc:  # a check that cannot run says why; the others still run
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}
        out["seconds"] = round(time.perf_counter() - t0, 3)
        results[name] = out
        return fn
    return wrap


def cosine(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float((np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)).min())


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.split("\n\n")[0])
        print("usage: python scripts/gpu_check_cuda.py PREPARED_FOLDER OUT.json")
        return 2
    prepared, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    import_source_tree()
    import numpy as np
    results: dict = {"machine": {"python": platform.python_version(), "platform": platform.platform()}, "checks": {}}
    checks = results["checks"]

    @check(checks, "cuda_device_identity")
    def _identity():
        from edgemeta.runtime.device_info import cuda_device
        device = cuda_device()
        results["machine"]["gpu"] = device
        if device.get("compute_capability") is None:
            raise Skip(device.get("cuda_error", "no CUDA device"))
        return {"ok": True, **device}

    @check(checks, "cuda_buffers_round_trip")
    def _buffers():
        from edgemeta.runtime.backends.tensorrt import _check, _cudart, native_handle
        from edgemeta.runtime.errors import DependencyError
        try:
            cudart = _cudart()
        except DependencyError as exc:
            raise Skip(str(exc)) from None
        data = np.random.default_rng(0).normal(size=(64, 1, 28, 28)).astype(np.float32)
        stream = _check(cudart.cudaStreamCreate())
        d = _check(cudart.cudaMalloc(data.nbytes))
        h = _check(cudart.cudaMallocHost(data.nbytes))
        try:
            host = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_float * data.size).from_address(int(h)))
            host[:] = data.ravel()
            _check(cudart.cudaMemcpyAsync(d, h, data.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
            host[:] = 0
            _check(cudart.cudaMemcpyAsync(h, d, data.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
            _check(cudart.cudaStreamSynchronize(stream))
            same = bool(np.array_equal(host.reshape(data.shape), data))
            return {"ok": same, "bytes": int(data.nbytes), "stream_handle_nonzero": native_handle(stream) != 0}
        finally:
            cudart.cudaFree(d)
            cudart.cudaFreeHost(h)
            cudart.cudaStreamDestroy(stream)

    def cuda_provider_or_skip():
        import onnxruntime as ort
        results["machine"]["onnxruntime"] = ort.__version__
        results["machine"]["providers"] = ort.get_available_providers()
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip(f"onnxruntime {ort.__version__} has no CUDA provider here (install onnxruntime-gpu)")

    reference = np.load(prepared / "reference.npz")
    pixels, ref = reference["pixels"], reference["embeddings"]

    for variant in ("fp32", "fp16"):
        @check(checks, f"cuda_ep_{variant}_embeddings")
        def _embed(variant=variant):
            cuda_provider_or_skip()
            from edgemeta.runtime import FewShotClassifier
            cpu = FewShotClassifier.load(prepared / "bundle", store=prepared / "store", backend="onnxruntime:cpu")
            gpu = FewShotClassifier.load(prepared / "bundle", store=prepared / "store", backend="onnxruntime:cuda",
                                         variant=variant)
            z = gpu.embed(pixels)
            want, got = cpu.predict(pixels, top_k=1), gpu.predict(pixels, top_k=1)
            agree = float(np.mean([a == b for a, b in zip(want.labels, got.labels)]))
            return {"ok": agree >= (1.0 if variant == "fp32" else 0.95) and cosine(z, ref) > 0.999,
                    "providers": gpu.backend.describe().get("providers"), "labels_equal": agree,
                    "min_cosine": cosine(z, ref), "max_abs_error": float(np.abs(z - ref).max()), "images": int(len(pixels))}

    @check(checks, "cuda_ep_frozen_classifier")
    def _frozen():
        cuda_provider_or_skip()
        from edgemeta.runtime.frozen import FrozenClassifier
        cpu = FrozenClassifier.load(prepared / "frozen", backend="onnxruntime:cpu")
        gpu = FrozenClassifier.load(prepared / "frozen", backend="onnxruntime:cuda")
        want, got = cpu.predict(pixels, top_k=1, reject="auto"), gpu.predict(pixels, top_k=1, reject="auto")
        agree = float(np.mean([a == b for a, b in zip(want.labels, got.labels)]))
        return {"ok": agree == 1.0, "labels_equal": agree,
                "max_probability_error": float(np.abs(want.probabilities - got.probabilities).max()),
                "max_distance_error": float(np.abs(want.distances - got.distances).max())}

    results["ok"] = all(c.get("ok") for c in checks.values() if "skipped" not in c)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for name, c in checks.items():
        print(f"{name:32s} {'ok' if c.get('ok') else 'SKIPPED' if 'skipped' in c else 'FAILED'}"
              f"  {c.get('skipped') or c.get('error') or ''}")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
