"""The backend registry: name → how to open a bundle's network on it, and which of a bundle's files it
runs here. Adding a backend is one module in runtime/backends/ that ends with
`register_backend(BackendKind(...))`: the package imports every module in its folder, so there is
no import line to forget; `--backend` choices, help, `auto`'s order and `inspect`'s "runs here"
come from here."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..bundle import Bundle
    from .base import Backend


class BackendUnavailable(Exception):
    """A backend cannot run this bundle here. quiet: nothing worth a warning when `auto` moves on
    (the bundle simply has no file for it); otherwise `auto` warns with the reason, and a backend
    asked for by name fails with it."""

    def __init__(self, reason: str, quiet: bool = False, cause: Exception | None = None):
        super().__init__(reason)
        self.quiet, self.cause = quiet, cause  # cause: raised as it is when the backend was named


@dataclass(frozen=True)
class BackendRequest:
    """What opening a backend is given besides the bundle."""

    variant: str = "fp32"                       # the bundle's graph: fp32 | int8 | fp16
    options: Any = None                         # the kind's parse_options of the text after "NAME:", else None
    providers: str | list[str] = "auto"         # ONNX Runtime providers (the API's, or onnxruntime:PROVIDER,…)
    threads: int | None = None
    device: dict | None = None                  # the device identity (tests give a fake one)
    outputs: dict[str, int] | None = None       # named outputs and their widths (a frozen classifier's)
    subject: str = ""                           # what a failure is about, for its message


@dataclass(frozen=True)
class BackendKind:
    """One backend, declared once. open raises BackendUnavailable where it cannot run the bundle.
    auto_rank: its place in `--backend auto` (lower first; None: only when named). options: what
    may follow "NAME:" on the command line, parsed by parse_options (None: the name stands alone)."""

    name: str
    open: Callable[[Bundle, BackendRequest], Backend]
    about: str
    auto_rank: int | None = None
    options: str = ""
    parse_options: Callable[[str], Any] | None = field(default=None)
    # which of the bundle's files this backend runs on this machine, in words: (bundle, device) →
    # {file: "yes — …" | "no — why"} (inspect's "runs here")
    runs_here: Callable[[Bundle, dict], dict[str, str]] | None = None


BACKEND_KINDS: dict[str, BackendKind] = {}


def register_backend(kind: BackendKind) -> BackendKind:
    if kind.name in BACKEND_KINDS or kind.name == "auto" or ":" in kind.name:
        raise ValueError(f"backend name {kind.name!r} is taken or invalid")
    if bool(kind.options) != (kind.parse_options is not None):
        raise ValueError(f"backend {kind.name!r}: options and parse_options go together")
    if kind.runs_here is None:
        raise ValueError(f"backend {kind.name!r}: say which of a bundle's files it runs here (runs_here)")
    BACKEND_KINDS[kind.name] = kind
    return kind


def backend_names() -> tuple[str, ...]:
    return ("auto", *BACKEND_KINDS)


def auto_order() -> list[BackendKind]:
    return sorted((k for k in BACKEND_KINDS.values() if k.auto_rank is not None), key=lambda k: k.auto_rank or 0)


def backend_help() -> str:
    """The `--backend` help, from the registry."""
    ranked = " → ".join(k.name for k in auto_order())
    listed = " | ".join(f"{k.name}[:{k.options}]" if k.options else k.name for k in BACKEND_KINDS.values())
    return f"auto (the first that runs here: {ranked}) | {listed}"


def parse_backend(text: str) -> tuple[str, Any]:
    """'auto' | 'NAME' | 'NAME:OPTIONS' → (name, the kind's parsed options or None). One error line
    naming the choices for anything else."""
    name, colon, listed = str(text).partition(":")
    kind = BACKEND_KINDS.get(name)
    if name == "auto" and not colon:
        return "auto", None
    if kind is None or (colon and kind.parse_options is None) or (colon and not listed):
        choices = ", ".join(f"{k.name}:{k.options}" if k.options else k.name for k in BACKEND_KINDS.values())
        raise ConfigError(f"backend must be auto or one of {choices}, not {text!r}")
    return name, kind.parse_options(listed) if colon and kind.parse_options else None


def open_with(bundle: Bundle, name: str, request: BackendRequest) -> Backend:
    """Open `name` (or, for auto, the first kind that runs the bundle here, warning with the reasons
    the ones before it could not). A kind named explicitly that cannot run raises its reason."""
    from ..errors import BundleError
    if name != "auto":
        try:
            return BACKEND_KINDS[name].open(bundle, request)
        except BackendUnavailable as exc:
            raise exc.cause or BundleError(str(exc)) from None
    reasons: list[str] = []
    for kind in auto_order():
        try:
            opened = kind.open(bundle, request)
        except BackendUnavailable as exc:
            if not exc.quiet:
                reasons.append(str(exc))
            continue
        if reasons:
            import warnings
            warnings.warn(f"{' | '.join(reasons)}. Falling back to {kind.name}.", RuntimeWarning, stacklevel=3)
        return opened
    raise BundleError("no backend runs this bundle here: " + (" | ".join(reasons) or "none is registered"))
