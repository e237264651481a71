"""Head adaptation side by side: edgemeta's NumPy heads vs a PyTorch nn.Linear fine-tune (SGD step
on cached features) vs scikit-learn LogisticRegression.fit, on the same real features, same way/shot.

    python benchmarks/heads.py [--bundle BUNDLE] [--way 5] [--shot 1,5]
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np
from common import ROOT, SHIPPED_DATA, fmt_ms, interleaved, machine


def features(bundle: str | None) -> np.ndarray:
    from edgemeta.runtime import FewShotClassifier

    from edgemeta.data import load_dataset
    clf = FewShotClassifier.load(bundle, backend="onnxruntime")
    spec = clf.bundle.spec
    data = load_dataset(SHIPPED_DATA, (spec.height, spec.width), spec.colour)
    return clf.embed(data.pixels[:2000])


def heads_at(ref: str):
    """runtime/heads.py as it was at a git ref, as a module (its relative imports resolve to today's
    runtime package, whose errors module it needs)."""
    import importlib.util
    import subprocess
    import sys
    source = subprocess.run(["git", "show", f"{ref}:runtime/heads.py"], check=True, capture_output=True, text=True,
                            cwd=ROOT).stdout
    spec = importlib.util.spec_from_loader("edgemeta.runtime._heads_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "edgemeta.runtime"
    sys.modules[spec.name] = module
    exec(compile(source, f"{ref}:runtime/heads.py", "exec"), module.__dict__)
    return module


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="demo-out/bundle")
    ap.add_argument("--way", type=int, default=5)
    ap.add_argument("--shot", default="1,5")
    ap.add_argument("--before", help="a git ref: time that commit's runtime/heads.py logistic step side by side")
    args = ap.parse_args()
    import torch
    from edgemeta.runtime import heads
    from sklearn.linear_model import LogisticRegression
    before = heads_at(args.before) if args.before else None
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # sklearn's ConvergenceWarning at max_iter=100, what users run
    feats = features(args.bundle).astype(np.float32)
    print(f"machine: {machine()}; features {feats.shape[1]}-d from {args.bundle}; torch {torch.__version__}")
    print("numpy step = marginal cost of one logistic SGD step; torch step = nn.Linear forward+backward+SGD.step;"
          " sklearn = LogisticRegression(max_iter=100).fit, compared with a whole 10-step numpy fit")
    print(f"{'way×shot':>9} | {'numpy step':>11} | {'torch step':>11} | {'ratio':>6} | {'proto fit':>10} | "
          f"{'ridge fit':>10} | {'sklearn fit':>11} | sklearn/numpy-10-steps")
    rng = np.random.default_rng(0)
    for shot in [int(s) for s in args.shot.split(",")]:
        way = args.way
        idx = rng.choice(len(feats), way * shot, replace=False)
        s, y = feats[idx], np.repeat(np.arange(way), shot)
        w0, b0 = heads.imprinted_init(heads.class_means(s, y, way))

        # edgemeta: the marginal cost of one SGD step = (11 steps − 1 step) / 10, same init
        numpy_1 = lambda: heads.logistic_fit(s, y, way, 1, 0.1, weight=w0, bias=b0, momentum=0.9)  # noqa: E731
        numpy_11 = lambda: heads.logistic_fit(s, y, way, 11, 0.1, weight=w0, bias=b0, momentum=0.9)  # noqa: E731
        numpy_10 = lambda: heads.logistic_fit(s, y, way, 10, 0.1, momentum=0.9)  # noqa: E731
        extra = {}
        if before is not None:
            extra = {"before1": lambda: before.logistic_fit(s, y, way, 1, 0.1, weight=w0, bias=b0, momentum=0.9),
                     "before11": lambda: before.logistic_fit(s, y, way, 11, 0.1, weight=w0, bias=b0, momentum=0.9)}
        # what a user writes in torch: nn.Linear, CrossEntropyLoss, optimizer.step() on cached features
        st, yt = torch.from_numpy(s), torch.from_numpy(y)
        lin = torch.nn.Linear(s.shape[1], way)
        opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()

        def torch_step():
            opt.zero_grad()
            loss_fn(lin(st), yt).backward()
            opt.step()
        sk = lambda: LogisticRegression(max_iter=100).fit(s, y)  # noqa: E731
        t = interleaved({"numpy1": numpy_1, "numpy11": numpy_11, "torch": torch_step, "proto": lambda: heads.class_means(s, y, way),
                         "ridge": lambda: heads.ridge_fit(s, y, way, 1.0), "numpy10": numpy_10, "sklearn": sk, **extra},
                        rounds=5, repeats=30)
        t["numpy"] = (t["numpy11"] - t["numpy1"]) / 10
        if before is not None:
            step_before = (t["before11"] - t["before1"]) / 10
            print(f"  {way}×{shot}: step at {args.before} {fmt_ms(step_before)} ({t['torch'] / step_before:.1f}× faster than "
                  f"torch) · now {fmt_ms(t['numpy'])} ({t['torch'] / t['numpy']:.1f}×)")
        print(f"{way:>4}×{shot:<4} | {fmt_ms(t['numpy']):>11} | {fmt_ms(t['torch']):>11} | {t['torch'] / t['numpy']:>5.1f}× | "
              f"{fmt_ms(t['proto']):>10} | {fmt_ms(t['ridge']):>10} | {fmt_ms(t['sklearn']):>11} | "
              f"{t['sklearn'] / t['numpy10']:.0f}×")


if __name__ == "__main__":
    main()
