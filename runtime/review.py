"""What a person should hear after enrolling: which classes will be confused, which shots look like
another object or a bad frame, which are near-duplicates, and whether more shots would help —
estimated from the support embeddings and the bundle's open-set prior (runtime.open_set).

    review(classes, prior, metric)              → the whole store's report
    review(classes, prior, metric, only="mug")  → what enrolling "mug" changed (the enrollment's feedback)

JSON: {"pairs": [{"a", "b", "confusion"}] (highest first), "shots": [{"label", "index", "flag", ...}],
"classes": [{"label", "shots", "advice": [text]}]}.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import ConfigError
from .open_set import ADVICE_GAIN, CONFUSION_FLAG, SHOT_GRID, MetricPrior, domain_scale, embedding_distance, leave_one_out_distance

MAX_REVIEW_CLASSES = 5_000     # the whole store's pairs: beyond this, review one class at a time
MAX_PAIRS = 100                # pairs listed (highest confusion first)
BLOCK = 256                    # class rows compared at once: memory linear in the classes


def _pairs(protos: np.ndarray, shots: np.ndarray, labels: Sequence[str], prior: MetricPrior, metric: str,
           rows: np.ndarray, scale: float) -> list[dict]:
    """Estimated confusion of each class in `rows` with every other class, above CONFUSION_FLAG / 4
    (prototype distances divided by the store's domain scale)."""
    found = []
    for start in range(0, len(rows), BLOCK):
        block = rows[start:start + BLOCK]
        d = embedding_distance(protos[block], protos, metric).astype(np.float64) / scale
        d[np.arange(len(block)), block] = np.inf
        k = np.minimum(shots[block][:, None], shots[None, :])
        conf = prior.confusion(np.where(np.isfinite(d), d, 1e6), k)
        for i, j in zip(*np.nonzero(conf >= CONFUSION_FLAG / 4)):
            a, b = int(block[i]), int(j)
            found.append((float(conf[i, j]), a, b))
    seen: set[tuple[int, int]] = set()
    out: list[dict] = []
    for estimate, a, b in sorted(found, key=lambda t: (-t[0], t[1], t[2])):
        key = (min(a, b), max(a, b))
        if key in seen:
            continue
        seen.add(key)
        out.append({"a": labels[a], "b": labels[b], "confusion": round(estimate, 4)})
        if len(out) == MAX_PAIRS:
            break
    return out


def _shot_flags(label: str, embeddings: np.ndarray, prior: MetricPrior | None, metric: str) -> list[dict]:
    flags = []
    k = len(embeddings)
    if prior is not None and k >= 3:  # a shot against the mean of the class's other shots
        d = leave_one_out_distance(embeddings, metric)
        limit = float(prior.outlier_limit(np.array([k]))[0])
        for i in np.flatnonzero(d > limit):
            flags.append({"label": label, "index": int(i), "flag": "outlier", "distance": round(float(d[i]), 6),
                          "limit": round(limit, 6)})
    if k >= 2:
        d = embedding_distance(embeddings, embeddings, metric)
        near = prior.duplicate if prior is not None else 0.0
        near = max(near, 1e-6 if metric == "cosine" else 1e-6 * float(np.abs(embeddings).max()))
        done = set()
        for i, j in zip(*np.nonzero(np.triu(d <= near, 1))):
            if int(j) not in done:
                done.add(int(j))
                flags.append({"label": label, "index": int(j), "flag": "duplicate", "of": int(i),
                              "distance": round(float(max(d[i, j], 0.0)), 6)})
    return flags


def _more_shots(k: int, prior: MetricPrior) -> str | None:
    now = float(prior.known_right(np.array([k]))[0])
    top = max(r.shots for r in prior.rows)
    for target in [s for s in SHOT_GRID if k < s <= top]:
        then = float(prior.known_right(np.array([target]))[0])
        if then - now >= ADVICE_GAIN:
            return (f"with {k} shot{'s' if k > 1 else ''} about {now:.0%} of its photos are recognised; "
                    f"{target - k} more shot{'s' if target - k > 1 else ''} would make it about {then:.0%}")
    return None


def review(classes, prior: MetricPrior | None, metric: str, only: str | None = None) -> dict:
    """The report over enrolled classes (runtime.store.EnrolledClass: label, embeddings); `only`
    limits it to one class's pairs, shots and advice (what its enrollment changed)."""
    labels = [c.label for c in classes]
    if only is not None and only not in labels:
        raise ConfigError(f"{only!r} is not enrolled")
    if only is None and len(classes) > MAX_REVIEW_CLASSES:
        raise ConfigError(f"{len(classes):,} classes: a whole-store review compares every pair; review one class "
                          f"at a time (--label) above {MAX_REVIEW_CLASSES:,}")
    pairs: list[dict] = []
    if prior is not None and len(classes) >= 2:
        protos = np.stack([c.embeddings.mean(0) for c in classes]).astype(np.float32)
        shots = np.array([c.shots for c in classes])
        rows = np.arange(len(classes)) if only is None else np.array([labels.index(only)])
        pairs = _pairs(protos, shots, labels, prior, metric, rows,
                       domain_scale([c.embeddings for c in classes[:MAX_REVIEW_CLASSES]], prior, metric))
    picked = [c for c in classes if only is None or c.label == only]
    shot_flags = [f for c in picked for f in _shot_flags(c.label, c.embeddings, prior, metric)]
    report = []
    for c in picked:
        advice = []
        for p in pairs:
            if c.label in (p["a"], p["b"]) and p["confusion"] >= CONFUSION_FLAG:
                other = p["b"] if p["a"] == c.label else p["a"]
                advice.append(f"looks like {other!r}: about {p['confusion']:.0%} of its photos may be taken for "
                              f"{other!r}; add shots that show how they differ")
        mine = [f for f in shot_flags if f["label"] == c.label]
        for f in mine:
            if f["flag"] == "outlier":
                advice.append(f"shot {f['index'] + 1} is far from the others (probably another object or a bad "
                              "frame); replace it")
        for first in sorted({f["of"] for f in mine if f["flag"] == "duplicate"}):
            same = [f["index"] + 1 for f in mine if f["flag"] == "duplicate" and f["of"] == first]
            which = f"shot {same[0]} is" if len(same) == 1 else f"shots {', '.join(map(str, same))} are"
            advice.append(f"{which} nearly the same picture as shot {first + 1}; add variety (another angle, distance "
                          "or light)")
        if prior is not None:
            more = _more_shots(c.shots, prior)
            if more:
                advice.append(more)
        else:
            advice.append("this bundle has no open-set prior, so confusion and shot estimates are limited; "
                          "re-export it with this edgemeta")
        report.append({"label": c.label, "shots": c.shots, "advice": advice})
    return {"pairs": pairs, "shots": shot_flags, "classes": report}
