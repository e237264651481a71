"""What the device commands do (enroll, predict, forget, classes), without typer: edgemeta.cli.device
declares their options and calls these; the fast path (edgemeta.cli.fast) calls them straight from
a parsed command line. They import only edgemeta.runtime (no torch), rich only to draw a table
(plain lines are printed plainly: a shell loop of `edgemeta enroll` never imports rich)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from edgemeta.cli.output import print_json, print_table


def _open(bundle: Path, store: Path, head: Optional[str], backend: str, variant: str, reembed: bool = False):
    from edgemeta.runtime import FewShotClassifier
    return FewShotClassifier.load(bundle, store=store, head=head, backend=backend, variant=variant, reembed=reembed)


def folder_classes(folder: Path) -> dict[str, list[Path]]:
    """<folder>/<label>/<images>: every subfolder is a class; an empty one is an error, not a skip."""
    from edgemeta.runtime.errors import DataError, StoreError
    from edgemeta.runtime.preprocess import IMAGE_EXTENSIONS
    if not folder.is_dir():
        raise DataError(f"--from-folder {folder} is not a folder")
    classes = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise StoreError(f"class folder {sub} has no images (png/jpg); add some or remove the folder")
        classes[sub.name] = images
    if not classes:
        raise DataError(f"{folder} has no class subfolders; expected {folder}/<label>/<image>")
    return classes


def enroll(bundle: Path, images: Optional[list[Path]], store: Path, label: Optional[str], from_folder: Optional[Path],
           add: bool, replace: bool, head: Optional[str], backend: str, variant: str, reembed: bool) -> None:
    from edgemeta.runtime.errors import ConfigError
    if add and replace:
        raise ConfigError("--add and --replace exclude each other")
    mode = "add" if add else "replace" if replace else "new"
    if from_folder is not None:
        if images or label:
            raise ConfigError("use either --from-folder or --label with IMAGES, not both")
        todo = folder_classes(from_folder)
    else:
        if not label:
            raise ConfigError("name the class with --label NAME (or use --from-folder DIR)")
        todo = {label: list(images or [])}
    clf = _open(bundle, store, head, backend, variant, reembed)
    for name, shots in clf.enroll_many(todo, mode=mode).items():  # all classes checked before any is saved
        print(f"enrolled {name!r}: {shots} shot(s)")  # plain lines: rich only for the tables
        for line in clf.review(name)["classes"][0]["advice"]:
            print(f"  · {line}")
    print(f"{len(clf.classes)} class(es) in {store}")


def predict(bundle: Path, images: list[Path], store: Optional[Path], top_k: int, unknown: Optional[str],
            head: Optional[str], backend: str, variant: str, reembed: bool, as_json: bool) -> None:
    from edgemeta.runtime.classifier import parse_unknown
    from edgemeta.runtime.errors import ConfigError, StoreError
    from edgemeta.runtime.frozen import FrozenClassifier, is_frozen
    reject = parse_unknown(unknown, "--unknown")
    if is_frozen(bundle):
        if store is not None or head is not None:
            raise ConfigError(f"{bundle} is a frozen classifier: its classes and head are inside it (no --store/--head)")
        result = FrozenClassifier.load(bundle).predict(list(images), top_k=top_k, reject=reject)
    else:
        if store is None:
            raise ConfigError("give the enrollment store with --store DIR (or predict with a frozen classifier)")
        if not Path(store).exists():
            raise StoreError(f"no store at {store}; enroll classes first with `edgemeta enroll`")
        clf = _open(bundle, store, head, backend, variant, reembed)
        result = clf.predict(list(images), top_k=top_k, reject=reject)
    rows = result.to_list()
    if as_json:
        print_json([{"image": str(p), **r} for p, r in zip(images, rows)], indent=2)
        return
    def chances(row: dict) -> str:  # the probability alone where it is the label's own
        if len(row["top_k"]) == 1 and row["top_k"][0]["label"] == row["label"]:
            return f"{row['top_k'][0]['probability']:.2f}"
        return ", ".join(f"{t['label']} {t['probability']:.2f}" for t in row["top_k"])
    print_table(["image", "label", f"top {top_k}" if top_k > 1 else "probability", "distance"],
                [[str(p), r["label"], chances(r), f"{r['distance']:.3f}"] for p, r in zip(images, rows)])


def forget(bundle: Path, labels: list[str], store: Path) -> None:
    from edgemeta.runtime.errors import StoreError
    from edgemeta.runtime.store import EnrollmentStore
    if not EnrollmentStore(store).exists():
        raise StoreError(f"no store at {store}; nothing to forget")
    clf = _open(bundle, store, None, "onnxruntime", "fp32")
    missing = [label for label in labels if label not in clf.classes]
    if missing:  # check every label before removing any
        raise StoreError(f"{missing[0]!r} is not enrolled (enrolled: {', '.join(clf.classes) or 'none'}); nothing was removed")
    for label in labels:
        clf.forget(label)
        print(f"forgot {label!r}")
    print(f"{len(clf.classes)} class(es) left")


def classes(store: Path, as_json: bool) -> None:
    from edgemeta.runtime.errors import StoreError
    from edgemeta.runtime.store import EnrollmentStore
    state = EnrollmentStore(store).read()
    if state is None:
        raise StoreError(f"no store at {store}; enroll classes first with `edgemeta enroll`")
    shots = {c.label: c.shots for c in state.classes}
    if as_json:
        print_json({"classes": shots, "head": state.head.to_dict(), "model_sha256": state.model_sha256})
        return
    print_table(["class", "shots"], [[k, str(v)] for k, v in shots.items()], title=f"{store} — head {state.head.kind}")


def review(bundle: Path, store: Path, label: Optional[str], as_json: bool) -> None:
    """The enrollment report of a store (or one class): confusable pairs, flagged shots, advice."""
    from edgemeta.runtime.errors import StoreError
    from edgemeta.runtime.store import EnrollmentStore
    if not EnrollmentStore(store).exists():
        raise StoreError(f"no store at {store}; enroll classes first with `edgemeta enroll`")
    clf = _open(bundle, store, None, "onnxruntime", "fp32")
    if not clf.classes:
        raise StoreError(f"the store at {store} has no classes to review")
    report = clf.review(label)
    if as_json:
        print_json(report, indent=2)
        return
    if report["pairs"]:
        print_table(["class", "confused with", "estimated"],
                    [[p["a"], p["b"], f"{p['confusion']:.0%}"] for p in report["pairs"]], title="likely confusions")
    for c in report["classes"]:
        print(f"{c['label']!r}: {c['shots']} shot(s)" + ("" if c["advice"] else " — nothing to improve"))
        for line in c["advice"]:
            print(f"  · {line}")


def correct(bundle: Path, images: list[Path], store: Path, is_label: Optional[str], not_label: Optional[str],
            none: bool) -> None:
    """A correction: the images are shots of IS_LABEL, or negatives (not NOT_LABEL / none of the classes)."""
    from edgemeta.runtime.errors import StoreError
    from edgemeta.runtime.store import EnrollmentStore
    if not EnrollmentStore(store).exists():
        raise StoreError(f"no store at {store}; enroll classes first with `edgemeta enroll`")
    clf = _open(bundle, store, None, "auto", "fp32")
    done = clf.correct(list(images), is_label=is_label, not_label=not_label, none=none)
    if done["correction"] == "is":
        print(f"added to {done['label']!r}: {done['shots']} shot(s)")
    else:
        what = f"not {done['label']!r}" if done["label"] else "none of the enrolled classes"
        print(f"kept {len(done['negatives'])} negative example(s) ({what}): {', '.join(done['negatives'])}; "
              f"{done['total_negatives']} in the store")


def negatives(bundle: Path, store: Path, remove: Optional[list[str]], as_json: bool) -> None:
    """List the store's negative examples, or remove some by id."""
    from edgemeta.runtime.errors import StoreError
    from edgemeta.runtime.store import EnrollmentStore
    if not EnrollmentStore(store).exists():
        raise StoreError(f"no store at {store}; enroll classes first with `edgemeta enroll`")
    clf = _open(bundle, store, None, "onnxruntime", "fp32")
    if remove:
        left = clf.remove_negatives(list(remove))
        print(f"removed {len(remove)} negative example(s); {left} left")
        return
    rows = clf.negatives()
    if as_json:
        print_json({"negatives": rows}, indent=2)
        return
    print_table(["id", "not", "kept image"], [[r["id"], r["note"] or "(none of the classes)", r["image"] or "–"] for r in rows],
                title=f"{store} — {len(rows)} negative example(s)")


