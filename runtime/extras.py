"""The one way to say an optional package is missing: at the point of use, with the exact install
command. The device install (edgemeta's wheel with no extras) has numpy, onnxruntime and Pillow
only; everything else comes with an extra, whose packages the message names."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import DependencyError

# module → the extra that installs it, and what to run where pip cannot (a Jetson)
EXTRA_OF = {"torch": "train", "safetensors": "train", "onnx": "train", "onnxscript": "train",
            "matplotlib": "plot", "tensorrt": "tensorrt", "cuda": "tensorrt", "cv2": "video",
            "fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "python_multipart": "serve",
            "prometheus_client": "serve"}
JETSON_HINT = {"tensorrt": "on a Jetson use JetPack's python3-libnvinfer (JetPack ≥ 6.1)",
               "cuda": "on a Jetson (JetPack 6.1/6.2) `pip install 'cuda-python==12.6.*'` (constraints/jetpack6.txt)",
               "cv2": "on a Jetson JetPack's python3-opencv (it has GStreamer)"}


def extra_requirements(extra: str) -> list[str]:
    """The requirements of one of edgemeta's extras, from the installed distribution's metadata
    (nested extras such as `edgemeta[train]` inside `bench` expanded)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires
    try:
        declared = requires("edgemeta") or []
    except PackageNotFoundError:
        return []
    out: list[str] = []
    for line in declared:
        spec, _, marker = line.partition(";")
        if re.search(rf"extra\s*==\s*[\"']{re.escape(extra)}[\"']", marker):
            nested = re.fullmatch(r"edgemeta\[(\w+)\]", spec.strip())
            out += extra_requirements(nested.group(1)) if nested else [spec.strip()]
    return out


def install_hint(module: str) -> str:
    """How to install what provides `module`: the packages of edgemeta's extra by name (edgemeta is
    installed from a wheel or a checkout, not from PyPI, so `pip install 'edgemeta[extra]'` would not
    find it)."""
    top = module.split(".")[0]
    extra = EXTRA_OF.get(top)
    packages = extra_requirements(extra) if extra else []
    hint = (f"pip install {' '.join(repr(p) if any(c in p for c in '<>=[') else p for p in packages)} "
            f"(edgemeta's [{extra}] extra)" if packages else
            f"pip install -e '.[{extra}]' in edgemeta's checkout" if extra else f"pip install {top}")
    return f"{JETSON_HINT[top]}, elsewhere {hint}" if top in JETSON_HINT else hint


def require(*modules: str, purpose: str) -> None:
    """Raise DependencyError naming what is missing for `purpose` and how to install it."""
    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        hints = sorted({install_hint(m) for m in missing})
        raise DependencyError(f"{purpose} needs {', '.join(missing)}: {'; '.join(hints)}")


def load(module: str, purpose: str) -> ModuleType:
    """Import an optional module, or raise DependencyError with its install hint."""
    require(module, purpose=purpose)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(f"{purpose} needs {module}, which is installed but does not import ({exc}): "
                              f"{install_hint(module)}") from None


def cudart(purpose: str) -> ModuleType:
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python ≥ 12.6) or `cuda.cudart`."""
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise DependencyError(f"{purpose} needs cuda-python: {install_hint('cuda')}")
