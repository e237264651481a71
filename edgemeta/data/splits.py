"""Class splits that keep groups apart: no alphabet (or class) appears in two splits.

Omniglot's background set has a fixed edgemeta split: the eight alphabets of the two small
archives that the repository ships are validation and test, the other 22 train. So the shipped
model is always evaluated, in tests and in the demo, on alphabets it never saw. Any other data is
split by a seeded shuffle of its groups.
"""
from __future__ import annotations

import numpy as np

from edgemeta.runtime.errors import DataError

from .imageset import ImageSet

OMNIGLOT_VAL_ALPHABETS = ("Greek", "Latin")
OMNIGLOT_TEST_ALPHABETS = ("Balinese", "Early_Aramaic", "Japanese_(katakana)", "Korean", "Sanskrit", "Tagalog")
SPLITS = ("train", "val", "test", "all")
SPLIT_MODES = ("auto", "alphabets", "seeded")


def split_groups(groups: list[str], mode: str = "auto", seed: int = 0,
                 fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> dict[str, list[str]]:
    """Assign each distinct group to train / val / test.

    mode "alphabets" uses the fixed Omniglot split above; "seeded" shuffles the groups with the
    seed and cuts by the fractions; "auto" picks "alphabets" when every fixed test alphabet is
    present and "seeded" otherwise.
    """
    if mode not in SPLIT_MODES:
        raise DataError(f"split mode must be one of {SPLIT_MODES}, not {mode!r}")
    distinct = sorted(set(groups))
    if mode == "auto":
        mode = "alphabets" if set(OMNIGLOT_TEST_ALPHABETS) <= set(distinct) else "seeded"
    if mode == "alphabets":
        test = [g for g in distinct if g in OMNIGLOT_TEST_ALPHABETS]
        val = [g for g in distinct if g in OMNIGLOT_VAL_ALPHABETS]
        train = [g for g in distinct if g not in test and g not in val]
        return {"train": train, "val": val, "test": test}
    if len(distinct) < 3:
        raise DataError(f"need at least 3 groups (alphabets or classes) to split, found {len(distinct)}")
    order = [distinct[i] for i in np.random.default_rng(seed).permutation(len(distinct))]
    n_val = max(1, round(fractions[1] * len(order)))
    n_test = max(1, round(fractions[2] * len(order)))
    n_train = len(order) - n_val - n_test
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def read_split_file(path: str) -> dict[str, list[str]]:
    """A JSON file {"train": [...], "val": [...], "test": [...]} naming the groups of each split. A
    relative path that does not exist here is looked up in the source tree (where `data/splits/`
    ships), so checkpoints that record `data/splits/x.json` evaluate from any folder."""
    import json
    from pathlib import Path
    file = Path(path)
    shipped = Path(__file__).resolve().parents[2] / path
    if not file.exists() and not file.is_absolute() and shipped.exists():
        file = shipped
    try:
        parts = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read split file {path}: {exc}") from None
    if not isinstance(parts, dict) or not all(isinstance(parts.get(k), list) for k in ("train", "val", "test")):
        raise DataError(f"split file {path} must hold lists 'train', 'val' and 'test'")
    return parts


def select_split(dataset: ImageSet, split: str, mode: str = "auto", seed: int = 0, split_file: str = "") -> ImageSet:
    """The classes of one split ("all" keeps everything); a split file overrides mode and seed."""
    if split == "all":
        return dataset
    return dataset.select_classes(split_classes(dataset.groups, split, mode, seed, split_file))


def split_classes(groups: list[str], split: str, mode: str = "auto", seed: int = 0, split_file: str = "") -> list[int]:
    """The ids (ascending) of the classes in one split, from each class's group; never empty."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, not {split!r}")
    if split == "all":
        return list(range(len(groups)))
    chosen = set((read_split_file(split_file) if split_file else split_groups(groups, mode, seed))[split])
    ids = [c for c, g in enumerate(groups) if g in chosen]
    if not ids:
        raise DataError(f"the {split} split of {split_file} has no classes in this data" if split_file else
                        f"the {split} split of this data is empty (split mode {mode!r}); use --split-mode seeded or add data")
    return ids
