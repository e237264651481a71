"""Enrollment cost per shot (decode + embed + fit, end to end through FewShotClassifier) against
the Coral Edge TPU weight-imprinting reference figure.

The reference line (≈ 4–6 ms per shot on Edge TPU boards) is the figure quoted in issue #6 from
pycoral's imprinting benchmark CSVs; it is NOT measured here (no Edge TPU), and it is for a
MobileNet-sized backbone at 224 px, so the ratio compares systems, not equal models.

    python benchmarks/enrollment.py [--bundle BUNDLE] [--shots 1,5,10]
"""
from __future__ import annotations

import argparse
import zipfile

import numpy as np
from common import SHIPPED_DATA, machine

CORAL_MS_PER_SHOT = (4.0, 6.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="demo-out/bundle")
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--classes", type=int, default=20)
    args = ap.parse_args()
    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.timing import time_call
    z = zipfile.ZipFile(SHIPPED_DATA[1])
    pngs = [z.read(n) for n in sorted(z.namelist()) if n.endswith(".png")]
    clf = FewShotClassifier.load(args.bundle, backend="onnxruntime")
    print(f"machine: {machine()}; bundle {args.bundle} ({clf.bundle.manifest['model']['backbone']}, "
          f"{clf.bundle.spec.height}×{clf.bundle.spec.width})")
    print(f"{'shots':>5} | {'ms per class p50':>16} | {'ms per shot':>11} | vs Coral 4–6 ms/shot")
    for shot in [int(s) for s in args.shots.split(",")]:
        counter = iter(range(10 ** 9))
        t = time_call(lambda: clf.enroll(f"{shot}-{next(counter)}", pngs[next(counter) % 1000:][:shot]), args.classes, 2)
        per_shot = float(np.median(t)) * 1e3 / shot
        print(f"{shot:>5} | {np.median(t) * 1e3:>16.3f} | {per_shot:>11.3f} | "
              f"{CORAL_MS_PER_SHOT[0] / per_shot:.0f}–{CORAL_MS_PER_SHOT[1] / per_shot:.0f}× faster")


if __name__ == "__main__":
    main()
