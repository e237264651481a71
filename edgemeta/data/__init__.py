"""Data: image sources, the ImageSet, class splits and episode sampling."""
from .episodes import Episode, EpisodeSampler
from .imageset import ImageSet
from .loading import load_dataset
from .splits import select_split, split_groups

__all__ = ["Episode", "EpisodeSampler", "ImageSet", "load_dataset", "select_split", "split_groups"]
