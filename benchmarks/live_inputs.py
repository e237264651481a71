"""Real-world inputs, side by side in one run (docs/benchmarks.md §9):

1. `predict` on one 12 MP JPEG: edgemeta's decoding (JPEG draft mode, then the model's resize)
   against the reference decode (full decode, then the same resize).
2. A 1080p video through `watch` (reader thread + embedding, runtime.sources/runtime.watch)
   against the naive loop a user would write: read a frame, convert to PIL, `predict` it.
3. The runtime's overhead: `FewShotClassifier.embed` on uint8 pixels and `predict` on pixels,
   against a bare `session.run` on the model's float32 NCHW input, at batch 1 and 32.

    python benchmarks/live_inputs.py [--bundle B]   (default: the shipped Tiny ImageNet EdgeNet, exported)
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT, SHIPPED_DATA, fmt_ms, interleaved, machine
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.preprocess import RESAMPLE, load_image, pixels_to_batch
from PIL import Image


def photo(width: int, height: int, seed: int = 0, grain: float = 4.0) -> np.ndarray:
    """A photo-like RGB image: a real drawing scaled up, with smooth colour and fine grain."""
    import zipfile
    with zipfile.ZipFile(SHIPPED_DATA[1]) as z:
        name = sorted(n for n in z.namelist() if n.endswith(".png"))[seed]
        drawing = Image.open(io.BytesIO(z.read(name))).convert("L").resize((width, height), Image.Resampling.BILINEAR)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    colour = np.stack([128 + 100 * np.sin(x / width * 6 + c) * np.cos(y / height * 4 + c) for c in range(3)], -1)
    image = colour * (np.asarray(drawing)[..., None] / 255.0) + rng.normal(0, grain, (height, width, 1))
    return np.clip(image, 0, 255).astype(np.uint8)


def export_default(out: Path) -> Path:
    from edgemeta.export import ExportOptions, export_checkpoint
    export_checkpoint(ROOT / "checkpoints/tinyimagenet-edgenet-pretrain.safetensors", out,
                      ExportOptions(calib_data=tuple(str(p) for p in SHIPPED_DATA), calib_images=64))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--frames", type=int, default=90)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    bundle = args.bundle or export_default(tmp / "bundle")
    clf = FewShotClassifier.load(bundle, backend="onnxruntime")
    spec = clf.bundle.spec
    print(f"# {machine()}; bundle {bundle} ({clf.bundle.manifest['model']['backbone']}, "
          f"{spec.colour} {spec.height}×{spec.width})")
    classes = {f"c{i}": [photo(640, 480, seed=10 * i + k) for k in range(3)] for i in range(3)}
    clf.enroll_many({label: np.stack([load_image(_jpeg(a), spec) for a in arrays]) for label, arrays in classes.items()})

    # 1. 12 MP JPEGs: how much draft mode saves depends on how much entropy decoding is left
    print("\n## 1. one 12 MP JPEG (4000×3000), p50 of interleaved rounds")
    for grain, quality in ((0, 85), (2, 85), (4, 90)):
        jpeg = _jpeg(photo(4000, 3000, seed=1, grain=grain), quality=quality)

        def reference():
            image = Image.open(io.BytesIO(jpeg))
            image.load()
            return np.asarray(image.convert(spec.colour).resize((spec.width, spec.height), RESAMPLE))
        t = interleaved({"edgemeta predict": lambda: clf.predict([jpeg]),
                         "reference": lambda: clf.predict(reference()[None] if spec.channels == 3
                                                          else reference()[None, ..., None])},
                        rounds=3, repeats=5, warmup=1)
        fast = load_image(jpeg, spec).astype(int)
        print(f"  {len(jpeg) / 1e6:.1f} MB (grain {grain}, q{quality}): predict {fmt_ms(t['edgemeta predict'])}, "
              f"full decode + resize + classify {fmt_ms(t['reference'])}: {t['reference'] / t['edgemeta predict']:.1f}×; "
              f"mean |draft − reference| {np.abs(fast - reference().reshape(fast.shape)).mean():.2f} grey levels")

    # 2. a 1080p video
    video = tmp / "1080p.avi"
    _write_video(video, args.frames)
    import cv2
    from edgemeta.runtime.sources import VideoSource
    from edgemeta.runtime.watch import watch

    def watch_fps() -> float:
        t0 = time.perf_counter()
        with VideoSource(str(video), spec, realtime=False) as source:
            summary = watch(clf, source)
        return summary.classified / (time.perf_counter() - t0)

    def naive_fps() -> float:
        t0 = time.perf_counter()
        capture, n = cv2.VideoCapture(str(video)), 0
        while True:
            ok, bgr = capture.read()
            if not ok:
                break
            clf.predict([Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))])
            n += 1
        return n / (time.perf_counter() - t0)
    rounds = [(watch_fps(), naive_fps()) for _ in range(3)]  # interleaved, so drift hits both alike
    watch_fps_, naive_fps_ = (float(np.median([r[i] for r in rounds])) for i in (0, 1))
    with VideoSource(str(video), spec) as source:
        path = "its JPEG frames decoded in draft mode" if source.compressed else "OpenCV's full decode"
    print(f"\n## 2. a 1080p MJPG video, {args.frames} frames, every frame classified, median of 3 interleaved rounds")
    print(f"  edgemeta watch (reader thread; {path}) {watch_fps_:6.1f} frames/s")
    print(f"  naive loop (read → PIL → predict)   {naive_fps_:6.1f} frames/s")
    print(f"  ratio {watch_fps_ / naive_fps_:.2f}×")

    # 3. overhead over a bare session.run
    session = clf.backend.session
    name = session.get_inputs()[0].name
    print("\n## 3. runtime overhead over a bare session.run (p50 of interleaved rounds)")
    for batch in (1, 32):
        pixels = np.stack([load_image(_jpeg(photo(640, 480, seed=50 + i)), spec) for i in range(batch)])
        x = pixels_to_batch(pixels)
        t = interleaved({"session.run": lambda: session.run(None, {name: x}), "embed": lambda: clf.embed(pixels),
                         "predict": lambda: clf.predict(pixels)}, rounds=5, repeats=20, warmup=3)
        print(f"  batch {batch:2d}: session.run {fmt_ms(t['session.run'])}, embed {fmt_ms(t['embed'])} "
              f"({t['embed'] / t['session.run']:.3f}×), predict {fmt_ms(t['predict'])} "
              f"({t['predict'] / t['session.run']:.3f}×)")


def _jpeg(array: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_video(path: Path, frames: int) -> None:
    import cv2
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (1920, 1080))
    base = [cv2.cvtColor(photo(1920, 1080, seed=s), cv2.COLOR_RGB2BGR) for s in range(3)]
    for i in range(frames):
        writer.write(base[(i // 30) % 3])
    writer.release()


if __name__ == "__main__":
    main()
