"""What this device is (TensorRT version, GPU, compute capability, Jetson L4T release) and whether
a TensorRT engine built elsewhere may run here. Engines are only valid on the device, TensorRT
version and L4T release they were built for; everything here but the probing is pure and tested."""
from __future__ import annotations

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


def cuda_device() -> dict | None:
    """GPU name and compute capability via cuda-python, or None when there is no CUDA device."""
    try:
        from .extras import cudart as load_cudart
        cudart = load_cudart("reading the GPU's identity")
        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) != 0:
            return None
        name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
        return {"gpu_name": name.rstrip("\x00"), "compute_capability": f"{props.major}.{props.minor}"}
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
    gpu = cuda_device() or {"gpu_name": None, "compute_capability": None}
    return {"tensorrt_version": tensorrt_version(), **gpu, "l4t": l4t_release()}


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
        reasons.append("no CUDA device here")
    else:
        if engine["compute_capability"] != device["compute_capability"]:
            reasons.append(f"built for compute capability {engine['compute_capability']} ({engine['gpu_name']}), "
                           f"this GPU is {device['compute_capability']} ({device['gpu_name']})")
        elif engine["gpu_name"] != device["gpu_name"]:
            reasons.append(f"built on {engine['gpu_name']}, this GPU is {device['gpu_name']}")
    if engine.get("l4t") and device.get("l4t") and engine["l4t"] != device["l4t"]:
        reasons.append(f"built on L4T {engine['l4t']}, this device runs L4T {device['l4t']}")
    return reasons


def rebuild_hint(bundle: str | Path) -> str:
    return f"rebuild it on this device with `edgemeta build-engine {bundle}`"


def cpu_model() -> str:
    """The CPU's model name (x86: "model name", Arm: "Hardware" in /proc/cpuinfo), else platform's."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
