"""Make bundles: from a checkpoint, from any ONNX embedding model, and add TensorRT engines."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgemeta.runtime.bundle import MANIFEST, SCHEMA, SCHEMA_VERSION, load_bundle, register_file, sha256_file, write_manifest
from edgemeta.runtime.errors import BundleError, ConfigError, DataError
from edgemeta.runtime.heads import HeadConfig
from edgemeta.runtime.preprocess import InputSpec, pixels_to_batch
from edgemeta.runtime.progress import SILENT, Progress

import edgemeta

PARITY_IMAGES = 64


@dataclass(frozen=True)
class ExportOptions:
    """What `export_checkpoint` and `wrap_onnx` make (one options object, as ONNX Runtime's
    quantize(model_in, model_out, config))."""

    l2_normalize: bool = False        # L2-normalise embeddings inside the graph (the head then uses cosine)
    center: bool | None = None        # CL2N: subtract the training classes' mean embedding, then L2-normalise
                                      # (None: as the checkpoint records, Checkpoint.center)
    flip_shots: bool = False          # the bundle's head averages each support image with its mirror
    int8: bool = False                # add an INT8 (QDQ, per-channel) variant calibrated on real images
    fp16: bool = False                # add an FP16 variant
    calib_data: tuple[str, ...] = ()  # real images (folders or zips) for parity, calibration, the INT8 check
    calib_images: int = 256
    eval_episodes: int = 200          # episodes of the INT8 accuracy check
    overwrite: bool = False           # replace an existing bundle (never a folder that is not one)
    image_size: int | None = None     # checkpoints of globally pooled backbones: export for this square input size

    def __post_init__(self) -> None:
        if self.calib_images < 1:
            raise ConfigError(f"--calib-images must be ≥ 1, got {self.calib_images}")
        if self.eval_episodes < 1:
            raise ConfigError(f"eval_episodes must be ≥ 1, got {self.eval_episodes}")
        object.__setattr__(self, "calib_data", tuple(str(p) for p in self.calib_data))


@dataclass(frozen=True)
class EngineOptions:
    """A TensorRT engine build on the device (`edgemeta build-engine`)."""

    precision: str = "fp32"           # fp32 | fp16 | int8: built from that ONNX variant
    batch: str = "1:8:64"             # the batch profile MIN:OPT:MAX (MAX: runtime.backends.base.MAX_BATCH)
    workspace_mb: int = 1024
    dla_core: int | None = None
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.workspace_mb < 1:
            raise ConfigError(f"--workspace-mb must be ≥ 1, got {self.workspace_mb}")


def reference_images(sources: list[str], spec: InputSpec, count: int, int8_check: bool = False, seed: int = 0):
    """Real images at the model's input spec, decoding only those used: (a seeded sample of `count`
    float32 NCHW images for parity and calibration, and with `int8_check` the ImageSet the INT8
    check embeds, else None)."""
    from edgemeta.data.imageset import ImageSet
    from edgemeta.data.loading import index_images

    from .int8_report import check_rows
    if not sources:
        raise DataError("no reference images: pass --calib-data DIR (a folder or .zip of real images)")
    index = index_images(sources)
    pick = np.sort(np.random.default_rng(seed).choice(len(index), min(count, len(index)), replace=False))
    classes, check = check_rows(index.labels, index.groups) if int8_check else ([], pick[:0])
    rows = np.union1d(pick, check)
    data = index.decode(rows, spec)
    calibration = pixels_to_batch(data.pixels[np.searchsorted(rows, pick)])
    if not int8_check:
        return calibration, None
    at = np.searchsorted(rows, check)
    return calibration, ImageSet(data.pixels[at], data.labels[at], data.classes, data.groups).select_classes(classes)


def synthetic_images(spec: InputSpec, count: int, seed: int = 0) -> np.ndarray:
    """Deterministic image-like inputs (smooth random fields with edges, 0–255) as float32 NCHW, for a
    parity check where no real images are at hand: unlike white noise they drive a network's
    activations through the ranges real images do."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (count, spec.channels, 4, 4)).astype(np.float32)
    rows = np.linspace(0, 3, spec.height).round().astype(int)
    cols = np.linspace(0, 3, spec.width).round().astype(int)
    blocks = coarse[:, :, rows][:, :, :, cols]                                 # 4×4 blocks of flat colour
    texture = rng.normal(0, 12, (count, spec.channels, spec.height, spec.width)).astype(np.float32)
    return np.clip(blocks + texture, 0, 255).astype(np.float32)


