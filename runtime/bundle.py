"""The bundle: a folder with manifest.json and the files it names (sha256 each).

manifest.json (schema "edgemeta-bundle", version MAJOR.MINOR) says what the graph expects
(input spec), what it returns (embedding size, L2-normalised or not), the head defaults, every
file with its sha256, each ONNX variant's checks (parity, INT8 accuracy delta) and, for each
TensorRT engine, the device it was built for. A reader refuses an unknown major version, a
manifest that does not validate, and any file whose checksum differs — checked when the file is
first asked for (Bundle.file): a command hashes the graph it runs, not every variant and engine
of a bundle that may hold tens of megabytes of them (`edgemeta inspect` checks them all).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BundleError, ConfigError
from .files import atomic_write
from .heads import HeadConfig, NewerHeadError
from .open_set import OpenSetPrior
from .preprocess import InputSpec

SCHEMA = "edgemeta-bundle"
SCHEMA_VERSION = "1.0"
MANIFEST = "manifest.json"
VARIANTS = ("fp32", "fp16", "int8")  # "auto" (a command's choice, not a file) picks one of them per machine

# Required manifest fields and their JSON types; nested paths are dotted.
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema": str, "schema_version": str, "edgemeta_version": str, "created": str,
    "model": dict, "model.backbone": str,
    "input": dict, "input.name": str, "input.height": int, "input.width": int, "input.colour": str,
    "input.mean": list, "input.std": list,
    "output": dict, "output.name": str, "output.dim": int, "output.l2_normalized": bool,
    "head": dict, "head.kind": str,
    "files": dict, "variants": dict, "engines": list,
}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def validate_manifest(manifest: dict, where: str = MANIFEST) -> None:
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BundleError(f"{where} is not an edgemeta bundle manifest (schema {SCHEMA!r} expected)")
    version = str(manifest.get("schema_version", ""))
    major = version.split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise BundleError(f"{where} has schema version {version}; this edgemeta reads {SCHEMA_VERSION.split('.')[0]}.x. "
                          "Re-export the bundle with this edgemeta, or install the edgemeta that made it.")
    for dotted, kind in _REQUIRED.items():
        value = manifest
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                raise BundleError(f"{where}: missing field {dotted!r}; re-export the bundle")
            value = value[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BundleError(f"{where}: field {dotted!r} should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    try:
        InputSpec.from_dict(manifest["input"])
        HeadConfig.from_dict(manifest["head"], "head")
    except NewerHeadError as exc:
        raise BundleError(f"{where}: {exc}") from None
    except ConfigError as exc:
        raise BundleError(f"{where}: {exc}; re-export the bundle") from None
    from .store import MAX_CLASSES
    if not 1 <= manifest["output"]["dim"] <= (MAX_CLASSES if "frozen" in manifest else 1 << 16):  # a frozen graph's: its classes
        raise BundleError(f"{where}: output.dim {manifest['output']['dim']} is not plausible; re-export the bundle")
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or "/" in name or name.startswith("."):
            raise BundleError(f"{where}: bad entry for file {name!r}")
    for variant, entry in manifest["variants"].items():
        if variant not in VARIANTS or entry.get("file") not in manifest["files"]:
            raise BundleError(f"{where}: variant {variant!r} names a file the manifest does not list")
        cpu = entry.get("cpu")
        if cpu is not None and (not isinstance(cpu, dict) or cpu.get("file") not in manifest["files"]):
            raise BundleError(f"{where}: variant {variant!r} names a CPU graph the manifest does not list")
    if "open_set" in manifest:
        OpenSetPrior.from_dict(manifest["open_set"], f"{where}: open_set")
    for engine in manifest["engines"]:
        for key in ("file", "tensorrt_version", "gpu_name", "compute_capability", "precision", "profile"):
            if key not in engine:
                raise BundleError(f"{where}: an engine entry lacks {key!r}; rebuild it with `edgemeta build-engine`")


def read_manifest(bundle_dir: str | os.PathLike) -> dict:
    path = Path(bundle_dir) / MANIFEST
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"bundle not found: {bundle_dir} (a folder made by `edgemeta export`)")
    if not path.is_file():
        raise BundleError(f"{bundle_dir} has no {MANIFEST}; is it a bundle made by `edgemeta export`?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is truncated or not JSON ({exc}); re-export the bundle") from None
    validate_manifest(manifest, str(path))
    return manifest


def write_manifest(bundle_dir: str | os.PathLike, manifest: dict) -> None:
    validate_manifest(manifest)
    atomic_write(Path(bundle_dir) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def register_file(bundle_dir: str | os.PathLike, manifest: dict, name: str, role: str) -> dict:
    """Add (or refresh) a file's entry with its size and sha256."""
    path = Path(bundle_dir) / name
    entry = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "role": role}
    manifest["files"][name] = entry
    return entry


