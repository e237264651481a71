"""FewShotClassifier: the Python API of the device. Load a bundle, enroll and forget classes,
predict — with the head fitted in NumPy on the support embeddings, and an enrollment store that
survives restarts and crashes.

    clf = FewShotClassifier.load("bundle/", store="enrolled/")
    clf.enroll("mug", ["mug1.jpg", "mug2.jpg"])
    labels, probs = clf.predict(["photo.jpg"])
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from . import heads
from .backends import Backend, open_backend
from .bundle import Bundle, load_bundle
from .errors import BundleError, ClassExistsError, ConfigError, ImageDecodeError, StoreError, UnknownClassError
from .heads import HeadConfig, resolve_head
from .labels import UNKNOWN, check_label
from .open_set import OpenSetPrior, RejectionRule, embedding_distance, similarity_to_distance, support_set_threshold
from .preprocess import DecodeBudget, ImageSource, check_pixels, load_images
from .store import MAX_LIMIT, EnrolledClass, EnrollmentStore, Negative, StoreState, check_counts, frozen, with_negatives


def fit_head(head: HeadConfig, classes: tuple[EnrolledClass, ...]) -> dict:
    """Fit the head on every enrolled class's support embeddings."""
    if not classes:
        return {}
    support = np.concatenate([c.embeddings for c in classes])
    labels = np.repeat(np.arange(len(classes)), [c.shots for c in classes])
    with np.errstate(over="ignore", invalid="ignore"):
        fitted = heads.fit(head, support, labels, len(classes))
    if not all(np.isfinite(a).all() for a in fitted.values()):
        settings = ", ".join(f"{k} {v}" for k, v in head.to_dict().items() if k != "kind")
        raise ConfigError(f"the {head.kind} head ({settings}) diverges on these shots (its fit is not finite): these "
                          "settings come from the bundle's manifest unless --head gives others — lower lr or steps, "
                          "or use --head prototype; nothing was changed")
    return fitted


def refit_prototypes_incrementally(fitted: dict, old: tuple[EnrolledClass, ...], new: tuple[EnrolledClass, ...]) -> dict:
    """Prototype head: rows of unchanged classes are kept; only new or changed classes are averaged."""
    old_rows = {c.label: (c, i) for i, c in enumerate(old)}
    protos = fitted.get("prototypes")
    rows = []
    for c in new:
        prev = old_rows.get(c.label)
        if protos is not None and prev is not None and prev[0] is c:
            rows.append(protos[prev[1]])
        else:
            rows.append(c.embeddings.mean(0))
    return {"prototypes": np.stack(rows).astype(np.float32)}


def make_prediction(labels: Sequence[str], probs: np.ndarray, distances: np.ndarray, top_k: int,
                    rejected: np.ndarray | None) -> Prediction:
    """Top-k labels and probabilities per row; rows where `rejected` [N] is true are "unknown"."""
    k = min(top_k, len(labels))
    if k == 1:  # the usual call: an argmax and a max, not a sort and a gather
        order, top_p = probs.argmax(1)[:, None], probs.max(1, keepdims=True)
    else:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top_p = np.take_along_axis(probs, order, 1)
    return _labelled(labels, order, top_p, distances, rejected)


def prediction_from_logits(labels: Sequence[str], logits: np.ndarray, best: np.ndarray, distances: np.ndarray,
                           top_k: int, rejected: np.ndarray | None) -> Prediction:
    """make_prediction of softmax(logits), given each row's largest logit `best` [N, 1]. For top-1 the
    softmax is never normalised: the top class is the largest logit's, and its probability is
    exp(0) / Σ exp(logit − best)."""
    if min(top_k, len(labels)) > 1:
        return make_prediction(labels, heads.softmax(logits), distances, top_k, rejected)
    e = np.exp(logits - best)
    return _labelled(labels, logits.argmax(1)[:, None], 1.0 / e.sum(1, keepdims=True), distances, rejected)