def _new_manifest(spec: InputSpec, input_name: str, output_name: str, dim: int, l2: bool, head: HeadConfig,
                  model: dict) -> dict:
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "edgemeta_version": edgemeta.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "input": {"name": input_name, **spec.to_dict(),
                  "note": "decoded pixels: uint8 values as float32, NCHW, resized to height×width; "
                          "scaling and mean/std are inside the graph"},
        "output": {"name": output_name, "dim": dim, "l2_normalized": l2},
        "head": head.to_dict(), "files": {}, "variants": {}, "engines": [],
    }


@contextlib.contextmanager
def bundle_target(out: Path, overwrite: bool, sources: tuple[Path, ...] = ()):
    """Build a bundle into a temporary folder beside `out` and move it into place only when it is
    complete. `out` may be replaced only if it is empty or an edgemeta bundle (and --overwrite):
    a folder of anything else is never deleted, and a failed export leaves the old bundle intact."""
    out = Path(out)
    resolved = out.resolve()
    for src in sources:
        own = Path(src).resolve()
        if resolved == own or resolved in own.parents or own in resolved.parents:
            raise BundleError(f"--out {out} contains the source {src} or lies inside it; choose another --out")
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not out.is_dir():
            raise BundleError(f"--out {out} exists and is not a folder; choose another --out")
        if any(out.iterdir()):
            if not (out / MANIFEST).is_file():
                raise BundleError(f"--out {out} is a folder that is not an edgemeta bundle (no {MANIFEST}); "
                                  "edgemeta will not replace it — choose another --out")
            if not overwrite:
                raise BundleError(f"{out} exists and is not empty; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        try:
            yield building
        except OSError as exc:
            if exc.filename is None:  # a full disk says ENOSPC but not where: the bundle being written
                raise OSError(exc.errno, exc.strerror or str(exc), str(out)) from None
            raise
        os.chmod(building, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "bundle")
            os.replace(building, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # never leave a half-written bundle behind


def _findable(source: str) -> bool:
    from edgemeta.data.sources import resolve_source
    try:
        resolve_source(source)
        return True
    except DataError:
        return False


def export_checkpoint(checkpoint: str | Path, out: str | Path, options: ExportOptions = ExportOptions(),
                      progress: Progress = SILENT) -> dict:
    """Checkpoint → bundle with embed.onnx (parity-checked), optional INT8 and FP16 variants."""
    from edgemeta.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint).at_image_size(options.image_size)
    spec = ckpt.spec
    out = Path(out)
    sources = list(options.calib_data or [p for p in ckpt.meta.get("train_config", {}).get("data", []) if _findable(p)])
    if sources:
        real, check_set = reference_images(sources, spec, max(options.calib_images, PARITY_IMAGES), options.int8)
    elif options.int8:
        raise DataError("INT8 is calibrated on real images: pass --calib-data DIR (a folder or .zip of images like "
                        "the ones the model will see)")
    else:  # fp32 (and fp16) exports anywhere: parity on deterministic synthetic images, said so
        real, check_set = synthetic_images(spec, PARITY_IMAGES), None
        progress.message(f"no reference images at hand (the training data is not here and no --calib-data): parity "
                         f"is checked on {PARITY_IMAGES} deterministic synthetic images")
    with bundle_target(out, options.overwrite, (Path(checkpoint),)) as building:
        manifest = _export(ckpt, Path(checkpoint), building, real, bool(sources), check_set, options, progress.message)
    return manifest


def _export(ckpt, checkpoint: Path, out: Path, real: np.ndarray, real_images: bool, check_set, options: ExportOptions,
            report: Callable[[str], None]) -> dict:
    from edgemeta.pretrained import notice_text

    from .onnx_graph import PARITY_RTOL, ExportEmbedder, export_onnx, graph_io, parity
    centring = ckpt.centring(options.center)
    l2_normalize, calib_images = options.l2_normalize or centring, options.calib_images
    spec = ckpt.spec
    embedder = ckpt.build_embedder()
    center, centered = None, None
    if centring:
        from edgemeta.features import feature_mean
        center, centered = feature_mean(ckpt, embedder)
        report(f"CL2N: centering on the mean embedding of {centered['images']} training images, then L2 normalisation")
    reference = ExportEmbedder(embedder, l2_normalize, center).eval()

    report("exporting ONNX (opset 17, dynamic batch)")
    model = export_onnx(embedder, spec, out / "embed.onnx", l2_normalize, center)
    in_name, _, out_name, out_shape = graph_io(model)
    noise = np.random.default_rng(0).uniform(0, 255, (8, spec.channels, spec.height, spec.width)).astype(np.float32)
    check = parity(out / "embed.onnx", reference, np.concatenate([real[:PARITY_IMAGES], noise]))
    check["real_images"] = int(min(PARITY_IMAGES, len(real))) if real_images else 0
    if not real_images:
        check["synthetic_images"] = int(len(real))
    report(f"parity vs torch: max abs {check['max_abs_error']:.2e}, relative {check['max_rel_error']:.2e}")
    if check["max_rel_error"] > PARITY_RTOL:
        raise BundleError(f"ONNX output differs from torch by {check['max_rel_error']:.2e} relative "
                          f"(limit {PARITY_RTOL:.0e}); the bundle was not written")
    head = dataclasses.replace(ckpt.device_head, flip_shots=options.flip_shots or ckpt.device_head.flip_shots)
    if l2_normalize:
        head = head.for_normalized_embeddings()
    manifest = _new_manifest(spec, in_name, out_name, int(out_shape[1]), l2_normalize, head, {
        "backbone": ckpt.meta["backbone"]["name"], "backbone_args": ckpt.meta["backbone"].get("args", {}),
        "algorithm": ckpt.meta.get("algorithm"), "source": Path(checkpoint).name,
        "source_sha256": sha256_file(checkpoint), "opset": 17,
        "parameters": int(sum(p.numel() for p in embedder.parameters())),
        "pretrained": ckpt.meta.get("pretrained", {}),
    })
    if centered is not None:
        manifest["output"]["centered"] = centered
    register_file(out, manifest, "embed.onnx", "fp32")
    notice = notice_text(ckpt.meta.get("pretrained", {}))
    if notice:  # the pretrained weights' license travels with the model made from them
        (out / "NOTICE").write_text(notice)
        register_file(out, manifest, "NOTICE", "license")
    manifest["variants"]["fp32"] = {"file": "embed.onnx", "parity": check}
    _add_open_set_prior(out, manifest, ckpt, options, report)
    if options.int8:
        manifest["variants"]["int8"] = _add_int8(out, manifest, real[:calib_images], check_set, options.eval_episodes,
                                                 report)
    if options.fp16:
        manifest["variants"]["fp16"] = _add_fp16(out, manifest, real[:PARITY_IMAGES], report)
    write_manifest(out, manifest)
    return manifest


def _add_open_set_prior(out: Path, manifest: dict, ckpt, options: ExportOptions, report: Callable[[str], None]) -> None:
    """The open-set prior on the checkpoint's training classes (its data is here), else on
    --calib-data's classes; none (said so) without labelled images."""
    from edgemeta.runtime.errors import DataError

    from .open_set_prior import measure_prior, prior_sample
    tc = ckpt.meta.get("train_config", {})
    train_data = [p for p in tc.get("data", []) if _findable(p)]
    sources, config = (train_data, tc) if train_data and len(train_data) == len(tc.get("data", [])) else \
        (list(options.calib_data), None)
    if not sources:
        report("no labelled images here (training data or --calib-data): no open-set prior; --unknown auto will "
               "calibrate on the enrolled shots alone")
        return
    try:
        pixels, labels, source = prior_sample(sources, ckpt.spec, config)
    except DataError as exc:
        report(f"no open-set prior: {exc}")
        return
    manifest["open_set"] = measure_prior(out / "embed.onnx", manifest, pixels, labels, source, report).to_dict()


def _add_int8(out: Path, manifest: dict, calib: np.ndarray, check_set, episodes: int, report: Callable[[str], None]) -> dict:
    """Both INT8 graphs: the S8S8 one TensorRT builds (the variant's `file`) and the U8S8 one ONNX
    Runtime's CPU provider runs fast (its `cpu` entry); each with its accuracy delta and speed-up
    over fp32, measured here side by side."""
    from .int8_report import compare_variants
    from .quantize import quantize_int8
    entry = {}
    for target, name in (("tensorrt", "embed.int8.onnx"), ("cpu", "embed.int8-cpu.onnx")):
        report(f"quantizing to INT8 for {'TensorRT (S8S8' if target == 'tensorrt' else 'ONNX Runtime on a CPU (U8S8'} "
               f"QDQ, per-channel) on {len(calib)} real images")
        info = quantize_int8(out / "embed.onnx", out / name, calib, manifest["input"]["name"], target=target)
        register_file(out, manifest, name, "int8" if target == "tensorrt" else "int8-cpu")
        info.update(compare_variants(out / "embed.onnx", out / name, manifest, check_set, episodes))
        report(f"INT8 {target}: accuracy {info['accuracy_delta_points']:+.2f} points on {info['episodes']} fixed episodes, "
               f"ONNX Runtime CPU speed ×{info['speedup_batch1']:.2f} at batch 1, ×{info['speedup_batch32']:.2f} at batch 32")
        if target == "tensorrt":
            entry = {"file": name, **info}
        else:
            entry["cpu"] = {"file": name, **info}
    return entry


FP16_PARITY_RTOL = 5e-2  # float16 activations through a deep network: a few 1e-3 typical; 5% means broken


def _add_fp16(out: Path, manifest: dict, real: np.ndarray, report: Callable[[str], None]) -> dict:
    """The FP16 graph, checked like fp32: the op audit (what TensorRT parses) and parity against the
    fp32 graph on the reference images, recorded in the manifest."""
    import onnx

    from .onnx_graph import check_model, parity
    from .quantize import convert_fp16
    report("converting to FP16 (for the CUDA provider and TensorRT)")
    info = convert_fp16(out / "embed.onnx", out / "embed.fp16.onnx")
    check_model(onnx.load(str(out / "embed.fp16.onnx")))
    check = parity(out / "embed.fp16.onnx", out / "embed.onnx", real)
    report(f"FP16 parity vs fp32: relative {check['max_rel_error']:.2e} on {check['images']} images")
    if check["max_rel_error"] > FP16_PARITY_RTOL:
        raise BundleError(f"the FP16 graph differs from fp32 by {check['max_rel_error']:.2e} relative (limit "
                          f"{FP16_PARITY_RTOL:g}): float16 overflows in this model; export without --fp16")
    register_file(out, manifest, "embed.fp16.onnx", "fp16")
    return {"file": "embed.fp16.onnx", **info, "parity": check}


def wrap_onnx(onnx_path: str | Path, out: str | Path, spec: InputSpec, options: ExportOptions = ExportOptions(),
              head: HeadConfig | None = None, progress: Progress = SILENT) -> dict:
    """Bring your own backbone: an ONNX model taking float32 NCHW pixels (0–255) and returning
    embeddings [N, D] becomes a bundle after the same checks (checker, op audit, a real run on
    options.calib_data, else on noise). options.l2_normalize records that the graph already
    L2-normalises its output; INT8/FP16 variants are made from checkpoints only."""
    l2_normalized, overwrite, check_data = options.l2_normalize, options.overwrite, list(options.calib_data)
    import onnx
    from edgemeta.runtime.backends.onnxruntime import OnnxRuntimeBackend

    from .onnx_graph import check_model, graph_io
    src = Path(onnx_path)
    if not src.is_file():
        raise BundleError(f"ONNX model not found: {src}")
    try:
        model = onnx.load(str(src))
    except Exception as exc:
        raise BundleError(f"{src} is not a readable ONNX model: {exc}") from None
    model = check_model(model)
    in_name, in_shape, out_name, out_shape = graph_io(model)
    if len(in_shape) != 4 or len(out_shape) != 2:
        raise BundleError(f"expected input [N, C, H, W] and output [N, D], the model has {in_shape} → {out_shape}")
    if isinstance(in_shape[1], int) and in_shape[1] != spec.channels:
        raise BundleError(f"the model takes {in_shape[1]} channels, --colour {spec.colour} gives {spec.channels}")
    if not isinstance(out_shape[1], int) or out_shape[1] < 1:
        raise BundleError("the model's embedding size (output dim 1) must be fixed")
    if isinstance(in_shape[0], int) and in_shape[0] > 0:
        raise BundleError(f"the model's batch size is fixed at {in_shape[0]}; export it with a dynamic batch axis "
                          "(torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}}))")
    for axis, want in ((2, spec.height), (3, spec.width)):
        if isinstance(in_shape[axis], int) and in_shape[axis] > 0 and in_shape[axis] != want:
            raise BundleError(f"the model takes {in_shape[2]}×{in_shape[3]} images, --input-size gives {spec.height}×{spec.width}")
    if check_data:
        probe, _ = reference_images(check_data, spec, 8)
    else:
        probe = np.random.default_rng(0).uniform(0, 255, (2, spec.channels, spec.height, spec.width)).astype(np.float32)
    with bundle_target(Path(out), overwrite, (src,)) as building:
        shutil.copyfile(src, building / "embed.onnx")
        with OnnxRuntimeBackend(building / "embed.onnx", spec, int(out_shape[1]), "cpu") as backend:
            z = backend.embed(probe)
        if z.shape != (len(probe), out_shape[1]) or not np.isfinite(z).all():
            raise BundleError(f"running the model on {len(probe)} images gave {z.shape} with non-finite values")
        progress.message(f"checked: runs on ONNX Runtime, embedding size {out_shape[1]}")
        manifest = _new_manifest(spec, in_name, out_name, int(out_shape[1]), l2_normalized,
                                 head or HeadConfig(metric="cosine" if l2_normalized else "euclidean"),
                                 {"backbone": "external", "source": src.name, "source_sha256": sha256_file(src),
                                  "opset": int(max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))})
        register_file(building, manifest, "embed.onnx", "fp32")
        manifest["variants"]["fp32"] = {"file": "embed.onnx", "parity": None}
        write_manifest(building, manifest)
    return manifest


