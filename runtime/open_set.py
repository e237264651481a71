"""The open world: when to answer "unknown", and what a person should hear while enrolling.

A bundle carries an *open-set prior* (manifest `open_set`), measured at export on the classes the
model was trained on: episodes of 5 enrolled and 5 stranger classes, for each shot count of
SHOT_GRID. For each shot count it records the distance to the nearest prototype beyond which a
query is a stranger (the threshold that maximises balanced open-set accuracy on those episodes),
how far a genuine shot falls from its class's other shots (for outlier shots), how close two different photos of one class come
(for near-duplicate shots), and how often two classes are confused as a function of the distance
between their prototypes. With one shot the support set cannot calibrate itself; the prior can.

`--unknown auto` on the device: each enrolled class gets the prior's threshold at its shot count
(interpolated in log shots); a query beyond its nearest class's threshold, or nearer to a negative
example (a correction "this is not X") than to any class, answers "unknown". Without a prior (a
bundle exported before 2026-12-08, or from an ONNX model without labelled data) the support set
calibrates itself as before (`support_set_threshold`).

NumPy only: export fits the prior with these functions, `edgemeta eval --open-set` measures with
the same episodes, and the device applies it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import BundleError
from .heads import METRICS, prototype_logits

SHOT_GRID = (1, 2, 3, 5, 10, 20)
KNOWN_WAY, STRANGER_WAY, QUERIES = 5, 5, 15
MIN_QUERIES = 5                # a shot count is calibrated only where each class has this many queries left
OUTLIER_QUANTILE = 0.99        # a shot farther from its class's other shots than 99% of genuine shots are: an outlier
DUPLICATE_QUANTILE = 0.01      # two shots closer than 99% of pairs of different photos of one class: near-duplicates
CONFUSION_FLAG = 0.10          # pairs estimated to be confused this often or more are reported by `review`
ADVICE_GAIN = 0.05             # more shots are advised when they would recognise 5 points more genuine queries
SUPPORT_SAMPLE = 2048          # classes compared to all others for the support set's one-shot threshold
MAX_GRID = 32                  # bounds on what a manifest may declare (a manifest is data, not code)


# ------------------------------------------------------------------------------------------ distances
def similarity_to_distance(similarity: np.ndarray, metric: str) -> np.ndarray:
    """The prototype head's unscaled logits (−‖q − p‖², or cos) → the rejection distance."""
    return 1.0 - similarity if metric == "cosine" else np.sqrt(np.maximum(-similarity, 0.0))


def embedding_distance(query: np.ndarray, prototypes: np.ndarray, metric: str) -> np.ndarray:
    """[m, C] distances used for rejection: euclidean, or 1 − cosine for cosine heads."""
    return similarity_to_distance(prototype_logits(query, prototypes, metric, 1.0), metric)


