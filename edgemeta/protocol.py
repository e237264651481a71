"""The few-shot evaluation protocol, shared by the torch evaluation and the deployed path.

Embeddings of every image are computed once (eval mode, so each image's embedding does not depend
on the episode), then each of a fixed, seeded list of episodes fits a head on its support
embeddings and scores its query. NumPy only: the device runs it too.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgemeta.data.episodes import EpisodeSampler
from edgemeta.runtime.progress import SILENT, Progress

# (support [n, D], support labels [n], query [m, D], n_way) -> logits [m, n_way]
LogitsFn = Callable[[np.ndarray, np.ndarray, np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class EvalResult:
    accuracy: float   # mean query accuracy over episodes, in percent
    ci95: float       # 95% confidence half-interval, percent
    episodes: int
    way: int
    shot: int
    query: int
    seed: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        return f"{self.way}-way {self.shot}-shot: {self.accuracy:.2f} ± {self.ci95:.2f} % ({self.episodes} episodes, seed {self.seed})"


def check_episode_request(way: int, shot: int, query: int, episodes: int) -> None:
    """Refuse a degenerate evaluation (one class, no shots, no queries, no episodes) before any work."""
    from edgemeta.runtime.errors import ConfigError
    for name, value, low in (("way", way, 2), ("shot", shot, 1), ("query", query, 1), ("episodes", episodes, 1)):
        if value < low:
            raise ConfigError(f"--{name} must be ≥ {low}, got {value}" + (" (an episode needs two classes)" if name == "way" else ""))


def evaluate_episodes(embeddings: np.ndarray, labels: np.ndarray, logits_fn: LogitsFn, way: int, shot: int,
                      query: int = 15, episodes: int = 1000, seed: int = 0, progress: Progress = SILENT,
                      support_embeddings: np.ndarray | None = None) -> EvalResult:
    """support_embeddings (same rows as embeddings): what support images contribute when it differs
    from what queries do (flipped-shot augmentation); default: the same embeddings."""
    check_episode_request(way, shot, query, episodes)
    support_rows = embeddings if support_embeddings is None else support_embeddings
    sampler = EpisodeSampler(labels, way, shot, query, seed)
    accs = np.empty(episodes)
    for i in range(episodes):
        ep = sampler.episode(i)
        logits = np.asarray(logits_fn(support_rows[ep.support], ep.support_labels, embeddings[ep.query], way))
        accs[i] = (logits.argmax(1) == ep.query_labels).mean()
        progress.update(i + 1)
    ci = 1.96 * accs.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else 0.0
    return EvalResult(float(100 * accs.mean()), float(100 * ci), episodes, way, shot, query, seed)
