"""Galleries: a store's classes in one checksummed file, moved to another store (another device),
with merge and conflict rules, re-embedding for another model, and hostile files refused."""
from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import run_cli
from edgemeta.runtime import FewShotClassifier
from edgemeta.runtime.errors import StoreError
from edgemeta.runtime.gallery import export_gallery, import_gallery, read_gallery
from edgemeta.runtime.store import EnrollmentStore


@pytest.fixture
def source_store(tiny_bundle, tagalog, tmp_path):
    chars = sorted(tagalog)
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "device-a")
    for c in chars[:4]:
        clf.enroll(c, tagalog[c][:3])
    return tmp_path / "device-a", chars


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_then_import_on_a_fresh_store_predicts_identically(tiny_bundle, tagalog, source_store, tmp_path):
    store, chars = source_store
    r = run_cli("gallery", "export", "--store", store, "--out", tmp_path / "g.npz")
    assert r.exit_code == 0, r.output
    r = run_cli("gallery", "import", tmp_path / "g.npz", "--store", tmp_path / "device-b")
    assert r.exit_code == 0, r.output and "4 class(es)" in r.stdout
    queries = [img for c in chars[:4] for img in tagalog[c][10:13]]
    a = FewShotClassifier.load(tiny_bundle, store=store).predict(queries, top_k=2)
    b = FewShotClassifier.load(tiny_bundle, store=tmp_path / "device-b").predict(queries, top_k=2)
    assert a.labels == b.labels
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)  # prototypes refitted: float rounding


def test_merge_and_conflict_rules(tiny_bundle, tagalog, source_store, tmp_path):
    store, chars = source_store
    export_gallery(store, tmp_path / "g.npz")
    other = FewShotClassifier.load(tiny_bundle, store=tmp_path / "b")
    other.enroll(chars[0], tagalog[chars[0]][5:7])      # in both
    other.enroll(chars[5], tagalog[chars[5]][:2])       # only in b
    before = tree(tmp_path / "b")
    with pytest.raises(StoreError, match="nothing was changed"):
        import_gallery(tmp_path / "g.npz", tmp_path / "b")  # default: a conflict is an error
    assert tree(tmp_path / "b") == before
    shots = lambda: {c.label: c.shots for c in EnrollmentStore(tmp_path / "b").read().classes}  # noqa: E731
    import_gallery(tmp_path / "g.npz", tmp_path / "b", on_conflict="skip")
    assert shots()[chars[0]] == 2 and shots()[chars[5]] == 2 and len(shots()) == 5
    import_gallery(tmp_path / "g.npz", tmp_path / "b", on_conflict="add")
    assert shots()[chars[0]] == 2 + 3
    import_gallery(tmp_path / "g.npz", tmp_path / "b", on_conflict="replace")
    assert shots()[chars[0]] == 3
    import_gallery(tmp_path / "g.npz", tmp_path / "b", replace_all=True)
    assert set(shots()) == set(chars[:4])


def test_a_gallery_for_another_model_needs_its_images_and_the_bundle(tiny_bundle, tagalog, source_store, tmp_path):
    store, chars = source_store
    export_gallery(store, tmp_path / "plain.npz")
    export_gallery(store, tmp_path / "images.npz", images=True)
    int8 = FewShotClassifier.load(tiny_bundle, store=tmp_path / "int8", variant="int8")
    int8.enroll(chars[6], tagalog[chars[6]][:2])  # a store for the INT8 model
    with pytest.raises(StoreError, match="carries no images"):
        import_gallery(tmp_path / "plain.npz", tmp_path / "int8", classifier=int8)
    with pytest.raises(StoreError, match="--bundle"):
        import_gallery(tmp_path / "images.npz", tmp_path / "int8")
    state = import_gallery(tmp_path / "images.npz", tmp_path / "int8", classifier=int8)
    assert state.variant == "int8-cpu" and len(state.classes) == 5
    want = int8.embed_support(list(read_gallery(tmp_path / "images.npz")[2].values())[:1])
    assert np.isfinite(want).all()
    r = run_cli("gallery", "import", tmp_path / "images.npz", "--store", tmp_path / "int8", "--bundle", tiny_bundle,
                "--on-conflict", "replace")
    assert r.exit_code == 2 and "another model" in r.stderr  # an fp32 bundle cannot re-embed for the int8 store


def test_hostile_galleries_are_refused_with_one_line_and_change_nothing(tiny_bundle, source_store, tmp_path):
    import json
    store, _ = source_store
    export_gallery(store, tmp_path / "g.npz", images=True)
    good = dict(np.load(tmp_path / "g.npz", allow_pickle=False))
    target = tmp_path / "target"
    FewShotClassifier.load(tiny_bundle, store=target).enroll("x", np.zeros((1, 28, 28, 1), np.uint8))
    before = tree(target)

    def crafted(name, edit):
        arrays = {k: v.copy() for k, v in good.items()}
        header = json.loads(str(arrays["header"]))
        edit(header, arrays)
        arrays["header"] = np.array(json.dumps(header))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        (tmp_path / name).write_bytes(buf.getvalue())
        return tmp_path / name

    def nan(h, a):
        a["embeddings"][0, 0] = np.nan
        h["sha256"]["embeddings"] = __import__("hashlib").sha256(a["embeddings"].tobytes()).hexdigest()

    def path_name(h, a):
        name = next(k for k in a if k.startswith("image_"))
        a["image_../../etc/passwd"] = a.pop(name)
        h["sha256"]["image_../../etc/passwd"] = h["sha256"].pop(name)

    cases = {"tampered": (lambda h, a: a["embeddings"].__setitem__((0, 0), 5.0), "checksums"),
             "nan": (nan, "non-finite"),
             "path": (path_name, "not content-addressed"),
             "huge": (lambda h, a: h["classes"][0].__setitem__("shots", 10 ** 9), "shots"),
             "label": (lambda h, a: h["classes"][0].__setitem__("label", "a\nb"), "control")}
    for name, (edit, why) in cases.items():
        path = crafted(f"{name}.npz", edit)
        with pytest.raises(StoreError, match=why):
            import_gallery(path, target, on_conflict="add")
        r = run_cli("gallery", "import", path, "--store", target, "--on-conflict", "add")
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (name, r.output)
    (tmp_path / "junk.npz").write_bytes(b"not a gallery")
    assert run_cli("gallery", "import", tmp_path / "junk.npz", "--store", target).exit_code == 2
    assert tree(target) == before
