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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from . import heads
from .backends import Backend, open_backend
from .bundle import Bundle, load_bundle
from .errors import BundleError, ClassExistsError, ConfigError, ImageDecodeError, LabelError, StoreError, UnknownClassError
from .heads import HeadConfig, resolve_head
from .preprocess import DecodeBudget, ImageSource, check_pixels, load_images
from .store import EnrolledClass, EnrollmentStore, StoreState, check_counts, frozen

UNKNOWN = "unknown"
MAX_LABEL_LENGTH = 128


def fit_head(head: HeadConfig, classes: tuple[EnrolledClass, ...]) -> dict:
    """Fit the head on every enrolled class's support embeddings."""
    if not classes:
        return {}
    support = np.concatenate([c.embeddings for c in classes])
    labels = np.repeat(np.arange(len(classes)), [c.shots for c in classes])
    return heads.fit(head, support, labels, len(classes))


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


def embedding_distance(query: np.ndarray, prototypes: np.ndarray, metric: str) -> np.ndarray:
    """[m, C] distances used for rejection: euclidean, or 1 − cosine for cosine heads."""
    return similarity_to_distance(heads.prototype_logits(query, prototypes, metric, 1.0), metric)


def similarity_to_distance(similarity: np.ndarray, metric: str) -> np.ndarray:
    """The prototype head's unscaled logits (−‖q − p‖², or cos) → the rejection distance."""
    return 1.0 - similarity if metric == "cosine" else np.sqrt(np.maximum(-similarity, 0.0))


def make_prediction(labels: Sequence[str], probs: np.ndarray, distances: np.ndarray, top_k: int,
                    threshold: float | None) -> Prediction:
    """Top-k labels and probabilities per row; rows farther than `threshold` are "unknown"."""
    k = min(top_k, len(labels))
    if k == 1:  # the usual call: an argmax and a max, not a sort and a gather
        order, top_p = probs.argmax(1)[:, None], probs.max(1, keepdims=True)
    else:
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top_p = np.take_along_axis(probs, order, 1)
    return _labelled(labels, order, top_p, distances, threshold)


def prediction_from_logits(labels: Sequence[str], logits: np.ndarray, best: np.ndarray, distances: np.ndarray,
                           top_k: int, threshold: float | None) -> Prediction:
    """make_prediction of softmax(logits), given each row's largest logit `best` [N, 1]. For top-1 the
    softmax is never normalised: the top class is the largest logit's, and its probability is
    exp(0) / Σ exp(logit − best)."""
    if min(top_k, len(labels)) > 1:
        return make_prediction(labels, heads.softmax(logits), distances, top_k, threshold)
    e = np.exp(logits - best)
    return _labelled(labels, logits.argmax(1)[:, None], 1.0 / e.sum(1, keepdims=True), distances, threshold)


def _labelled(labels: Sequence[str], order: np.ndarray, top_p: np.ndarray, distances: np.ndarray,
              threshold: float | None) -> Prediction:
    rows, values = order.tolist(), top_p.tolist()  # Python ints and floats in one call each
    best = [labels[o[0]] for o in rows]
    if threshold is not None:
        limit = float(threshold)
        best = [UNKNOWN if d > limit else lab for lab, d in zip(best, distances.tolist())]
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


