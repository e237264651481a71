"""ImageSet: decoded images of many classes in memory, with class names and groups.

A group is what a class split must keep apart: the alphabet for Omniglot, the class itself for a
plain image folder.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgemeta.runtime.errors import DataError


def indices_by_class(labels: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """For each class 0..n_classes-1, the indices of its items in `labels` (ascending)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_classes + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(n_classes)]


@dataclass
class ImageSet:
    pixels: np.ndarray  # uint8 [N, H, W, C], already preprocessed to the input spec
    labels: np.ndarray  # int64 [N], 0..n_classes-1
    classes: list[str]  # name of each class, indexed by label
    groups: list[str]   # group of each class, indexed by label

    def __post_init__(self) -> None:
        if len(self.pixels) != len(self.labels):
            raise DataError("pixels and labels differ in length")
        if len(self.classes) != len(self.groups):
            raise DataError("classes and groups differ in length")

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def class_indices(self) -> list[np.ndarray]:
        """For each class, the indices of its images (sorted)."""
        return indices_by_class(self.labels, self.n_classes)

    def select_classes(self, class_ids: list[int] | np.ndarray) -> ImageSet:
        """A new ImageSet with only these classes, relabelled 0..len(class_ids)-1 in the given order."""
        class_ids = np.asarray(class_ids, dtype=np.int64)
        remap = np.full(self.n_classes, -1, np.int64)
        remap[class_ids] = np.arange(len(class_ids))
        keep = remap[self.labels] >= 0
        return ImageSet(self.pixels[keep], remap[self.labels[keep]],
                        [self.classes[c] for c in class_ids], [self.groups[c] for c in class_ids])

    def with_rotations(self) -> ImageSet:
        """The standard Omniglot augmentation: each 90° rotation of a class is a new class (×4 classes)."""
        if self.pixels.shape[1] != self.pixels.shape[2]:
            raise DataError("rotation augmentation needs square images")
        pixels = [self.pixels] + [np.rot90(self.pixels, k, axes=(1, 2)) for k in (1, 2, 3)]
        labels = [self.labels + k * self.n_classes for k in range(4)]
        classes = [f"{name}@rot{90 * k}" if k else name for k in range(4) for name in self.classes]
        return ImageSet(np.ascontiguousarray(np.concatenate(pixels)), np.concatenate(labels),
                        classes, self.groups * 4)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std on the [0, 1] scale, for the input spec's normalisation."""
        flat = self.pixels.reshape(-1, self.pixels.shape[-1])
        total, total_sq = np.zeros(flat.shape[1]), np.zeros(flat.shape[1])
        for i in range(0, len(flat), 1 << 22):  # in chunks: a float64 copy of 24k RGB images is 2 GB
            chunk = flat[i:i + (1 << 22)].astype(np.float64) / 255.0
            total += chunk.sum(0)
            total_sq += (chunk * chunk).sum(0)
        mean = total / len(flat)
        std = np.sqrt(np.maximum(total_sq / len(flat) - mean * mean, 0.0))
        return tuple(mean.round(6).tolist()), tuple(np.maximum(std, 1e-3).round(6).tolist())
