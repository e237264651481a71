"""Checkpoints: weights in safetensors plus a JSON description in the file's metadata.

One file, loaded without executing any code from it: safetensors holds raw tensors and a JSON
header, never pickles. The JSON ("edgemeta" metadata key) says the backbone and its arguments,
the input spec, the embedding size, the head defaults, the training config, metrics and the
edgemeta version. Training checkpoints also carry the optimizer state (for --resume).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

import edgemeta
from edgemeta.backbones import Embedder, deployment_args
from edgemeta.runtime.errors import CheckpointError, ConfigError
from edgemeta.runtime.files import atomic_write
from edgemeta.runtime.heads import HeadConfig
from edgemeta.runtime.preprocess import InputSpec

FORMAT = "edgemeta-checkpoint"
FORMAT_VERSION = 1
_MODEL, _OPTIM = "model/", "optim/"


@dataclass
class Checkpoint:
    meta: dict
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None = field(default=None, repr=False)

    @property
    def spec(self) -> InputSpec:
        return InputSpec.from_dict(self.meta["input"])

    @property
    def device_head(self) -> HeadConfig:
        """The head the device fits on the frozen embedding. MAML-family checkpoints adapt the whole
        network in torch ("finetune"); their device head is the logistic head they record."""
        head = self.meta["head"]
        return HeadConfig.from_dict(head["device_head"] if head.get("kind") == "finetune" else head)

    @property
    def center(self) -> bool:
        """Whether the checkpoint deploys with CL2N features (recorded when it was shipped, where
        validation chose them): `export` and `eval` then centre unless told --no-center."""
        return bool(self.meta.get("center", False))

    def centring(self, requested: bool | None) -> bool:
        """CL2N or not for an export or evaluation: as requested, else as the checkpoint records."""
        return self.center if requested is None else requested

    def at_image_size(self, size: int | None) -> Checkpoint:
        """The same network fed `size`×`size` images (None: as trained). Only for backbones whose
        embedding does not depend on the input size (globally pooled): the rest are refused."""
        if size is None or (size == self.spec.height and size == self.spec.width):
            return self
        from edgemeta.runtime.preprocess import MAX_INPUT_SIDE
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= MAX_INPUT_SIDE:
            raise ConfigError(f"--image-size must be a whole number of pixels in 16–{MAX_INPUT_SIDE}, got {size!r}")
        b = self.meta["backbone"]
        spec = {**self.meta["input"], "height": size, "width": size}
        dim = Embedder(b["name"], InputSpec.from_dict(spec), deployment_args(b["name"], b.get("args", {}))).embed_dim
        if dim != self.meta["embedding_dim"]:
            raise ConfigError(f"a {b['name']} embedding depends on the input size ({dim} at {size} px, "
                              f"{self.meta['embedding_dim']} as trained): --image-size needs a globally pooled backbone")
        return Checkpoint({**self.meta, "input": spec}, self.model_state, self.optimizer_state)

    def embedder_state(self) -> dict[str, torch.Tensor]:
        return {k[len("embedder."):]: v for k, v in self.model_state.items() if k.startswith("embedder.")}

    def build_embedder(self) -> Embedder:
        """The trained embedding network, in eval mode, as it is deployed (deployment_args)."""
        b = self.meta["backbone"]
        embedder = Embedder(b["name"], self.spec, deployment_args(b["name"], b.get("args", {})))
        try:
            embedder.load_state_dict(self.embedder_state())
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"the checkpoint's weights do not fit its own {b['name']} description ({first}); "
                                  "the file is damaged or was edited") from None
        return embedder.eval()


def save_checkpoint(path: str | os.PathLike, model_state: dict[str, torch.Tensor], meta: dict,
                    optimizer_state: dict | None = None) -> Path:
    """Write atomically (temp file, fsync, rename): an interrupted save keeps the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "edgemeta_version": edgemeta.__version__, **meta}
    tensors = {_MODEL + k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    if optimizer_state is not None:
        for pid, state in optimizer_state["state"].items():
            for key, value in state.items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"{_OPTIM}{pid}/{key}"] = t.detach().contiguous().cpu()
        meta = {**meta, "optimizer_param_groups": optimizer_state["param_groups"]}
    atomic_write(path, save(tensors, metadata={"edgemeta": json.dumps(meta)}))
    return path


