"""What INT8 costs and gains, measured side by side: few-shot accuracy on fixed episodes with the
bundle's head through ONNX Runtime, and latency at batch 1 and 32."""
from __future__ import annotations

from pathlib import Path

from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgemeta.runtime.errors import DataError
from edgemeta.runtime.heads import HeadConfig, head_logits
from edgemeta.runtime.preprocess import InputSpec, pixels_to_batch
from edgemeta.runtime.timing import summarize, time_call

from edgemeta.data import select_split
from edgemeta.protocol import evaluate_episodes

CHECK_CLASSES, CHECK_IMAGES_PER_CLASS = 20, 60


def bounded(data, classes: int = CHECK_CLASSES, per_class: int = CHECK_IMAGES_PER_CLASS):
    """At most `classes` classes (evenly spread over the set) of at most `per_class` images each:
    the INT8 check costs the same for a 48,000-image calibration set as for a small one."""
    import numpy as np

    from edgemeta.data.imageset import ImageSet, indices_by_class
    picked = np.unique(np.linspace(0, data.n_classes - 1, min(classes, data.n_classes)).round().astype(int))
    data = data.select_classes(picked)
    keep = np.sort(np.concatenate([idx[:per_class] for idx in indices_by_class(data.labels, data.n_classes)]))
    return ImageSet(data.pixels[keep], data.labels[keep], data.classes, data.groups)


def compare_variants(fp32_path: Path, int8_path: Path, manifest: dict, dataset, episodes: int = 200,
                     way: int = 5, shots: tuple[int, ...] = (1, 5)) -> dict:
    spec = InputSpec.from_dict(manifest["input"])
    dim, head = manifest["output"]["dim"], HeadConfig.from_dict(manifest["head"])
    try:
        eval_set = select_split(dataset, "test")
    except DataError:
        eval_set = dataset
    eval_set = bounded(eval_set)
    fp32 = OnnxRuntimeBackend(fp32_path, spec, dim, "cpu")
    int8 = OnnxRuntimeBackend(int8_path, spec, dim, "cpu")
    fn = lambda s, y, q, n: head_logits(head, s, y, q, n)  # noqa: E731
    results = {}
    emb = {"fp32": fp32.embed_pixels(eval_set.pixels, 256), "int8": int8.embed_pixels(eval_set.pixels, 256)}
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