def paired_distance(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Row i of a to row i of b, in the metric of embedding_distance: [n]."""
    if metric == "cosine":
        norms = np.maximum(np.linalg.norm(a, axis=1), 1e-12) * np.maximum(np.linalg.norm(b, axis=1), 1e-12)
        return 1.0 - (a * b).sum(1) / norms
    return np.linalg.norm(a - b, axis=1)


def calibrate_rejection(classes: tuple[EnrolledClass, ...], metric: str, slack: float = 1.25) -> float | None:
    """A distance beyond which a query is "unknown", from the support set alone.

    With ≥ 2 shots in some class: the largest leave-one-out distance of a support embedding to the
    mean of its class's other shots, times `slack`. With one shot per class: half the smallest
    distance between two prototypes. None when there is a single one-shot class.
    """
    loo = []
    for c in classes:
        if c.shots >= 2:
            total = c.embeddings.sum(0)
            others = (total[None] - c.embeddings) / (c.shots - 1)
            loo.append(paired_distance(c.embeddings, others, metric))
    if loo:
        return float(np.max(np.concatenate(loo)) * slack)
    if len(classes) >= 2:
        protos = np.stack([c.embeddings.mean(0) for c in classes])
        nearest = np.inf
        for i in range(0, len(protos), 256):  # in row blocks: memory linear in the classes
            d = embedding_distance(protos[i:i + 256], protos, metric)
            rows = np.arange(len(d))
            d[rows, rows + i] = np.inf
            nearest = min(nearest, float(d.min()))
        return nearest / 2
    return None


# Letters of other scripts that render like the Latin ones of "unknown" (Unicode confusables).
_LOOKALIKES = str.maketrans({"о": "o", "ο": "o", "օ": "o", "к": "k", "κ": "k", "ո": "n", "п": "n", "ս": "u",
                             "υ": "u", "ԝ": "w", "ѡ": "w", "ω": "w", "ɯ": "w"})


def check_label(label) -> str:
    """A class label as stored: text, Unicode NFC (one form for what prints the same), stripped,
    1–128 characters, no control characters (newline, NUL, ESC…), and neither the reserved
    "unknown" nor anything that reads as it (other case, width or script)."""
    import unicodedata
    if not isinstance(label, str):
        raise LabelError(f"class labels are text, not {type(label).__name__} ({label!r})")
    text = unicodedata.normalize("NFC", label).strip()
    if not text or unicodedata.normalize("NFKC", text).casefold().translate(_LOOKALIKES) == UNKNOWN:
        raise LabelError(f"{text!r} cannot be a class label" + (" (it reads as the reserved 'unknown')" if text else ""))
    if len(text) > MAX_LABEL_LENGTH:
        raise LabelError(f"class label {text[:40]!r}… is {len(text)} characters; the limit is {MAX_LABEL_LENGTH}")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in text):
        raise LabelError(f"class label {text!r} holds control or unassigned characters; use printable text")
    return text


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
        self._threshold_cache: tuple[StoreState, float | None] | None = None
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
            classes = tuple(EnrolledClass(c.label, frozen(self._embed_sources([self.store.image_path(n) for n in c.images],
                                                                              support=True)),
                                          c.images) for c in saved.classes)
            state = replace(self._state, classes=classes, generation=saved.generation + 1)
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
        threshold = self._auto_threshold(state, prepared.metric) if reject == "auto" else reject
        if prepared.scale is not None:  # the prototype head: its logits are the rejection similarities, scaled
            logits = prepared.prototypes.logits(query, prepared.scale)
            best = logits.max(1, keepdims=True)
            distances = similarity_to_distance(best[:, 0] / prepared.scale, prepared.metric)
            return prediction_from_logits(state.labels, logits, best, distances, top_k, threshold)
        # the other heads: one prototype comparison gives the rejection distance (the nearest
        # prototype is the most similar one); the head's own arrays give the logits
        distances = similarity_to_distance(prepared.prototypes.logits(query).max(1), prepared.metric)
        logits = heads.score(state.head, state.fitted, query)
        return prediction_from_logits(state.labels, logits, logits.max(1, keepdims=True), distances, top_k, threshold)

    def _prepared(self, state: StoreState) -> _Prepared:
        """What predict needs of an enrolled state, made once per state (states are immutable)."""
        cached = self._prepared_cache
        if cached is None or cached.state is not state:
            metric = state.head.rejection_metric(self.bundle.l2_normalized)
            cached = self._prepared_cache = _Prepared(
                state, metric, heads.PreparedPrototypes(state.fitted["prototypes"], metric),
                np.float32(state.head.scale) if state.head.kind == "prototype" and state.head.scale > 0 else None)
        return cached

    def _auto_threshold(self, state: StoreState, metric: str) -> float | None:
        """calibrate_rejection, computed once per enrolled state (states are immutable)."""
        cached = self._threshold_cache
        if cached is None or cached[0] is not state:
            cached = self._threshold_cache = (state, calibrate_rejection(state.classes, metric))
        return cached[1]

    # ---------------------------------------------------------------- changes
    def enroll(self, label: str, images: Sequence[ImageSource] | np.ndarray, mode: str = "new") -> int:
        """Enroll a class from its support images. mode "new" refuses a label already enrolled,
        "add" adds shots to it, "replace" replaces its shots. Returns the class's shot count.
        Everything is decoded and embedded before anything changes: a bad image loses nothing."""
        return self.enroll_many({label: images}, mode)[check_label(label)]

    def enroll_many(self, classes: dict[str, Sequence[ImageSource] | np.ndarray], mode: str = "new") -> dict[str, int]:
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
            embedded = {label: self._embed_sources(images, support=True) for label, images in todo.items()}
            new_classes = list(state.classes)
            for label, images in todo.items():
                idx = state.find(label)
                kept = self._keep(images)
                if idx is not None and mode == "add":
                    old = state.classes[idx]
                    item = EnrolledClass(label, frozen(np.concatenate([old.embeddings, embedded[label]])), old.images + kept)
                else:
                    item = EnrolledClass(label, frozen(embedded[label]), kept)
                if idx is None:
                    new_classes.append(item)
                else:
                    new_classes[idx] = item
            check_counts(len(new_classes), {c.label: c.shots for c in new_classes if c.label in todo}, "enrollment")
            self._commit(self._refit(state, tuple(new_classes)))
            return {c.label: c.shots for c in new_classes if c.label in todo}

    def forget(self, label: str) -> None:
        if self.store is not None and not self.store.exists():
            raise StoreError(f"no store at {self.store.path}; nothing to forget")
        label = check_label(label)  # the same form enrollment stored: "  mug " forgets "mug"
        with self._write_lock, self._store_lock():
            state = self._refresh()
            if state.find(label) is None:
                raise UnknownClassError(f"{label!r} is not enrolled (enrolled: {', '.join(state.labels) or 'none'})")
            self._commit(self._refit(state, tuple(c for c in state.classes if c.label != label)))

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