def _labelled(labels: Sequence[str], order: np.ndarray, top_p: np.ndarray, distances: np.ndarray,
              rejected: np.ndarray | None) -> Prediction:
    rows, values = order.tolist(), top_p.tolist()  # Python ints and floats in one call each
    best = [labels[o[0]] for o in rows]
    if rejected is not None:
        best = [UNKNOWN if r else lab for lab, r in zip(best, rejected.tolist())]
    top = [[(labels[j], p) for j, p in zip(o, ps)] for o, ps in zip(rows, values)]
    return Prediction(best, top_p, top, distances)


def parse_unknown(text: str | None, name: str = "unknown") -> float | str | None:
    """The rejection setting as users type it: None (never reject), 'auto' (calibrated on the
    support set) or a finite distance ≥ 0."""
    if text is None:
        return None
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} takes 'auto' or a number") from None
    if not (value >= 0 and value != float("inf")):
        raise ConfigError(f"{name} takes 'auto' or a finite distance ≥ 0, not {text!r}")
    return value


def calibrate_rejection(classes: tuple[EnrolledClass, ...], metric: str, slack: float = 1.25) -> float | None:
    """The support set's own rejection distance (bundles without an open-set prior): see
    runtime.open_set.support_set_threshold."""
    return support_set_threshold([c.embeddings for c in classes], metric, slack)


def rejection_rule(state: StoreState, metric: str, prior: OpenSetPrior | None) -> RejectionRule:
    """What `unknown="auto"` applies to an enrolled state: with the bundle's prior, each class's
    limit at its shot count; without, the support set's single limit. Negatives either way."""
    p = prior.for_metric(metric) if prior is not None else None
    shots = np.array([c.shots for c in state.classes])
    limits: np.ndarray | None
    if p is not None:
        limits, how = p.thresholds(shots).astype(np.float32), "prior"
    else:
        t = calibrate_rejection(state.classes, metric)
        limits, how = (None, "none") if t is None else (np.full(len(shots), t, np.float32), "support set")
    own = [(i, c.limit) for i, c in enumerate(state.classes) if c.limit is not None]
    if own:  # a person's own limit for a class wins over auto's
        limits = np.full(len(shots), np.inf, np.float32) if limits is None else limits.copy()
        for i, value in own:
            limits[i] = value
    return RejectionRule(limits, how, state.negative_matrix)


def enrolled_index(state: StoreState, label: str, hint: str = "") -> int:
    """The index of an enrolled class, or UnknownClassError listing what is enrolled."""
    i = state.find(label)
    if i is None:
        raise UnknownClassError(f"{label!r} is not enrolled (enrolled: {', '.join(state.labels) or 'none'}){hint}")
    return i


def as_source_list(images) -> list | np.ndarray:
    """One path or bytes → a one-item list; lists, tuples and pixel arrays as they are."""
    if isinstance(images, (str, os.PathLike, bytes)):
        return [images]
    if isinstance(images, np.ndarray):
        return images
    return list(images)


@dataclass(frozen=True)
class Prediction:
    labels: list[str]                # top-1 label per image ("unknown" when rejected)
    probabilities: np.ndarray        # [N, top_k] probabilities of the top-k classes
    top_k: list[list[tuple[str, float]]]
    distances: np.ndarray            # [N] distance to the nearest class prototype

    def __iter__(self):  # labels, probabilities = clf.predict(...)
        return iter((self.labels, self.probabilities))

    def to_list(self) -> list[dict]:
        return [{"label": lab, "top_k": [{"label": name, "probability": round(p, 6)} for name, p in tk],
                 "distance": round(float(d), 6)} for lab, tk, d in zip(self.labels, self.top_k, self.distances)]


WrappedBackend = TypeVar("WrappedBackend", bound=Backend)


