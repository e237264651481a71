"""Few-shot evaluation of a checkpoint (torch) or a bundle (the deployed path: ONNX Runtime + the
NumPy head) with the protocol of edgemeta.protocol. `evaluate` wires the three paths — a bundle,
a checkpoint's frozen embedding with a device head, a gradient-based checkpoint's own adaptation.
The module imports torch only inside the checkpoint paths: `edgemeta eval --bundle` runs on a
device without torch."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from edgemeta.features import cl2n, embed_pixels, feature_mean
from edgemeta.protocol import EvalResult, LogitsFn, OpenSetResult, check_episode_request, evaluate_episodes, evaluate_open_set
from edgemeta.runtime.errors import ConfigError


@dataclass
class Evaluation:
    result: EvalResult | OpenSetResult
    head: dict            # the head config used (JSON form)
    split: str
    classes: int          # classes in the evaluated split
    path: str             # "torch" or "deployed (…)"

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "head": self.head, "split": self.split, "classes": self.classes,
                "path": self.path}


def evaluate(*, checkpoint: str | os.PathLike | None = None, bundle: str | os.PathLike | None = None,
             variant: str = "fp32", data: list[str] | None = None, split: str = "test", split_mode: str | None = None,
             split_file: str | None = None, way: int = 5, shot: int = 1, query: int = 15, episodes: int = 1000,
             seed: int = 0, head: str = "default", center: bool | None = None,
             flip_shots: bool | None = None, image_size: int | None = None, open_set: bool = False) -> Evaluation:
    """Accuracy ± 95% CI on fixed episodes of one split. head "default" is the checkpoint's or the
    bundle's own (for MAML-family checkpoints: their own adaptation); a kind name fits that device
    head on the frozen embedding. center=True (checkpoints): CL2N features, as `export --center`
    bakes into a bundle; None: as the checkpoint records (Checkpoint.center). flip_shots overrides
    the head's flipped-shot setting. image_size (checkpoints of globally pooled backbones)
    evaluates at another input resolution. open_set (bundles): the open-set protocol instead
    (runtime.open_set: 5 enrolled + 5 unknown classes per episode, `way` is not used), through
    FewShotClassifier's enrollment and predict(reject="auto")."""
    from edgemeta.data import load_dataset, select_split
    from edgemeta.runtime.heads import head_names, resolve_head
    check_episode_request(way, shot, query, episodes)
    if (checkpoint is None) == (bundle is None):
        raise ConfigError("give a CHECKPOINT or --bundle BUNDLE (one of them)")
    choice = None if head == "default" else head
    if bundle is not None:
        from edgemeta.runtime import FewShotClassifier, heads
        if not data:
            raise ConfigError("--bundle needs --data (a folder or .zip of labelled images)")
        if center or image_size:
            raise ConfigError("--center and --image-size apply to checkpoints; a bundle is exported with them")
        clf = FewShotClassifier.load(bundle, backend="onnxruntime", variant=variant)
        spec, tc, head_cfg = clf.bundle.spec, {}, _flip(resolve_head(clf.bundle.head, choice), flip_shots)
        embed = clf.embed
        logits_fn = lambda s, y, q, n: heads.head_logits(head_cfg, s, y, q, n)  # noqa: E731
        open_set_fn = open_set_classifier(clf, head_cfg) if open_set else None
        head_json, path = head_cfg.to_dict(), f"deployed (onnxruntime {variant} + numpy head)"
    else:
        if open_set:
            raise ConfigError("--open-set measures the deployed path: give --bundle BUNDLE (export the checkpoint first)")
        from edgemeta.algorithms import GRADIENT_ALGORITHMS, adaptation_logits_fn
        from edgemeta.checkpoint import load_checkpoint
        from edgemeta.runtime.malloc import retain_freed_memory
        retain_freed_memory()  # as in training: torch adaptation per episode would page-fault its activations
        ckpt = load_checkpoint(checkpoint).at_image_size(image_size)
        spec, tc, path = ckpt.spec, ckpt.meta.get("train_config", {}), "torch"
        if choice is None and ckpt.meta.get("algorithm") in GRADIENT_ALGORITHMS:
            # the algorithm's own adaptation, with batch statistics per task as in training
            if ckpt.meta["head"]["kind"] == "finetune" and way != tc["way"]:
                raise ConfigError(f"this {ckpt.meta['algorithm']} checkpoint adapts a {tc['way']}-way head; use --way "
                                  f"{tc['way']}, or --head {'|'.join(head_names())} for the frozen embedding")
            head_json = ckpt.meta["head"]
            embed = lambda pixels: pixels  # noqa: E731  (episodes index images; adaptation embeds them)
            logits_fn = adaptation_logits_fn(load_adaptation_model(ckpt))
        else:
            head_cfg = _flip(resolve_head(ckpt.device_head, choice), flip_shots)
            embedder = ckpt.build_embedder()
            if ckpt.centring(center):  # what `export --center` deploys: CL2N features, a cosine prototype head
                head_cfg = head_cfg.for_normalized_embeddings()
                mean, _ = feature_mean(ckpt, embedder)
                embed = lambda pixels: cl2n(embed_pixels(embedder, pixels), mean)  # noqa: E731
            else:
                embed = lambda pixels: embed_pixels(embedder, pixels)  # noqa: E731
            logits_fn, head_json = torch_logits_fn(head_cfg), head_cfg.to_dict()
    sources = [str(p) for p in data] if data else tc.get("data", [])
    dataset = load_dataset(sources, (spec.height, spec.width), spec.colour, tc.get("layout", "auto"))
    dataset = select_split(dataset, split, split_mode or tc.get("split_mode", "auto"), tc.get("split_seed", 0),
                           str(split_file) if split_file else "" if split_mode else tc.get("split_file", ""))
    embeddings = embed(dataset.pixels)
    support = None
    if isinstance(head_json, dict) and head_json.get("flip_shots"):  # support = mean of each image and its mirror
        support = (embeddings + embed(np.ascontiguousarray(dataset.pixels[:, :, ::-1]))) / 2
    if open_set:
        result: EvalResult | OpenSetResult = evaluate_open_set(embeddings, dataset.labels, open_set_fn, shot, query,
                                                               episodes, seed, support_embeddings=support)
        return Evaluation(result, head_json, split, dataset.n_classes, path)
    result = evaluate_episodes(embeddings, dataset.labels, logits_fn, way, shot, query, episodes, seed,
                               support_embeddings=support)
    return Evaluation(result, head_json, split, dataset.n_classes, path)


