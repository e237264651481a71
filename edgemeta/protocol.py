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


@dataclass(frozen=True)
class OpenSetResult:
    """The open-set protocol's figures (percent, mean over episodes ± 95% CI of the balanced one):
    closed accuracy (no rejection), the AUROC of the nearest-prototype distance (strangers against
    enrolled queries), and at each rejection rule: known right (accepted and right), known
    rejected, unknown rejected, balanced = (known right + unknown rejected) / 2."""

    closed_accuracy: float
    auroc: float
    rules: dict          # rule name -> {known_right, known_rejected, unknown_rejected, balanced, balanced_ci95}
    episodes: int
    shot: int
    query: int
    seed: int
    known: int
    strangers: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        lines = [f"{self.known} enrolled + {self.strangers} unknown classes, {self.shot}-shot, {self.query} queries each "
                 f"({self.episodes} episodes, seed {self.seed}): closed accuracy {self.closed_accuracy:.2f} %, "
                 f"AUROC {self.auroc:.2f}"]
        for name, r in self.rules.items():
            lines.append(f"  {name:12s} known right {r['known_right']:.2f} %  known rejected {r['known_rejected']:.2f} %  "
                         f"unknown rejected {r['unknown_rejected']:.2f} %  balanced {r['balanced']:.2f} ± {r['balanced_ci95']:.2f} %")
        return "\n".join(lines)


# (support [known · shot, D], support labels, query [m, D]) -> {rule: (predicted [m], rejected [m]), "distance": [m]}
OpenSetFn = Callable[[np.ndarray, np.ndarray, np.ndarray], dict]


def evaluate_open_set(embeddings: np.ndarray, labels: np.ndarray, classify: OpenSetFn, shot: int, query: int = 15,
                      episodes: int = 1000, seed: int = 0, support_embeddings: np.ndarray | None = None,
                      progress: Progress = SILENT) -> OpenSetResult:
    """5 enrolled + 5 unknown classes per episode (runtime.open_set.open_set_episode, the episodes the
    export's prior is measured on, with another seed stream): `classify` enrolls the support set
    and answers the queries under each of its rejection rules."""
    from edgemeta.runtime.errors import DataError
    from edgemeta.runtime.open_set import KNOWN_WAY, STRANGER_WAY, auroc, class_rows, open_set_episode
    check_episode_request(KNOWN_WAY, shot, query, episodes)
    per_class = class_rows(labels)
    if len(per_class) < KNOWN_WAY + STRANGER_WAY:
        raise DataError(f"the open-set protocol needs {KNOWN_WAY + STRANGER_WAY} classes, this split has {len(per_class)}")
    small = min(len(r) for r in per_class)
    if small < shot + query:
        raise DataError(f"a class has {small} images; {shot} shots + {query} queries need {shot + query}: lower --shot or --query")
    support_rows = embeddings if support_embeddings is None else support_embeddings
    closed, dist_known, dist_strange, per_rule = [], [], [], {}
    for i in range(episodes):
        ep = open_set_episode(per_class, shot, query, seed, i)
        out = classify(support_rows[ep.support], ep.support_labels, embeddings[ep.query])
        known = ep.query_labels >= 0
        d = out["distance"]
        dist_known.append(d[known])
        dist_strange.append(d[~known])
        for name, (predicted, rejected) in out["rules"].items():
            correct = predicted == ep.query_labels
            right = float((~rejected & correct)[known].mean())
            unknown_rejected = float(rejected[~known].mean())
            per_rule.setdefault(name, []).append((right, float(rejected[known].mean()), unknown_rejected,
                                                  (right + unknown_rejected) / 2))
            if name == "none":
                closed.append(float(correct[known].mean()))
        progress.update(i + 1)
    rules = {}
    for name, rows in per_rule.items():
        a = np.array(rows)
        ci = 1.96 * a[:, 3].std(ddof=1) / np.sqrt(len(a)) if len(a) > 1 else 0.0
        rules[name] = {"known_right": 100 * a[:, 0].mean(), "known_rejected": 100 * a[:, 1].mean(),
                       "unknown_rejected": 100 * a[:, 2].mean(), "balanced": 100 * a[:, 3].mean(), "balanced_ci95": 100 * ci}
        rules[name] = {k: round(float(v), 2) for k, v in rules[name].items()}
    return OpenSetResult(round(100 * float(np.mean(closed)), 2) if closed else float("nan"),
                         round(100 * auroc(np.concatenate(dist_known), np.concatenate(dist_strange)), 2),
                         rules, episodes, shot, query, seed, KNOWN_WAY, STRANGER_WAY)
