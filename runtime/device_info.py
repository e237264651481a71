"""What this device is (TensorRT version, GPU, compute capability, Jetson L4T release) and whether
a TensorRT engine built elsewhere may run here. Engines are only valid on the device, TensorRT
version and L4T release they were built for; everything here but the probing is pure and tested."""
from __future__ import annotations

import functools
import re
from pathlib import Path

L4T_RELEASE_FILE = Path("/etc/nv_tegra_release")


def parse_l4t_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 3.0, GCID: …' → '36.3.0' (the format of /etc/nv_tegra_release)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def l4t_release() -> str | None:
    try:
        return parse_l4t_release(L4T_RELEASE_FILE.read_text())
    except OSError:
        return None


def cuda_device() -> dict:
    """GPU name, compute capability and SM count via cuda-python; where there is none, None values
    and `cuda_error` saying why (cuda-python missing, a driver error, no device) — not silence."""
    none = {"gpu_name": None, "compute_capability": None, "sm_count": None}
    try:
        from .extras import cudart as load_cudart
        cudart = load_cudart("reading the GPU's identity")
    except Exception as exc:
        return {**none, "cuda_error": str(exc)}
    try:
        err, props = cudart.cudaGetDeviceProperties(0)
    except Exception as exc:  # a cuda-python built for another CUDA major version fails here
        return {**none, "cuda_error": f"cuda-python could not query the GPU: {exc}"}
    if int(err) != 0:
        return {**none, "cuda_error": f"CUDA error {err} reading device 0 (driver, or no GPU)"}
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return {"gpu_name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": int(getattr(props, "multiProcessorCount", 0)) or None}


def dla_cores() -> int | None:
    """DLA cores TensorRT can use here (Jetson AGX/NX Orin: 1–2; elsewhere 0), None without TensorRT."""
    try:
        import tensorrt as trt
        return int(trt.Runtime(trt.Logger(trt.Logger.ERROR)).num_DLA_cores)
    except Exception:
        return None


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except Exception:
        return None
    return tensorrt.__version__


def device_identity() -> dict:
    """Everything an engine's validity depends on, read from this machine (None where absent)."""
    version = tensorrt_version()
    return {"tensorrt_version": version, **cuda_device(), "dla_cores": dla_cores() if version else None,
            "l4t": l4t_release()}


def engine_mismatches(engine: dict, device: dict) -> list[str]:
    """Reasons an engine record (from a manifest) cannot run on this device; empty if it can.

    TensorRT engines are tied to the exact TensorRT version (serialised plans are not portable
    across versions), the GPU model's compute capability, and on Jetson the L4T release.
    """
    reasons = []
    if device.get("tensorrt_version") is None:
        reasons.append("TensorRT is not installed here")
    elif engine["tensorrt_version"] != device["tensorrt_version"]:
        reasons.append(f"built with TensorRT {engine['tensorrt_version']}, this device has {device['tensorrt_version']}")
    if device.get("compute_capability") is None:
        reasons.append("no CUDA device here" + (f" ({device['cuda_error']})" if device.get("cuda_error") else ""))
    else:
        if engine["compute_capability"] != device["compute_capability"]:
            reasons.append(f"built for compute capability {engine['compute_capability']} ({engine['gpu_name']}), "
                           f"this GPU is {device['compute_capability']} ({device['gpu_name']})")
        elif engine["gpu_name"] != device["gpu_name"]:
            reasons.append(f"built on {engine['gpu_name']}, this GPU is {device['gpu_name']}")
    if engine.get("sm_count") and device.get("sm_count") and engine["sm_count"] != device["sm_count"]:
        reasons.append(f"built on a {engine['gpu_name']} with {engine['sm_count']} SMs, this one has {device['sm_count']}")
    if engine.get("dla_core") is not None and device.get("dla_cores") is not None \
            and engine["dla_core"] >= device["dla_cores"]:
        reasons.append(f"built for DLA core {engine['dla_core']}, this device has {device['dla_cores']} DLA core(s)")
    if engine.get("l4t") and device.get("l4t") and engine["l4t"] != device["l4t"]:
        reasons.append(f"built on L4T {engine['l4t']}, this device runs L4T {device['l4t']}")
    return reasons


def rebuild_hint(bundle: str | Path) -> str:
    return f"rebuild it on this device with `edgemeta build-engine {bundle}`"


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo() -> str:
    """/proc/cpuinfo, read once per process (the CPU does not change under it)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpuinfo_fields(cpuinfo: str | None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (or of the text given), keys in lower case."""
    text = _proc_cpuinfo() if cpuinfo is None else cpuinfo
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_features(cpuinfo: str | None = None) -> str:
    """The instruction-set extensions the CPU reports (x86 "flags", Arm "Features"), sorted: two
    machines of one model name can differ here (a hypervisor may hide AVX-512)."""
    fields = _cpuinfo_fields(cpuinfo)
    return " ".join(sorted((fields.get("flags") or fields.get("features") or "").split()))


def machine_key(*parts: str) -> str:
    """A short hash of `parts` with this machine's identity — the CPU's model and instruction-set
    flags, ONNX Runtime's version: what a measurement or an optimised graph made here is valid for."""
    import hashlib

    import onnxruntime as ort
    text = "|".join([*parts, cpu_model(), cpu_features(), ort.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (x86: "model name", Arm: "Hardware" in /proc/cpuinfo), else platform's.

    On x86 the family and model numbers follow it: virtual machines often report a bare "AMD EPYC",
    and the family (25: Zen 3/4, 26: Zen 5) is what tells one such machine from another."""
    import platform
    fields = _cpuinfo_fields(cpuinfo)
    name = fields.get("model name") or fields.get("hardware")
    if not name:
        return platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name
