"""How right the enrollment feedback is (runtime.review) and what negatives do, on classes the
model never trained on, through the deployed path (the bundle's graph, FewShotClassifier):

- confusion: each 5-class episode's estimated pairwise confusion (what `review` reports) against
  the pair's real confusion on 15 queries per class (the share of a's and b's queries nearer the
  other's prototype than their own): Spearman rank correlation, and how many of the truly confused pairs
  (real ≥ 10%) are flagged (estimate ≥ 10%), and how many flagged pairs are truly confused;
- outlier shots: the share of clean shots flagged, and of a shot swapped in from another class;
- duplicates: five copies of one image flagged, and different photos flagged as duplicates;
- negatives: a stranger accepted under auto, 3 of its images corrected "none of these": the share
  of its other images then rejected, and known right before → after on the enrolled classes.

    python benchmarks/enrollment_feedback.py BUNDLE --data cifar-fs --split-file data/splits/cifar-fs.json \\
        --split val [--shot 5] [--episodes 300] [--json OUT]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
from common import machine
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.classifier import UNKNOWN
from edgemeta.runtime.open_set import CONFUSION_FLAG, class_rows, domain_scale, embedding_distance, open_set_episode

from edgemeta.data import load_dataset, select_split


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (most real confusions are exactly 0)."""
    order = x.argsort(kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    return (np.bincount(inverse, r) / np.bincount(inverse))[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--split-file", default="")
    ap.add_argument("--split-mode", default="auto")
    ap.add_argument("--split", default="val")
    ap.add_argument("--shot", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()
    clf = FewShotClassifier.load(args.bundle, backend="onnxruntime")
    spec = clf.bundle.spec
    data = select_split(load_dataset(args.data, (spec.height, spec.width), spec.colour), args.split, args.split_mode, 0,
                        args.split_file)
    z = clf.embed(data.pixels)
    support = clf.embed_support(data.pixels) if clf.head.flip_shots else z
    per_class = class_rows(data.labels)
    metric = clf.head.rejection_metric(clf.bundle.l2_normalized)
    est, real, clean_flags, swapped_flags, dup_true, dup_false, flagged_pairs = [], [], [], [], [], [], []
    neg_before, neg_after, right_before, right_after = [], [], [], []
    k = args.shot
    for i in range(args.episodes):
        ep = open_set_episode(per_class, k, 15, 1, i)
        names = [f"c{j}" for j in range(5)]
        rows = {names[j]: support[ep.support[ep.support_labels == j]] for j in range(5)}
        swapped = names[4]
        rows[swapped] = rows[swapped].copy()
        rows[swapped][-1] = support[ep.query[-1]]          # a stranger's image as its last shot
        dup = z[ep.query[:1]].repeat(5, 0)                     # five copies of one image
        episode = FewShotClassifier(clf.bundle, clf.backend, clf.head)
        episode.enroll_embeddings({**rows, "copies": np.ascontiguousarray(dup)})
        report = episode.review()
        flags = {(f["label"], f["index"], f["flag"]) for f in report["shots"]}
        for j in range(4):
            clean_flags += [(names[j], s, "outlier") in flags for s in range(k)]
        swapped_flags.append((swapped, k - 1, "outlier") in flags)
        dup_true.append(all(("copies", s, "duplicate") in flags for s in range(1, 5)))
        dup_false.append(np.mean([(names[j], s, "duplicate") in flags for j in range(4) for s in range(k)]))
        # confusion: the four clean classes, the review's estimate (the same prior curve and domain
        # scale, for every pair, also those it does not list) against reality
        prior = clf.bundle.open_set.for_metric(metric)
        scale = domain_scale([rows[n] for n in names] + [dup], prior, metric)
        protos = np.stack([rows[n].mean(0) for n in names[:4]])
        listed = {frozenset((p["a"], p["b"])): p["confusion"] for p in report["pairs"]}
        q = z[ep.query[ep.query_labels >= 0]]
        ql = ep.query_labels[ep.query_labels >= 0]
        d = embedding_distance(q, protos, metric)
        for a in range(4):
            for b in range(a + 1, 4):
                ab = d[ql == a]
                ba = d[ql == b]
                # the pair's real confusion: a's queries nearer b's prototype and b's nearer a's, together
                real.append((float((ab[:, b] < ab[:, a]).mean()) + float((ba[:, a] < ba[:, b]).mean())) / 2)
                d_ab = embedding_distance(protos[a:a + 1], protos[b:b + 1], metric)[0, 0] / scale
                est.append(float(prior.confusion(np.array([d_ab]), np.array([k]))[0]))
                flagged_pairs.append(listed.get(frozenset((names[a], names[b])), 0.0) >= CONFUSION_FLAG)
        # negatives: the most accepted stranger of this episode
        strangers = ep.classes[5:]
        clean = FewShotClassifier(clf.bundle, clf.backend, clf.head)
        clean.enroll_embeddings({n: support[ep.support[ep.support_labels == j]] for j, n in enumerate(names)})
        known_q, known_l = z[ep.query[ep.query_labels >= 0]], ep.query_labels[ep.query_labels >= 0]
        accepted = [np.mean([lab != UNKNOWN for lab in clean.classify_embeddings(z[per_class[c][:18]], reject="auto").labels])
                    for c in strangers]
        c = strangers[int(np.argmax(accepted))]
        rest = z[per_class[c][3:18]]
        neg_before.append(np.mean([lab == UNKNOWN for lab in clean.classify_embeddings(rest, reject="auto").labels]))
        right_before.append(np.mean(np.array(clean.classify_embeddings(known_q, reject="auto").labels) == np.array(names)[known_l]))
        clean.add_negatives(np.ascontiguousarray(z[per_class[c][:3]]))
        neg_after.append(np.mean([lab == UNKNOWN for lab in clean.classify_embeddings(rest, reject="auto").labels]))
        right_after.append(np.mean(np.array(clean.classify_embeddings(known_q, reject="auto").labels) == np.array(names)[known_l]))
    est_a, real_a = np.array(est), np.array(real)
    truly, flagged = real_a >= CONFUSION_FLAG, np.array(flagged_pairs)
    out = {"bundle": args.bundle, "split": args.split, "classes": len(per_class), "shot": k, "episodes": args.episodes,
           "machine": machine(),
           "confusion": {"spearman": round(spearman(est_a, real_a), 3), "pairs": len(est_a),
                         "truly_confused": int(truly.sum()), "flagged_of_truly_confused": round(float(flagged[truly].mean()), 3),
                         "truly_confused_of_flagged": round(float(truly[flagged].mean()), 3) if flagged.any() else None,
                         "mean_estimate": round(float(est_a.mean()), 4), "mean_real": round(float(real_a.mean()), 4)},
           "outlier": {"clean_shots_flagged": round(float(np.mean(clean_flags)), 4),
                       "swapped_shot_flagged": round(float(np.mean(swapped_flags)), 4)},
           "duplicate": {"five_copies_flagged": round(float(np.mean(dup_true)), 4),
                         "different_photos_flagged": round(float(np.mean(dup_false)), 4)},
           "negatives": {"stranger_rejected_before": round(float(np.mean(neg_before)), 4),
                         "stranger_rejected_after_3": round(float(np.mean(neg_after)), 4),
                         "known_right_before": round(float(np.mean(right_before)), 4),
                         "known_right_after": round(float(np.mean(right_after)), 4)}}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