def paired_distance(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Row i of a to row i of b, in the metric of embedding_distance: [n]."""
    if metric == "cosine":
        norms = np.maximum(np.linalg.norm(a, axis=1), 1e-12) * np.maximum(np.linalg.norm(b, axis=1), 1e-12)
        return 1.0 - (a * b).sum(1) / norms
    return np.linalg.norm(a - b, axis=1)


# ------------------------------------------------------------------------------------------ episodes
@dataclass(frozen=True)
class OpenSetEpisode:
    """Indices into a labelled set: KNOWN_WAY enrolled classes (support, class-major) and queries of
    them and of STRANGER_WAY classes that are not enrolled (query label −1)."""

    classes: np.ndarray          # [known + stranger] class ids, the enrolled ones first
    support: np.ndarray          # [known · shot]
    support_labels: np.ndarray   # [known · shot], 0..known-1
    query: np.ndarray            # [(known + stranger) · queries]
    query_labels: np.ndarray     # 0..known-1, or −1 for a stranger


def class_rows(labels: np.ndarray) -> list[np.ndarray]:
    """The row indices of each class 0..max(labels)."""
    labels = np.asarray(labels, np.int64)
    order = np.argsort(labels, kind="stable")
    return np.split(order, np.cumsum(np.bincount(labels, minlength=int(labels.max()) + 1))[:-1])


def open_set_episode(per_class: list[np.ndarray], shot: int, queries: int, seed: int, index: int,
                     known: int = KNOWN_WAY, strangers: int = STRANGER_WAY) -> OpenSetEpisode:
    """Episode `index` of the stream fixed by `seed`: the same arguments give the same episode."""
    rng = np.random.default_rng([seed, shot, index])
    classes = rng.choice(len(per_class), known + strangers, replace=False)
    support, query = [], []
    for c in classes[:known]:
        rows = rng.permutation(per_class[c])[:shot + queries]
        support.append(rows[:shot])
        query.append(rows[shot:])
    for c in classes[known:]:
        query.append(rng.permutation(per_class[c])[:queries])
    labels = np.concatenate([np.full(queries, i) for i in range(known)] + [np.full(queries * strangers, -1)])
    return OpenSetEpisode(classes, np.concatenate(support), np.repeat(np.arange(known), shot),
                          np.concatenate(query), labels.astype(np.int64))


@dataclass(frozen=True)
class EpisodeScores:
    """What one open-set episode's queries give: their distances to the prototypes, the nearest
    class, and the true class (−1 for strangers)."""

    distances: np.ndarray   # [m, known] to each prototype
    labels: np.ndarray      # [m] true class, −1 for strangers

    @property
    def nearest(self) -> np.ndarray:
        return self.distances.min(1)

    @property
    def predicted(self) -> np.ndarray:
        return self.distances.argmin(1)


def score_episode(episode: OpenSetEpisode, embeddings: np.ndarray, support_embeddings: np.ndarray,
                  metric: str) -> tuple[EpisodeScores, np.ndarray, np.ndarray]:
    """(scores, prototypes, the support's [known, shot, D] embeddings) of one episode."""
    support = support_embeddings[episode.support]
    known = int(episode.support_labels.max()) + 1
    shots = support.reshape(known, -1, support.shape[1])
    protos = shots.mean(1)
    d = embedding_distance(embeddings[episode.query], protos, metric)
    return EpisodeScores(d, episode.query_labels), protos, shots


def leave_one_out_distance(shots: np.ndarray, metric: str) -> np.ndarray:
    """Each of a class's shots [k ≥ 2, D] against the mean of its other shots: [k]."""
    return paired_distance(shots, (shots.sum(0)[None] - shots) / (len(shots) - 1), metric)


def auroc(known: np.ndarray, strangers: np.ndarray) -> float:
    """P(a stranger's score > a known query's score), ties counted half: the area under the ROC of
    telling strangers from known queries by a score where higher means "unknown"."""
    scores = np.concatenate([known, strangers])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties
    sorted_scores = scores[order]
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for f, c in zip(first[counts > 1], counts[counts > 1]):
        ranks[order[f:f + c]] = f + (c + 1) / 2
    n_k, n_s = len(known), len(strangers)
    return float((ranks[n_k:].sum() - n_s * (n_s + 1) / 2) / (n_k * n_s))


def operating_point(nearest: np.ndarray, correct: np.ndarray, stranger: np.ndarray,
                    limit: np.ndarray | float | None) -> dict:
    """Open-set figures at a rejection limit (per query, or one for all; None never rejects):
    known right (accepted and right), known rejected, unknown rejected, balanced = (known right +
    unknown rejected) / 2, as fractions."""
    reject = np.zeros(len(nearest), bool) if limit is None else nearest > limit
    known = ~stranger
    right = float((~reject & correct)[known].mean())
    rejected_unknown = float(reject[stranger].mean())
    return {"known_right": right, "known_rejected": float(reject[known].mean()),
            "unknown_rejected": rejected_unknown, "balanced": (right + rejected_unknown) / 2}


def best_threshold(nearest: np.ndarray, correct: np.ndarray, stranger: np.ndarray) -> float:
    """The distance limit that maximises balanced open-set accuracy on these queries (midway between
    two neighbouring distances; every candidate evaluated at once through sorted cumulative counts)."""
    order = np.argsort(nearest, kind="stable")
    d = nearest[order]
    known_ok = (correct & ~stranger)[order]
    # accepting the first i queries (d ≤ d[i-1]): known right = cumsum, unknown rejected = strangers after i
    right = np.concatenate([[0], np.cumsum(known_ok)]) / max(int((~stranger).sum()), 1)
    strangers_after = (int(stranger.sum()) - np.concatenate([[0], np.cumsum(stranger[order])])) / max(int(stranger.sum()), 1)
    balanced = right + strangers_after
    i = int(np.argmax(balanced))
    if i == 0:
        return float(d[0]) / 2
    if i == len(d):
        return float(d[-1]) * 1.01
    return float((d[i - 1] + d[i]) / 2)


# ------------------------------------------------------------------------------------------ the prior
@dataclass(frozen=True)
class ShotPrior:
    """The prior at one shot count."""

    shots: int
    threshold: float          # the "unknown" distance limit at this shot count
    outlier_limit: float      # OUTLIER_QUANTILE of a genuine shot's distance to the mean of its class's other shots
    spread: float             # the median of that distance: how spread the calibration classes' shots are
    known_right: float        # at the threshold, on the calibration episodes (fractions)
    unknown_rejected: float
    closed_accuracy: float
    auroc: float
    confusion: tuple[float, float]  # pairwise confusion ≈ sigmoid(a + b · prototype distance)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class MetricPrior:
    metric: str
    rows: tuple[ShotPrior, ...]
    duplicate: float          # two shots closer than this are near-duplicates

    def _interp(self, shots: np.ndarray, values: list[float]) -> np.ndarray:
        grid = np.log([r.shots for r in self.rows])
        return np.interp(np.log(np.maximum(shots, 1)), grid, values)

    def thresholds(self, shots: np.ndarray) -> np.ndarray:
        """The "unknown" distance limit of classes with these shot counts."""
        return self._interp(np.asarray(shots, np.float64), [r.threshold for r in self.rows])

    def outlier_limit(self, shots: np.ndarray) -> np.ndarray:
        """Farther than this from the mean of the other shots, a shot of a class of `shots` is an outlier."""
        return self._interp(np.asarray(shots, np.float64), [r.outlier_limit for r in self.rows])

    def known_right(self, shots: np.ndarray) -> np.ndarray:
        return self._interp(np.asarray(shots, np.float64), [r.known_right for r in self.rows])

    def spread(self, shots: np.ndarray) -> np.ndarray:
        """The calibration classes' median distance of a shot to its class's other shots."""
        return self._interp(np.asarray(shots, np.float64), [r.spread for r in self.rows])

    def confusion(self, distance: np.ndarray, shots: np.ndarray) -> np.ndarray:
        """Estimated pairwise confusion of two classes whose prototypes lie `distance` apart (in the
        calibration classes' scale: divide a store's distances by its `domain_scale` first)."""
        a = self._interp(np.asarray(shots, np.float64), [r.confusion[0] for r in self.rows])
        b = self._interp(np.asarray(shots, np.float64), [r.confusion[1] for r in self.rows])
        return 1.0 / (1.0 + np.exp(-np.clip(a + b * np.asarray(distance, np.float64), -50, 50)))


@dataclass(frozen=True)
class OpenSetPrior:
    """The bundle's open-set prior, one per rejection metric (a head may reject in either)."""

    metrics: dict[str, MetricPrior]
    source: str               # what it was measured on, in words
    classes: int
    episodes: int

    def for_metric(self, metric: str) -> MetricPrior | None:
        return self.metrics.get(metric)

    def to_dict(self) -> dict:
        return {"version": 1, "source": self.source, "classes": self.classes, "episodes": self.episodes,
                "known_way": KNOWN_WAY, "stranger_way": STRANGER_WAY,
                "metrics": {m: {"duplicate": p.duplicate, "rows": [r.to_dict() for r in p.rows]}
                            for m, p in self.metrics.items()}}

    @classmethod
    def from_dict(cls, d, where: str = "manifest open_set") -> OpenSetPrior:
        """Bounded and checked: a manifest is data. Raises BundleError naming what is wrong."""
        def bad(what: str) -> BundleError:
            return BundleError(f"{where}: {what}; re-export the bundle")
        if not isinstance(d, dict) or not isinstance(d.get("metrics"), dict):
            raise bad("not an object with 'metrics'")
        if isinstance(d.get("version"), int) and d["version"] > 1:
            raise BundleError(f"{where} was written by a newer edgemeta (open-set prior version {d['version']}); upgrade edgemeta")
        metrics = {}
        for metric, entry in d["metrics"].items():
            if metric not in METRICS or not isinstance(entry, dict) or not isinstance(entry.get("rows"), list):
                raise bad(f"metric {metric!r} is not one of {', '.join(METRICS)} with rows")
            rows = entry["rows"]
            if not 1 <= len(rows) <= MAX_GRID:
                raise bad(f"{len(rows)} shot counts (1 to {MAX_GRID} expected)")
            parsed = []
            for r in rows:
                try:
                    conf = r["confusion"]
                    values = [float(r[k]) for k in ("threshold", "outlier_limit", "spread", "known_right", "unknown_rejected",
                                                    "closed_accuracy", "auroc")] + [float(conf[0]), float(conf[1])]
                    shots = r["shots"]
                except (KeyError, TypeError, ValueError, IndexError):
                    raise bad("a shot row lacks a number it needs") from None
                if isinstance(shots, bool) or not isinstance(shots, int) or not 1 <= shots <= 10_000 \
                        or not all(math.isfinite(v) and abs(v) <= 1e6 for v in values) or values[0] < 0:
                    raise bad(f"shot row {shots!r} holds values out of range")
                threshold, outlier, spread, right, rejected, closed, area, conf_a, conf_b = values
                parsed.append(ShotPrior(shots, threshold, outlier, spread, right, rejected, closed, area, (conf_a, conf_b)))
            if [r.shots for r in parsed] != sorted({r.shots for r in parsed}):
                raise bad("shot counts are not increasing")
            duplicate = entry.get("duplicate", 0.0)
            if isinstance(duplicate, bool) or not isinstance(duplicate, (int, float)) or not 0 <= duplicate <= 1e6:
                raise bad("duplicate distance out of range")
            metrics[metric] = MetricPrior(metric, tuple(parsed), float(duplicate))
        if not metrics:
            raise bad("no metric")
        return cls(metrics, str(d.get("source", ""))[:200], int(d.get("classes", 0) or 0), int(d.get("episodes", 0) or 0))


def domain_scale(embeddings_by_class: list[np.ndarray], prior: MetricPrior, metric: str) -> float:
    """How much more (or less) spread a store's shots are than the calibration classes' at the same
    shot counts: the median over its shots (classes of ≥ 2) of the distance to the mean of the
    class's other shots, over the prior's median at that count; 1 without such a class. Novel
    classes are wider than the ones a model trained on, and two prototypes the same distance apart
    are confused more often there (on CIFAR-FS validation classes the unscaled estimate was a third
    of the real confusion; scaled, 0.048 against 0.051)."""
    ratios = []
    for e in embeddings_by_class:
        if len(e) >= 2:
            d = leave_one_out_distance(e, metric)
            d = d[d > prior.duplicate]  # near-duplicate shots say nothing of the spread
            ratios.append(d / max(float(prior.spread(np.array([len(e)]))[0]), 1e-12))
    pooled = np.concatenate(ratios) if ratios else np.zeros(0)
    return float(np.clip(np.median(pooled), 0.25, 4.0)) if len(pooled) else 1.0


def _confusion_curve(distance: np.ndarray, rate: np.ndarray, weight: float) -> tuple[float, float]:
    """Logistic fit of rate ≈ sigmoid(a + b·distance) (binomial, weighted by queries; Newton steps,
    a small ridge so a separable set stays finite)."""
    x = np.stack([np.ones_like(distance), distance], 1)
    w = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -50, 50)))
        grad = x.T @ (p - rate) * weight + 1e-3 * w
        hess = (x * (p * (1 - p) * weight)[:, None]).T @ x + 1e-3 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def fit_metric_prior(embeddings: np.ndarray, labels: np.ndarray, metric: str, support_embeddings: np.ndarray | None = None,
                     episodes: int = 200, seed: int = 0, shot_grid: tuple[int, ...] = SHOT_GRID) -> MetricPrior:
    """The prior in one metric from labelled embeddings of classes the device will not see (the
    model's training or validation classes): for each shot count that the classes' sizes allow."""
    support_embeddings = embeddings if support_embeddings is None else support_embeddings
    per_class = class_rows(labels)
    if len(per_class) < KNOWN_WAY + STRANGER_WAY:
        raise BundleError(f"the open-set prior needs {KNOWN_WAY + STRANGER_WAY} classes, the data has {len(per_class)}")
    smallest = min(len(r) for r in per_class)
    rows, within = [], []
    for shot in shot_grid:
        queries = min(QUERIES, smallest - shot)
        if queries < MIN_QUERIES:
            break
        nearest, correct, stranger, pair_d, pair_rate = [], [], [], [], []
        loo: list[np.ndarray] = []
        for i in range(episodes):
            ep = open_set_episode(per_class, shot, queries, seed, i)
            s, protos, shots = score_episode(ep, embeddings, support_embeddings, metric)
            nearest.append(s.nearest)
            correct.append(s.predicted == s.labels)
            stranger.append(s.labels < 0)
            d, known_labels = s.distances[s.labels >= 0], s.labels[s.labels >= 0]
            if shot >= 2:  # each shot against the mean of its class's other shots
                loo.extend(leave_one_out_distance(c, metric) for c in shots)
            # pairwise confusion: the share of a's queries nearer b's prototype than a's
            between = embedding_distance(protos, protos, metric)
            for a in range(KNOWN_WAY):
                mine = d[known_labels == a]
                for b in range(KNOWN_WAY):
                    if a != b:
                        pair_rate.append(float((mine[:, b] < mine[:, a]).mean()))
                        pair_d.append(float(between[a, b]))
            if shot >= 2 and i < 50:  # distances between different photos of one class
                for c in shots:
                    dd = embedding_distance(c, c, metric)
                    within.append(dd[np.triu_indices(len(c), 1)])
        n, ok, st = np.concatenate(nearest), np.concatenate(correct), np.concatenate(stranger)
        t = best_threshold(n, ok, st)
        point = operating_point(n, ok, st, t)
        outlier = float(np.quantile(np.concatenate(loo), OUTLIER_QUANTILE)) if loo else math.inf
        spread = float(np.median(np.concatenate(loo))) if loo else math.inf
        rows.append(ShotPrior(shot, t, outlier, spread, point["known_right"],
                              point["unknown_rejected"], float(ok[~st].mean()), auroc(n[~st], n[st]),
                              _confusion_curve(np.array(pair_d), np.array(pair_rate), float(queries))))
    if not rows:
        raise BundleError(f"the open-set prior needs classes of at least 1 shot + {MIN_QUERIES} queries; the smallest has {smallest}")
    duplicate = float(np.quantile(np.concatenate(within), DUPLICATE_QUANTILE)) if within else 0.0
    if len(rows) > 1 and not math.isfinite(rows[0].outlier_limit):  # one shot has no others: the 2-shot values
        rows[0] = ShotPrior(**{**rows[0].__dict__, "outlier_limit": rows[1].outlier_limit, "spread": rows[1].spread})
    elif not math.isfinite(rows[0].outlier_limit):
        rows[0] = ShotPrior(**{**rows[0].__dict__, "outlier_limit": 1e6, "spread": 1e6})
    return MetricPrior(metric, tuple(rows), duplicate)