def ship_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, half: bool = False, flip_shots: bool = False,
                    center: bool = False) -> Path:
    """The checkpoint as it ships: deployable weights only (no optimizer state), CL2N's feature mean
    computed on the training split and stored (so `export --center` needs no training data), with
    half=True float weights stored in float16 (loaded back as float32), with flip_shots=True a
    device head that enrolls flipped shots, and with center=True CL2N as its default deployment
    (each where validation showed it helps)."""
    from edgemeta.features import FEATURE_MEAN_KEY, feature_mean
    ckpt = load_checkpoint(src)
    mean, about = feature_mean(ckpt)
    about = {k: v for k, v in about.items() if k != "source"}  # where the mean came from, as first computed
    state = {**ckpt.model_state, FEATURE_MEAN_KEY: torch.from_numpy(mean)}
    if half:
        state = {k: v.half() if v.is_floating_point() and k != FEATURE_MEAN_KEY and "running_" not in k else v
                 for k, v in state.items()}
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("format", "format_version", "edgemeta_version")}
    if flip_shots:
        import dataclasses
        head = dataclasses.replace(ckpt.device_head, flip_shots=True).to_dict()
        meta["head"] = {**meta["head"], "device_head": head} if meta["head"].get("kind") == "finetune" else head
    if center:
        meta["center"] = True
    return save_checkpoint(dst, state, {**meta, FEATURE_MEAN_KEY: about, "weights_dtype": "float16" if half else "float32"})


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint; anything that is not an edgemeta safetensors file is refused, never unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 2 <= header_len <= 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(header_len))
        meta = json.loads(header["__metadata__"]["edgemeta"])
        tensors = load_file(path)
    except (SafetensorError, ValueError, KeyError, TypeError, json.JSONDecodeError, OSError):
        raise CheckpointError(f"{path} is not an edgemeta checkpoint (a safetensors file with edgemeta "
                              "metadata). edgemeta never unpickles files; re-save the model with edgemeta.") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not an edgemeta checkpoint")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer edgemeta (format {meta['format_version']}); upgrade edgemeta")
    _check_meta(meta, path)
    # shipped checkpoints may store weights in float16 (half the size); compute is float32
    model_state = {k[len(_MODEL):]: (v.float() if v.dtype in (torch.float16, torch.bfloat16) else v)
                   for k, v in tensors.items() if k.startswith(_MODEL)}
    optimizer_state = None
    if "optimizer_param_groups" in meta:
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith(_OPTIM):
                pid, key = k[len(_OPTIM):].split("/", 1)
                state.setdefault(int(pid), {})[key] = v
        optimizer_state = {"state": state, "param_groups": meta.pop("optimizer_param_groups")}
    return Checkpoint(meta, model_state, optimizer_state)


def _check_meta(meta: dict, path: Path) -> None:
    """The JSON description is data from a file: check it before anything is built from it."""
    from edgemeta.backbones import list_backbones
    try:
        InputSpec.from_dict(meta["input"])
        backbone = meta["backbone"]
        if backbone["name"] not in list_backbones():
            raise ConfigError(f"unknown backbone {backbone['name']!r} (this edgemeta has {', '.join(list_backbones())})")
        if not isinstance(backbone.get("args", {}), dict):
            raise ConfigError("backbone args must be a JSON object")
        dim = meta["embedding_dim"]
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 1 << 16:
            raise ConfigError(f"embedding_dim {dim!r} is not plausible")
        head = meta["head"]
        if isinstance(head, dict) and head.get("kind") == "finetune":
            HeadConfig.from_dict(head.get("device_head"), "device head")
        else:
            HeadConfig.from_dict(head)
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} has an invalid description ({exc}); the file is damaged or was edited") from None
