"""What INT8 costs and gains, measured side by side: few-shot accuracy on fixed episodes with the
bundle's head through ONNX Runtime, and latency at batch 1 and 32."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgemeta.runtime.errors import DataError
from edgemeta.runtime.heads import HeadConfig, head_logits
from edgemeta.runtime.preprocess import InputSpec, pixels_to_batch
from edgemeta.runtime.timing import summarize, time_call

from edgemeta.protocol import evaluate_episodes

CHECK_CLASSES, CHECK_IMAGES_PER_CLASS = 20, 60


def check_rows(labels: np.ndarray, groups: list[str], classes: int = CHECK_CLASSES,
               per_class: int = CHECK_IMAGES_PER_CLASS) -> tuple[list[int], np.ndarray]:
    """Which images the INT8 check embeds, from the images' labels and each class's group: the
    classes of the data's test split where it has one (else every class), at most `classes` of them
    evenly spread, the first `per_class` images of each — the check costs the same for a
    48,000-image calibration set as for a small one, and only its images are decoded. Returns (the
    class ids, the images' rows in ascending order)."""
    from edgemeta.data.imageset import indices_by_class
    from edgemeta.data.splits import split_classes
    try:
        ids = split_classes(groups, "test")
    except DataError:
        ids = list(range(len(groups)))
    ids = [ids[i] for i in np.unique(np.linspace(0, len(ids) - 1, min(classes, len(ids))).round().astype(int))]
    by_class = indices_by_class(labels, len(groups))
    return ids, np.sort(np.concatenate([by_class[c][:per_class] for c in ids]))


def compare_variants(fp32_path: Path, int8_path: Path, manifest: dict, eval_set, episodes: int = 200,
                     way: int = 5, shots: tuple[int, ...] = (1, 5)) -> dict:
    """INT8 against fp32 on `eval_set` (the images `check_rows` chose): accuracy on the same fixed
    episodes, and ONNX Runtime CPU latency at batch 1 and 32."""
    spec = InputSpec.from_dict(manifest["input"])
    dim, head = manifest["output"]["dim"], HeadConfig.from_dict(manifest["head"])
    fp32 = OnnxRuntimeBackend(fp32_path, spec, dim, "cpu")
    int8 = OnnxRuntimeBackend(int8_path, spec, dim, "cpu")
    fn = lambda s, y, q, n: head_logits(head, s, y, q, n)  # noqa: E731
    results = {}
    emb = {"fp32": fp32.embed_pixels(eval_set.pixels), "int8": int8.embed_pixels(eval_set.pixels)}  # the runtime's batches: 256 at 224 px held 4.7 GB
    for shot in shots:
        for name in ("fp32", "int8"):
            r = evaluate_episodes(emb[name], eval_set.labels, fn, way, shot, 15, episodes, seed=0)
            results[f"{name}_{way}w{shot}s"] = round(r.accuracy, 3)
    deltas = [results[f"int8_{way}w{s}s"] - results[f"fp32_{way}w{s}s"] for s in shots]
    speed = {}
    for batch in (1, 32):
        x = pixels_to_batch(eval_set.pixels[:batch])
        # interleave the two so machine noise hits both alike
        t32, t8 = [], []
        for _ in range(5):
            t32.extend(time_call(lambda: fp32.embed(x), repeats=10, warmup=2))
            t8.extend(time_call(lambda: int8.embed(x), repeats=10, warmup=2))
        speed[batch] = (summarize(t32)["p50_ms"], summarize(t8)["p50_ms"])
    return {
        "episodes": episodes, "eval_classes": eval_set.n_classes, "accuracy": results,
        "accuracy_delta_points": float(max(deltas, key=abs)),  # the larger change of the two shot settings
        "fp32_p50_ms_batch1": speed[1][0], "int8_p50_ms_batch1": speed[1][1],
        "fp32_p50_ms_batch32": speed[32][0], "int8_p50_ms_batch32": speed[32][1],
        "speedup_batch1": speed[1][0] / speed[1][1], "speedup_batch32": speed[32][0] / speed[32][1],
    }