def fit_prior(embeddings: np.ndarray, labels: np.ndarray, source: str, support_embeddings: np.ndarray | None = None,
              episodes: int = 200, seed: int = 0) -> OpenSetPrior:
    """The prior in both metrics (the bundle's head rejects in one; another head may use the other)."""
    return OpenSetPrior({m: fit_metric_prior(embeddings, labels, m, support_embeddings, episodes, seed) for m in METRICS},
                        source, len(class_rows(labels)), episodes)


# ------------------------------------------------------------------------------------------ the decision
def support_set_threshold(embeddings_by_class: list[np.ndarray], metric: str, slack: float = 1.25) -> float | None:
    """Without a prior: a distance from the support set alone. With ≥ 2 shots in some class, the
    largest leave-one-out distance of a shot to the mean of its class's other shots, times `slack`;
    with one shot per class, half the smallest distance between two prototypes — over every pair
    up to SUPPORT_SAMPLE classes, beyond that from a seeded sample of SUPPORT_SAMPLE classes to all
    (time linear in the classes: 100,000 one-shot classes took 379 s every pair). None for a single
    one-shot class."""
    loo = [leave_one_out_distance(e, metric) for e in embeddings_by_class if len(e) >= 2]
    if loo:
        return float(np.max(np.concatenate(loo)) * slack)
    if len(embeddings_by_class) >= 2:
        protos = np.stack([e.mean(0) for e in embeddings_by_class])
        picked = np.arange(len(protos)) if len(protos) <= SUPPORT_SAMPLE else \
            np.sort(np.random.default_rng(0).choice(len(protos), SUPPORT_SAMPLE, replace=False))
        nearest = np.inf
        for i in range(0, len(picked), 256):
            rows = picked[i:i + 256]
            d = embedding_distance(protos[rows], protos, metric)
            d[np.arange(len(rows)), rows] = np.inf
            nearest = min(nearest, float(d.min()))
        return nearest / 2
    return None