@dataclass(frozen=True)
class _Prepared:
    """An enrolled state ready to predict: its prototypes prepared in the rejection metric, and the
    prototype head's scale — None for the other heads, which score with their fitted arrays, and for
    a scale of 0, whose logits (all 0) carry no similarity to reject by."""

    state: StoreState
    metric: str
    prototypes: heads.PreparedPrototypes
    scale: np.float32 | None


class FewShotClassifier:
    """Embed on ONNX Runtime or TensorRT, fit only the head in NumPy, classify."""

    def __init__(self, bundle: Bundle, backend: Backend, head: HeadConfig, store: EnrollmentStore | None = None,
                 variant: str = "fp32", keep_images: bool = True):
        self.bundle, self.backend, self.store, self.variant = bundle, backend, store, variant
        self.keep_images = keep_images and store is not None
        self._write_lock = threading.Lock()
        self.decode_budget: DecodeBudget | None = None  # a service bounds the pixels decoded at once
        self._rule_cache: tuple[StoreState, str, RejectionRule] | None = None
        self._rule_lock = threading.Lock()  # single flight: concurrent requests wait for one computation
        self._prepared_cache: _Prepared | None = None
        self._state = StoreState(bundle.model_sha256, variant, bundle.embedding_dim, head)

    def wrap_backend(self, wrap: Callable[[Backend], WrappedBackend]) -> WrappedBackend:
        """Embed through a layer around the backend (the service's batching): `wrap` gets the
        backend and returns one that embeds the same inputs to the same size; it is closed with the
        classifier."""
        wrapped = wrap(self.backend)
        if (wrapped.spec, wrapped.embedding_dim) != (self.backend.spec, self.backend.embedding_dim):
            raise ConfigError(f"{wrapped.name} does not embed as {self.backend.name} does")
        wrapped.graph = self.backend.graph
        self.backend = wrapped
        return wrapped

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, bundle: str | os.PathLike | Bundle, store: str | os.PathLike | None = None,
             head: str | dict | HeadConfig | None = None, backend: str = "auto", variant: str = "fp32",
             threads: int | None = None, reembed: bool = False, keep_images: bool = True) -> FewShotClassifier:
        """Open a bundle (manifest and checksums verified) and, if given, an enrollment store.

        A store made for another bundle is refused; with reembed=True and the images kept in the
        store, its classes are re-embedded with this bundle instead.
        """
        b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if "frozen" in b.manifest:
            raise BundleError(f"{b.path} is a frozen classifier (classes and head inside): use "
                              "edgemeta.runtime.frozen.FrozenClassifier, or `edgemeta predict` without --store")
        opened = open_backend(b, backend, variant, threads=threads)
        # the store records the graph that made its embeddings: int8 on ONNX Runtime's CPU provider is
        # the U8S8 graph ("int8-cpu"), another graph than the S8S8 one TensorRT builds from
        clf = cls(b, opened, resolve_head(b.head, head), EnrollmentStore(store) if store is not None else None,
                  opened.graph or variant, keep_images)
        if clf.store is not None:
            clf.store.tidy()
            saved = clf.store.read()
            if saved is not None:
                clf._adopt(saved, head, reembed)
        return clf

    def _adopt(self, saved: StoreState, head: str | dict | HeadConfig | None, reembed: bool) -> None:
        matches = (saved.model_sha256 == self.bundle.model_sha256 and saved.variant == self.variant
                   and saved.embedding_dim == self.bundle.embedding_dim)
        if not matches:
            assert self.store is not None  # only a store's state is adopted
            kept = all(c.images for c in saved.classes)
            if not reembed:
                offer = (" Its images were kept: pass reembed=True (CLI: --reembed) to re-embed them with this bundle."
                         if kept and saved.classes else " Enroll the classes again into a new store.")
                raise StoreError(f"the store at {self.store.path} was made for another model (sha {saved.model_sha256[:12]}…, "
                                 f"{saved.variant}, dim {saved.embedding_dim}); this bundle is {self.bundle.model_sha256[:12]}…, "
                                 f"{self.variant}, dim {self.bundle.embedding_dim}.{offer}")
            if not kept:
                raise StoreError("cannot re-embed: this store did not keep the enrolled images")
            classes, negatives = self.reembed(saved.classes, saved.negatives, self.store.image_path)
            state = replace(self._state, classes=classes, negatives=negatives, generation=saved.generation + 1)
            self._commit(replace(state, fitted=fit_head(state.head, classes)))
            return
        self._state = self._with_head(saved, self._state.head if head is not None else saved.head)

    @staticmethod
    def _with_head(saved: StoreState, head: HeadConfig) -> StoreState:
        """A saved state under `head`, refitted when the head differs from the one it was fitted with."""
        if head == saved.head and (not saved.classes or "prototypes" in saved.fitted):
            return saved
        return replace(saved, head=head, fitted=fit_head(head, saved.classes))

    # ---------------------------------------------------------------- queries
    @property
    def classes(self) -> list[str]:
        return list(self._state.labels)

    @property
    def head(self) -> HeadConfig:
        return self._state.head

    def shots(self) -> dict[str, int]:
        return {c.label: c.shots for c in self._state.classes}

    def embed(self, images: Sequence[ImageSource] | np.ndarray) -> np.ndarray:
        """Decode (if needed) and embed images: float32 [N, D]."""
        return self._embed_sources(images)

    def embed_support(self, images: Sequence[ImageSource] | np.ndarray) -> np.ndarray:
        """Embed support images as enrollment does (with flipped shots when the head asks)."""
        return self._embed_sources(images, support=True)

    def _embed_sources(self, images, support: bool = False) -> np.ndarray:
        """Decode and embed; support=True embeds support images as the head asks (with flip_shots,
        the mean of each image's embedding and its horizontal mirror's)."""
        spec = self.bundle.spec
        images = as_source_list(images)
        pixels = check_pixels(images, spec) if isinstance(images, np.ndarray) else load_images(images, spec, self.decode_budget)
        if support and self._state.head.flip_shots:
            both = self.backend.embed_pixels(np.concatenate([pixels, pixels[:, :, ::-1]]))
            embeddings = (both[:len(pixels)] + both[len(pixels):]) / 2
        else:
            embeddings = self.backend.embed_pixels(pixels)
        if not np.isfinite(embeddings).all():  # one reduction on the hot path; the culprits only on failure
            bad = np.flatnonzero(~np.isfinite(embeddings).all(1))
            which = ", ".join(str(images[i]) if not isinstance(images, np.ndarray) else f"#{i}" for i in bad[:3])
            raise ImageDecodeError(f"the model returned non-finite embeddings for input(s) {which}; "
                                   "the bundle's model is broken (re-export it) or the input is not an image")
        return embeddings

    def reembed(self, classes: Sequence[EnrolledClass], negatives: Sequence[Negative], image: Callable[[str], ImageSource],
                keep_limits: bool = False) -> tuple[tuple[EnrolledClass, ...], tuple[Negative, ...]]:
        """Classes and negatives embedded again with this classifier's graph from their kept images
        (`image(name)` gives a kept image's path or bytes). A negative without an image is dropped,
        and so is a class's own limit unless keep_limits (a distance in the other graph's space)."""
        out = tuple(EnrolledClass(c.label, frozen(self._embed_sources([image(n) for n in c.images], support=True)),
                                  c.images, c.limit if keep_limits else None) for c in classes)
        kept = [n for n in negatives if n.image]
        rows = self._embed_sources([image(n.image) for n in kept]) if kept else np.zeros((0, self.bundle.embedding_dim))
        return out, tuple(Negative(frozen(row.copy()), n.image, n.note) for n, row in zip(kept, rows))

    def _embedded(self, images, support: bool) -> np.ndarray:
        """Float32 [n, D] arrays are taken as embeddings made with this bundle; images (paths, bytes,
        pixel arrays [N, H, W, C]) are embedded (as support images where `support`)."""
        if isinstance(images, np.ndarray) and images.ndim == 2:
            if images.shape[1] != self.bundle.embedding_dim or images.dtype != np.float32:
                raise ConfigError(f"embeddings must be float32 [shots, {self.bundle.embedding_dim}], got "
                                  f"{images.dtype} {list(images.shape)}")
            if not np.isfinite(images).all():
                raise ConfigError("embeddings hold NaN or inf")
            return images
        return self._embed_sources(images, support=support)

    def predict(self, images: Sequence[ImageSource] | np.ndarray, top_k: int = 1,
                reject: float | str | None = None) -> Prediction:
        """Classify images. reject="auto" answers "unknown" beyond the distance calibrated on the
        support set; a float sets that distance; None never rejects."""
        state = self._ready(top_k)  # one snapshot: a concurrent enroll cannot tear this prediction
        return self._classify(state, self._embed_sources(images), top_k, reject)

    def classify_embeddings(self, query: np.ndarray, top_k: int = 1, reject: float | str | None = None) -> Prediction:
        """Classify embeddings already computed with this bundle (float32 [N, D]), e.g. by `embed`."""
        return self._classify(self._ready(top_k), query, top_k, reject)

    def _ready(self, top_k: int) -> StoreState:
        state = self._state
        if not state.classes:
            raise StoreError("no classes are enrolled; enroll some first (`edgemeta enroll`)")
        if top_k < 1:
            raise ConfigError("top_k must be ≥ 1")
        return state

    def _classify(self, state: StoreState, query: np.ndarray, top_k: int, reject) -> Prediction:
        prepared = self._prepared(state)
        if prepared.scale is not None:  # the prototype head: its logits are the rejection similarities, scaled
            logits = prepared.prototypes.logits(query, prepared.scale)
            best = logits.max(1, keepdims=True)
            distances = similarity_to_distance(best[:, 0] / prepared.scale, prepared.metric)
            nearest = logits.argmax(1) if reject == "auto" else None
        else:
            # the other heads: one prototype comparison gives the rejection distance (the nearest
            # prototype is the most similar one); the head's own arrays give the logits
            similarity = prepared.prototypes.logits(query)
            distances = similarity_to_distance(similarity.max(1), prepared.metric)
            nearest = similarity.argmax(1) if reject == "auto" else None
            logits = heads.score(state.head, state.fitted, query)
            best = logits.max(1, keepdims=True)
        rejected = self._rejected(state, prepared.metric, query, distances, nearest, reject)
        return prediction_from_logits(state.labels, logits, best, distances, top_k, rejected)

    def _rejected(self, state: StoreState, metric: str, query: np.ndarray, distances: np.ndarray,
                  nearest: np.ndarray | None, reject) -> np.ndarray | None:
        """Which queries answer "unknown": beyond a fixed distance, or under auto beyond their nearest
        class's limit or nearer to a negative example than to that class."""
        if reject is None:
            return None
        if reject != "auto":
            return distances > float(reject)
        rule = self.rejection_rule(state, metric)
        limits = rule.limit_per_query(nearest) if nearest is not None else None
        rejected = np.zeros(len(distances), bool) if limits is None else distances > limits
        if rule.negatives is not None:
            rejected |= embedding_distance(query, rule.negatives, metric).min(1) < distances
        return rejected

    def rejection_rule(self, state: StoreState | None = None, metric: str | None = None) -> RejectionRule:
        """The auto rule for an enrolled state (default: the current one), made once per state: the
        first request computes it while concurrent ones wait for it (never each their own)."""
        state = self._state if state is None else state
        metric = metric or state.head.rejection_metric(self.bundle.l2_normalized)
        cached = self._rule_cache
        if cached is not None and cached[0] is state and cached[1] == metric:
            return cached[2]
        with self._rule_lock:
            cached = self._rule_cache
            if cached is None or cached[0] is not state or cached[1] != metric:
                cached = self._rule_cache = (state, metric, rejection_rule(state, metric, self.bundle.open_set))
        return cached[2]

    def describe_auto(self) -> dict:
        """How `unknown="auto"` decides with this bundle and head (inspect, GET /v1/model)."""
        from .open_set import describe_rule
        metric = self.head.rejection_metric(self.bundle.l2_normalized)
        return {**describe_rule(self.bundle.open_set, metric), "negatives": len(self._state.negatives)}

    def review(self, label: str | None = None) -> dict:
        """The enrollment report (runtime.review): the whole store, or one class's part of it."""
        from .review import review
        state = self._state
        metric = state.head.rejection_metric(self.bundle.l2_normalized)
        prior = self.bundle.open_set.for_metric(metric) if self.bundle.open_set is not None else None
        return review(state.classes, prior, metric, None if label is None else check_label(label))

    def _prepared(self, state: StoreState) -> _Prepared:
        """What predict needs of an enrolled state, made once per state (states are immutable)."""
        cached = self._prepared_cache
        if cached is None or cached.state is not state:
            metric = state.head.rejection_metric(self.bundle.l2_normalized)
            cached = self._prepared_cache = _Prepared(
                state, metric, heads.PreparedPrototypes(state.fitted["prototypes"], metric),
                np.float32(state.head.scale) if state.head.kind == "prototype" and state.head.scale > 0 else None)
        return cached

    # ---------------------------------------------------------------- changes
    def enroll(self, label: str, images: Sequence[ImageSource] | np.ndarray, mode: str = "new") -> int:
        """Enroll a class from its support images. mode "new" refuses a label already enrolled,
        "add" adds shots to it, "replace" replaces its shots. Returns the class's shot count.
        Everything is decoded and embedded before anything changes: a bad image loses nothing."""
        return self.enroll_many({label: images}, mode)[check_label(label)]

    def enroll_many(self, classes: Mapping[str, Sequence[ImageSource] | np.ndarray], mode: str = "new") -> dict[str, int]:
        """Enroll several classes as one change: every label is checked and every image decoded and
        embedded first; then one save. One bad class or image enrolls none. Returns shots per class."""
        if mode not in ("new", "add", "replace"):
            raise ConfigError("mode must be new, add or replace")
        todo: dict[str, list | np.ndarray] = {}
        for raw, images in classes.items():
            label = check_label(raw)
            if label in todo:
                raise StoreError(f"class {label!r} is given twice")
            todo[label] = as_source_list(images)
            if len(todo[label]) == 0:
                raise StoreError(f"class {label!r} has no images; give at least one support image")
        with self._write_lock, self._store_lock():
            state = self._refresh()
            if mode == "new":
                taken = [(lab, i) for lab in todo if (i := state.find(lab)) is not None]
                if taken:
                    raise ClassExistsError(f"{taken[0][0]!r} is already enrolled ({state.classes[taken[0][1]].shots} shots); "
                                     "use add (CLI --add) to add shots or replace (CLI --replace) to start over")
            embedded = {label: self._embedded(images, support=True) for label, images in todo.items()}
            new_classes = list(state.classes)
            for label, images in todo.items():
                idx = state.find(label)
                kept = self._keep(images)
                if idx is not None and mode == "add":
                    old = state.classes[idx]
                    item = EnrolledClass(label, frozen(np.concatenate([old.embeddings, embedded[label]])), old.images + kept,
                                         old.limit)
                else:
                    item = EnrolledClass(label, frozen(embedded[label]), kept)
                if idx is None:
                    new_classes.append(item)
                else:
                    new_classes[idx] = item
            check_counts(len(new_classes), {c.label: c.shots for c in new_classes if c.label in todo}, "enrollment")
            self._commit(self._refit(state, tuple(new_classes)))
            return {c.label: c.shots for c in new_classes if c.label in todo}

    def enroll_embeddings(self, classes: Mapping[str, np.ndarray], mode: str = "new") -> dict[str, int]:
        """enroll_many for support embeddings already computed with this bundle (float32 [shots, D]
        per class, e.g. from `embed_support`): no images are kept."""
        return self.enroll_many(classes, mode)

    def forget(self, label: str) -> None:
        if self.store is not None and not self.store.exists():
            raise StoreError(f"no store at {self.store.path}; nothing to forget")
        label = check_label(label)  # the same form enrollment stored: "  mug " forgets "mug"
        with self._write_lock, self._store_lock():
            state = self._refresh()
            enrolled_index(state, label)
            self._commit(self._refit(state, tuple(c for c in state.classes if c.label != label)))

    def set_limit(self, label: str, limit: float | None) -> None:
        """Give one class its own "unknown" distance limit under unknown="auto" (None: back to auto's)."""
        label = check_label(label)
        if limit is not None and not (isinstance(limit, (int, float)) and not isinstance(limit, bool)
                                      and 0 <= limit <= MAX_LIMIT):
            raise ConfigError(f"a class's limit is a distance from 0 to {MAX_LIMIT:g}, not {limit!r}")
        with self._write_lock, self._store_lock():
            state = self._refresh()
            i = enrolled_index(state, label)
            classes = list(state.classes)
            classes[i] = replace(classes[i], limit=None if limit is None else float(limit))
            self._commit(replace(state, classes=tuple(classes), generation=state.generation + 1))

    def limits(self) -> dict[str, dict]:
        """Each class's limit under unknown="auto" and where it comes from ("own" or the auto rule's)."""
        rule = self.rejection_rule()
        return {c.label: {"limit": None if rule.limits is None or not np.isfinite(rule.limits[i]) else
                          round(float(rule.limits[i]), 6), "from": "own" if c.limit is not None else rule.how}
                for i, c in enumerate(self._state.classes)}

    # ---------------------------------------------------------------- corrections
    def negatives(self) -> list[dict]:
        """The negative examples: id, the label they were wrongly given ("note"), kept image name."""
        return [{"id": n.id, "note": n.note, "image": n.image} for n in self._state.negatives]

    def add_negatives(self, images: Sequence[ImageSource] | np.ndarray, note: str | None = None) -> list[str]:
        """Corrections "this is none of the enrolled classes" (note=None) or "this is not NOTE": each
        image is kept as a negative example; under unknown="auto" a query nearer to a negative than
        to its nearest class answers "unknown". Returns the negatives' ids. Decoded and embedded
        before anything changes; an image already a negative is not added twice."""
        images = as_source_list(images)
        if len(images) == 0:
            raise StoreError("no images given; a correction needs the image that was answered wrongly")
        with self._write_lock, self._store_lock():
            state = self._refresh()
            if note is not None:
                note = check_label(note)
                enrolled_index(state, note, "; a correction 'not X' names an enrolled class")
            embedded = self._embedded(images, support=False)
            kept = self._keep(images)
            new = [Negative(frozen(row.copy()), kept[i] if i < len(kept) else "", note or "") for i, row in enumerate(embedded)]
            merged = with_negatives(state.negatives, new)
            if len(merged) > len(state.negatives):
                self._commit(replace(state, negatives=merged, generation=state.generation + 1))
            return [n.id for n in new]

    def remove_negatives(self, ids: Sequence[str]) -> int:
        """Remove negatives by id (all ids are checked before any is removed). Returns how many are left."""
        with self._write_lock, self._store_lock():
            state = self._refresh()
            have = {n.id for n in state.negatives}
            missing = [i for i in ids if i not in have]
            if missing:
                raise UnknownClassError(f"no negative {missing[0]!r} in this store "
                                        f"(it has: {', '.join(sorted(have)) or 'none'}); nothing was removed")
            left = tuple(n for n in state.negatives if n.id not in set(ids))
            self._commit(replace(state, negatives=left, generation=state.generation + 1))
            return len(left)

    def correct(self, images: Sequence[ImageSource] | np.ndarray, is_label: str | None = None,
                not_label: str | None = None, none: bool = False) -> dict:
        """A person's correction of a prediction: "this is Y" (is_label: the images become shots of
        Y, a new class if Y is not enrolled), "this is not X" (not_label) or "none of these" (none):
        the images become negative examples."""
        if sum(x is not None and x is not False for x in (is_label, not_label, none or None)) != 1:
            raise ConfigError("a correction is one of: is LABEL, not LABEL, or none")
        if is_label is not None:
            label = check_label(is_label)
            mode = "add" if self._state.find(label) is not None else "new"
            shots = self.enroll(label, images, mode=mode)
            return {"correction": "is", "label": label, "shots": shots}
        ids = self.add_negatives(images, not_label)
        return {"correction": "not" if not_label is not None else "none", "label": not_label, "negatives": ids,
                "total_negatives": len(self._state.negatives)}

    def _refit(self, state: StoreState, classes: tuple[EnrolledClass, ...]) -> StoreState:
        if state.head.kind == "prototype":
            fitted = refit_prototypes_incrementally(state.fitted, state.classes, classes) if classes else {}
        else:
            fitted = fit_head(state.head, classes)
        return replace(state, classes=classes, fitted={k: frozen(v) for k, v in fitted.items()},
                       generation=state.generation + 1)

    def _commit(self, state: StoreState) -> None:
        if self.store is not None:
            self.store.write(state)  # durable first, then visible
        self._state = state

    def refresh(self) -> bool:
        """Pick up classes another process (`edgemeta enroll`, another service) saved since the last
        look: one stat of the store file when nothing changed. Skipped while this object is writing
        (its own write refreshes first). Returns whether the enrolled state changed."""
        if self.store is None or not self._write_lock.acquire(blocking=False):
            return False
        try:
            before = self._state
            return self._refresh() is not before
        finally:
            self._write_lock.release()

    def _store_lock(self):
        import contextlib
        return self.store.locked() if self.store is not None else contextlib.nullcontext()

    def _refresh(self) -> StoreState:
        """Under the store lock: pick up changes another process saved since we loaded."""
        if self.store is None:
            return self._state
        saved = self.store.read_if_changed()
        if saved is None:  # the file is the one we last read or wrote
            return self._state
        if (saved.model_sha256, saved.variant, saved.embedding_dim) != (self._state.model_sha256, self._state.variant,
                                                                        self._state.embedding_dim):
            # another service (another bundle or variant) took the store: never write over its state
            raise StoreError(f"the store at {self.store.path} now belongs to another model (sha {saved.model_sha256[:12]}…, "
                             f"{saved.variant}, dim {saved.embedding_dim}); this service runs {self._state.model_sha256[:12]}…, "
                             f"{self._state.variant}: give each model its own store")
        # any replacement is adopted, an older generation too: a backup copied back is what the user wants
        self._state = replace(self._with_head(saved, self._state.head),
                              generation=max(saved.generation, self._state.generation))
        return self._state

    def _keep(self, images) -> tuple[str, ...]:
        if self.store is None or not self.keep_images or isinstance(images, np.ndarray):
            return ()
        names = []
        for src in images:
            if isinstance(src, (str, os.PathLike)):
                names.append(self.store.keep_image(Path(src).read_bytes(), Path(src).suffix))
            elif isinstance(src, bytes):
                names.append(self.store.keep_image(src, ""))
            else:
                return ()  # PIL images: nothing to keep verbatim
        return tuple(names)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