def verify_files(bundle_dir: str | os.PathLike, manifest: dict, names: list[str] | None = None) -> None:
    for name in names if names is not None else list(manifest["files"]):
        path = Path(bundle_dir) / name
        if not path.is_file():
            raise BundleError(f"bundle file missing: {path}; re-export the bundle")
        if sha256_file(path) != manifest["files"][name]["sha256"]:
            raise BundleError(f"{path} does not match its sha256 in the manifest (changed or corrupted); "
                              "re-export the bundle")


@dataclass
class Bundle:
    path: Path
    manifest: dict
    verify: bool = True  # each file checked against its sha256 the first time it is asked for
    _verified: set[str] = field(default_factory=set, repr=False, compare=False)

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists, checked against its sha256 on first use."""
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: the manifest lists no file {name!r}; re-export the bundle")
        if self.verify and name not in self._verified:
            verify_files(self.path, self.manifest, [name])
            self._verified.add(name)
        return self.path / name

    def verify_every_file(self) -> None:
        """Check every file the manifest lists (what `edgemeta inspect` reports), not only those used."""
        for name in self.manifest["files"]:
            self.file(name)

    @property
    def spec(self) -> InputSpec:
        # read on every predict: parsed once (InputSpec is immutable; the manifest is not edited in place)
        cached = self.__dict__.get("_spec")
        if cached is None or cached[0] is not self.manifest["input"]:
            cached = self.__dict__["_spec"] = (self.manifest["input"], InputSpec.from_dict(self.manifest["input"]))
        return cached[1]

    @property
    def input_name(self) -> str:
        return self.manifest["input"]["name"]

    @property
    def embedding_dim(self) -> int:
        return self.manifest["output"]["dim"]

    @property
    def l2_normalized(self) -> bool:
        return self.manifest["output"]["l2_normalized"]

    @property
    def head(self) -> HeadConfig:
        return HeadConfig.from_dict(self.manifest["head"])

    @property
    def open_set(self) -> OpenSetPrior | None:
        """The open-set prior measured at export (runtime.open_set.OpenSetPrior), or None."""
        cached = self.__dict__.get("_open_set")
        if cached is None or cached[0] is not self.manifest.get("open_set"):
            raw = self.manifest.get("open_set")
            cached = self.__dict__["_open_set"] = (raw, OpenSetPrior.from_dict(raw) if raw is not None else None)
        return cached[1]

    @property
    def engines(self) -> list[dict]:
        return list(self.manifest["engines"])

    @property
    def model_sha256(self) -> str:
        """Identity of the embedding: the fp32 ONNX graph's checksum (every variant derives from it)."""
        return self.manifest["files"][self.manifest["variants"]["fp32"]["file"]]["sha256"]

    def variant_path(self, variant: str = "fp32", cpu: bool = False) -> Path:
        """The variant's ONNX file; cpu=True: its CPU graph where it has one (INT8: U8S8 for ONNX
        Runtime's CPU provider, where the TensorRT-shaped S8S8 graph runs slower than fp32)."""
        return self.file(self.variant_file(variant, cpu))

    def variant_file(self, variant: str = "fp32", cpu: bool = False) -> str:
        """The name of the variant's ONNX file (as variant_path, without reading the file)."""
        entry = self._variant(variant)
        return ((entry.get("cpu") if cpu else None) or entry)["file"]

    def _variant(self, variant: str) -> dict:
        if variant not in VARIANTS:
            raise BundleError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
        if variant not in self.manifest["variants"]:
            have = ", ".join(self.manifest["variants"]) or "none"
            raise BundleError(f"this bundle has no {variant} model (it has: {have}); "
                              f"re-export with `edgemeta export --{variant}`" if variant != "fp32" else
                              "this bundle has no fp32 model; re-export it")
        return self.manifest["variants"][variant]


def load_bundle(bundle_dir: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read and validate the manifest. Each file's sha256 is checked when the bundle first hands
    out its path (Bundle.file), unless verify=False; Bundle.verify_every_file() checks them all now."""
    return Bundle(Path(bundle_dir), read_manifest(bundle_dir), verify)