def add_engine(bundle_dir: str | Path, options: EngineOptions = EngineOptions(), progress: Progress = SILENT) -> dict:
    """Build a TensorRT engine on this device from the bundle's ONNX variant and add it to the bundle."""
    precision, batch, workspace_mb = options.precision, options.batch, options.workspace_mb
    dla_core, timing_cache = options.dla_core, options.timing_cache
    from edgemeta.runtime import extras

    from .tensorrt import ENGINE_PRECISIONS, BatchProfile, build_engine, engine_file_name, engine_record
    extras.require("tensorrt", purpose="building a TensorRT engine")
    if precision not in ENGINE_PRECISIONS:
        raise BundleError(f"precision must be one of {', '.join(ENGINE_PRECISIONS)}")
    profile = BatchProfile.parse(batch)
    bundle = load_bundle(bundle_dir)
    file_variant = precision
    if "frozen" in bundle.manifest:  # one graph, of the precision it was frozen from: the engine is that one
        from edgemeta.runtime.backends.onnxruntime import graph_precision
        own = graph_precision(bundle, "fp32")
        if precision not in ("fp32", own):
            raise BundleError(f"a frozen classifier holds one graph (frozen from the {bundle.manifest['frozen']['variant']} "
                              f"variant): build its engine with --precision {own}, or freeze from another --variant")
        precision, file_variant = own, "fp32"
    onnx_path = bundle.variant_path(file_variant)
    spec = bundle.spec
    tmp_path = bundle.path / f".building-{precision}.engine"
    progress.message(f"building a TensorRT {precision} engine, batch {batch} (minutes on a Jetson)")
    try:
        built = build_engine(onnx_path, tmp_path, bundle.input_name, (spec.channels, spec.height, spec.width),
                             profile, workspace_mb, timing_cache, dla_core, precision, log=progress.message)
        name = engine_file_name(precision, profile, built["device"], dla_core)
        # the record is complete before anything is registered: a failure leaves the bundle as it was
        manifest = json.loads(json.dumps(bundle.manifest))
        record = engine_record(name, precision, profile, built["device"], manifest["files"][onnx_path.name]["sha256"],
                               dla_core, workspace_mb, built["build_seconds"], built.get("placement"))
        tmp_path.replace(bundle.path / name)
        register_file(bundle.path, manifest, name, f"tensorrt-{precision}")
        manifest["engines"] = [e for e in manifest["engines"] if e["file"] != name] + [record]
        write_manifest(bundle.path, manifest)
    finally:
        tmp_path.unlink(missing_ok=True)  # never an orphan .building-*.engine
    if record.get("placement"):
        p = record["placement"]
        where = (f"; the engine runs {p['dla_layers']} layer(s) there, {p['gpu_layers']} on the GPU"
                 if p.get("dla_layers") is not None else
                 "; where each runs is not known (the engine inspector gave layer names only)")
        progress.message(f"DLA core {dla_core}: {p.get('dla_capable_layers')} of {p.get('network_layers')} network layers can run "
                         f"on the DLA{where}")
    return record
