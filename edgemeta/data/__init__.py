"""Data: image sources, the ImageSet, class splits and episode sampling. The names below load on
first use, so the CLI can read the catalogue and the split names without the samplers."""
from __future__ import annotations

import importlib

_WHERE = {"Episode": "episodes", "EpisodeSampler": "episodes", "ImageSet": "imageset", "load_dataset": "loading",
          "select_split": "splits", "split_groups": "splits"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)


__all__ = list(_WHERE)
