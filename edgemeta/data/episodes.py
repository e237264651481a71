"""Few-shot episodes: N-way K-shot support + query, deterministic by (seed, episode index)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgemeta.runtime.errors import DataError

from .imageset import indices_by_class


@dataclass(frozen=True)
class Episode:
    """Indices into the dataset; labels are 0..N-1 in the order classes were drawn."""

    classes: np.ndarray         # [N] dataset class ids
    support: np.ndarray         # [N*K] dataset indices, class-major
    support_labels: np.ndarray  # [N*K]
    query: np.ndarray           # [N*Q]
    query_labels: np.ndarray    # [N*Q]


class EpisodeSampler:
    """Draws N-way K-shot episodes; episode i depends only on (seed, i), so any episode can be
    regenerated, validation episodes are fixed, and a resumed run continues the same stream."""

    def __init__(self, labels: np.ndarray, n_way: int, k_shot: int, n_query: int, seed: int = 0,
                 class_names: list[str] | None = None):
        if n_way < 1 or k_shot < 1 or n_query < 0:
            raise DataError(f"way and shot must be ≥ 1 and query ≥ 0 (got way={n_way}, shot={k_shot}, query={n_query})")
        labels = np.asarray(labels, dtype=np.int64)
        n_classes = int(labels.max()) + 1 if len(labels) else 0
        per_class = indices_by_class(labels, n_classes)
        need = k_shot + n_query
        short = [c for c, idx in enumerate(per_class) if len(idx) < need]
        if short:
            c = short[0]
            name = class_names[c] if class_names else str(c)
            raise DataError(f"class {name!r} has {len(per_class[c])} images but an episode needs "
                            f"{k_shot} shots + {n_query} queries = {need}; lower --shot or --query "
                            f"({len(short)} class(es) too small)")
        if n_way > n_classes:
            raise DataError(f"{n_way}-way episodes need {n_way} classes, the data has {n_classes}")
        self.n_way, self.k_shot, self.n_query, self.seed = n_way, k_shot, n_query, seed
        self._per_class = per_class
        # When all classes have the same size (Omniglot, Tiny ImageNet) one vectorised draw serves them all.
        sizes = {len(idx) for idx in per_class}
        self._table = np.stack(per_class) if len(sizes) == 1 else None

    @property
    def n_classes(self) -> int:
        return len(self._per_class)

    def episode(self, index: int) -> Episode:
        rng = np.random.default_rng([self.seed, index])
        n, k, q = self.n_way, self.k_shot, self.n_query
        classes = rng.choice(self.n_classes, n, replace=False)
        if self._table is not None:
            picks = np.argsort(rng.random((n, self._table.shape[1])), axis=1)[:, :k + q]
            chosen = np.take_along_axis(self._table[classes], picks, axis=1)
        else:
            chosen = np.stack([rng.choice(self._per_class[c], k + q, replace=False) for c in classes])
        way_labels = np.arange(n, dtype=np.int64)
        return Episode(classes, chosen[:, :k].reshape(-1), np.repeat(way_labels, k),
                       chosen[:, k:].reshape(-1), np.repeat(way_labels, q))

    def episodes(self, count: int, start: int = 0) -> list[Episode]:
        return [self.episode(i) for i in range(start, start + count)]

    def __iter__(self) -> Iterator[Episode]:
        i = 0
        while True:
            yield self.episode(i)
            i += 1


def stack_tasks(episodes: list[Episode], to_input):
    """Episodes → torch (sx [T, n*k, C, H, W], sy [n*k], qx [T, n*q, C, H, W], qy [n*q]): a
    meta-batch of tasks for the gradient-based learners; labels are shared. `to_input` maps dataset
    indices to a model input tensor. (torch is imported here only: the module serves the device.)"""
    import torch
    sy = torch.from_numpy(episodes[0].support_labels)
    qy = torch.from_numpy(episodes[0].query_labels)
    for ep in episodes:
        assert np.array_equal(ep.support_labels, episodes[0].support_labels)
    sx = torch.stack([to_input(ep.support) for ep in episodes])
    qx = torch.stack([to_input(ep.query) for ep in episodes])
    return sx, sy, qx, qy