@dataclass(frozen=True)
class RejectionRule:
    """What `--unknown auto` applies to an enrolled state: a distance limit per class, and the
    negative examples (a query nearer to one of them than to its nearest class is unknown)."""

    limits: np.ndarray | None      # [C] float32, None: never reject by distance
    how: str                       # "prior" | "support set" | "none"
    negatives: np.ndarray | None = None   # [n, D] embeddings of corrections "not this"

    def limit_per_query(self, nearest_class: np.ndarray) -> np.ndarray | None:
        return None if self.limits is None else self.limits[nearest_class]


def describe_rule(prior: OpenSetPrior | None, metric: str) -> dict:
    """How auto decides, for `inspect` and `GET /v1/model`."""
    p = prior.for_metric(metric) if prior is not None else None
    if prior is None or p is None:
        return {"rule": "support set",
                "detail": "no open-set prior in this bundle (re-export it with this edgemeta): with several shots, "
                          "1.25 × the farthest shot from its class's other shots; with one shot, half the smallest "
                          "distance between two classes"}
    return {"rule": "prior", "metric": metric, "measured_on": prior.source,
            "detail": "each class's distance limit is the prior's at its shot count (interpolated); a query nearer "
                      "a negative example than any class is unknown",
            "thresholds": {str(r.shots): round(r.threshold, 6) for r in p.rows},
            "expected": {str(r.shots): {"known_right": round(r.known_right, 4), "unknown_rejected": round(r.unknown_rejected, 4)}
                         for r in p.rows}}