def limit(bundle: Path, store: Path, label: Optional[str], value: Optional[str], as_json: bool) -> None:
    """Show each class's "unknown" limit under --unknown auto, or set one class's own (a distance,
    or 'auto' to go back to the rule's)."""
    from edgemeta.runtime.classifier import parse_unknown
    from edgemeta.runtime.errors import ConfigError, StoreError
    from edgemeta.runtime.store import EnrollmentStore
    if not EnrollmentStore(store).exists():
        raise StoreError(f"no store at {store}; enroll classes first with `edgemeta enroll`")
    clf = _open(bundle, store, None, "onnxruntime", "fp32")
    if value is not None:
        if label is None:
            raise ConfigError("name the class: edgemeta limit BUNDLE --store S LABEL VALUE")
        parsed = parse_unknown(value, "the limit")
        clf.set_limit(label, None if parsed == "auto" else float(parsed))  # type: ignore[arg-type]
    rows = clf.limits()
    if label is not None and label not in rows:
        raise StoreError(f"{label!r} is not enrolled (enrolled: {', '.join(rows) or 'none'})")
    shown = {label: rows[label]} if label is not None else rows
    if as_json:
        print_json(shown, indent=2)
        return
    print_table(["class", "unknown beyond", "from"],
                [[k, "never" if v["limit"] is None else f"{v['limit']:.4g}", v["from"]] for k, v in shown.items()])
