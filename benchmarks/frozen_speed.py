"""Predict through a frozen graph (one ONNX Runtime call: backbone + head) against the runtime's
embed + NumPy head, side by side, batch 1 and 32 (docs/benchmarks.md §11).

    python benchmarks/frozen_speed.py
"""
from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from common import ROOT, SHIPPED_DATA, fmt_ms, interleaved, machine
from edgemeta.export import ExportOptions, export_checkpoint
from edgemeta.export.freeze import freeze
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.frozen import FrozenClassifier
from edgemeta.runtime.preprocess import load_images


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    export_checkpoint(ROOT / "checkpoints/omniglot-conv4-protonet.safetensors", tmp / "b",
                      ExportOptions(calib_data=(str(SHIPPED_DATA[1]),), calib_images=64))
    with zipfile.ZipFile(SHIPPED_DATA[1]) as z:
        names = sorted(n for n in z.namelist() if "/Tagalog/" in n and n.endswith(".png"))
        by_char: dict[str, list[bytes]] = {}
        for n in names:
            by_char.setdefault(n.split("/")[-2], []).append(z.read(n))
    print(f"# {machine()}; shipped Omniglot Conv4, 10 Tagalog characters enrolled (5 shots)")
    for head in ("prototype", "logistic"):
        clf = FewShotClassifier.load(tmp / "b", store=tmp / f"s-{head}", head=head)
        chars = sorted(by_char)[:10]
        clf.enroll_many({c: by_char[c][:5] for c in chars})
        freeze(tmp / "b", tmp / f"s-{head}", tmp / f"f-{head}")
        frozen = FrozenClassifier.load(tmp / f"f-{head}")
        for batch in (1, 32):
            pixels = load_images([by_char[chars[i % 10]][10 + i % 10] for i in range(batch)], clf.bundle.spec)
            t = interleaved({"embed + numpy head": lambda: clf.predict(pixels),
                             "frozen graph": lambda: frozen.predict(pixels)}, rounds=5, repeats=30)
            print(f"  {head:9s} batch {batch:2d}: embed + numpy head {fmt_ms(t['embed + numpy head'])}, "
                  f"frozen graph {fmt_ms(t['frozen graph'])} "
                  f"(frozen {t['embed + numpy head'] / t['frozen graph']:.2f}× faster)")


if __name__ == "__main__":
    main()