def open_set_classifier(clf, head):
    """The open-set protocol's classify function on a loaded bundle: each episode's support set is
    enrolled into a fresh store-less FewShotClassifier (the same backend), and its queries are
    answered with no rejection ("none"), with auto ("auto": the bundle's prior, where it has one),
    and with auto as a bundle without a prior decides ("support set": the enrolled shots alone)."""
    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.bundle import Bundle
    from edgemeta.runtime.classifier import UNKNOWN
    bare = Bundle(clf.bundle.path, {k: v for k, v in clf.bundle.manifest.items() if k != "open_set"}, verify=False)
    rules = [(clf.bundle, {"none": None, "auto": "auto"}), (bare, {"support set": "auto"})]  # one enrollment per bundle

    def classify(support, support_labels, query):
        known = int(support_labels.max()) + 1
        names = [f"class {k}" for k in range(known)]
        out: dict = {"rules": {}}
        for bundle, rejects in rules:
            episode = FewShotClassifier(bundle, clf.backend, head)
            episode.enroll_embeddings({names[k]: np.ascontiguousarray(support[support_labels == k]) for k in range(known)})
            for name, reject in rejects.items():
                p = episode.classify_embeddings(query, reject=reject)
                predicted = np.array([names.index(top[0][0]) for top in p.top_k])
                out["rules"][name] = (predicted, np.array([lab == UNKNOWN for lab in p.labels]))
                out["distance"] = p.distances
        return out
    return classify


def _flip(head, flip_shots: bool | None):
    import dataclasses
    return head if flip_shots is None else dataclasses.replace(head, flip_shots=flip_shots)


def torch_logits_fn(head) -> LogitsFn:
    """The torch head (edgemeta.heads) described by a HeadConfig, as a NumPy-in/NumPy-out function."""
    import torch

    from edgemeta.heads import head_logits

    def fn(support, support_labels, query, n_way):
        with torch.no_grad():
            return head_logits(head, torch.from_numpy(support), torch.from_numpy(support_labels),
                               torch.from_numpy(query), n_way).numpy()
    return fn


def load_adaptation_model(ckpt):
    """Rebuild a gradient-based algorithm (backbone + head + inner-loop settings) from a checkpoint."""
    from edgemeta.algorithms import LearnerSettings, create_algorithm
    from edgemeta.backbones import Embedder
    tc = ckpt.meta["train_config"]
    # evaluation runs on the CPU: NHWC activations there (see Embedder)
    embedder = Embedder(ckpt.meta["backbone"]["name"], ckpt.spec, ckpt.meta["backbone"].get("args", {}),
                        channels_last=True)
    model = create_algorithm(ckpt.meta["algorithm"], embedder, LearnerSettings.from_train_config(tc))
    state = {k: v for k, v in ckpt.model_state.items() if "running_" not in k and "num_batches_tracked" not in k}
    model.load_state_dict(state)
    return model.eval()
