"""The open world on the shipped Omniglot model and real drawings of an alphabet it never saw
(Tagalog): the export's open-set prior and `--unknown auto`, `eval --open-set`, the enrollment
review (confusable classes, outlier and duplicate shots), and corrections (negative examples that
survive a restart, a gallery round trip and a freeze), through the library, the CLI and HTTP."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_cli
from edgemeta.runtime import BundleError, FewShotClassifier, load_bundle
from edgemeta.runtime.classifier import UNKNOWN
from edgemeta.runtime.open_set import CONFUSION_FLAG, OpenSetPrior


@pytest.fixture(scope="module")
def chars(tagalog):
    return sorted(tagalog)


def balanced(clf, tagalog, known: list[str], strangers: list[str], queries=range(10, 20), reject="auto") -> tuple:
    """(known right, unknown rejected) under `reject` on the held-out drawings."""
    images = [tagalog[c][i] for c in known for i in queries]
    truth = [c for c in known for _ in queries]
    got = clf.predict(images, reject=reject).labels
    right = np.mean([g == t for g, t in zip(got, truth)])
    rejected = np.mean([g == UNKNOWN for g in clf.predict([tagalog[c][i] for c in strangers for i in queries],
                                                          reject=reject).labels])
    return float(right), float(rejected)


def test_the_export_measures_a_prior_and_auto_applies_it_per_shot_count(shipped_bundle, tagalog, chars, tmp_path):
    bundle = load_bundle(shipped_bundle)
    prior = bundle.open_set
    assert prior is not None and set(prior.metrics) == {"euclidean", "cosine"}
    rows = prior.metrics["euclidean"].rows
    assert [r.shots for r in rows][:3] == [1, 2, 3]
    assert all(0.5 < r.auroc <= 1 and r.threshold > 0 for r in rows)
    clf = FewShotClassifier.load(shipped_bundle, store=tmp_path / "s")
    known, strangers = chars[:5], chars[5:10]
    clf.enroll_many({c: tagalog[c][:1] for c in known})
    # one shot each: the prior against the support set's own rule (what a bundle without a prior
    # does: half the smallest distance between two classes), on the same queries
    right, rejected = balanced(clf, tagalog, known, strangers)
    bare = FewShotClassifier.load(shipped_bundle, store=tmp_path / "s")
    bare.bundle.manifest.pop("open_set")
    assert bare.rejection_rule().how == "support set"
    right0, rejected0 = balanced(bare, tagalog, known, strangers)
    assert (right + rejected) / 2 >= 0.7, (right, rejected)
    assert (right + rejected) / 2 > (right0 + rejected0) / 2 + 0.1, ((right, rejected), (right0, rejected0))
    # each class gets the limit of its own shot count
    clf.enroll(known[4], tagalog[known[4]][1:5], mode="add")
    rule = clf.rejection_rule()
    assert rule.how == "prior"
    np.testing.assert_allclose(rule.limits, prior.metrics["euclidean"].thresholds(np.array([1, 1, 1, 1, 5])), rtol=1e-6)
    assert rule.limits[4] < rule.limits[0]  # more shots, a tighter prototype
    # inspect and the library say how auto decides
    about = clf.describe_auto()
    assert about["rule"] == "prior" and about["thresholds"]["1"] == pytest.approx(rows[0].threshold, rel=1e-5)
    r = run_cli("inspect", shipped_bundle)
    assert r.exit_code == 0 and "open-set prior measured on" in " ".join(r.output.split())


def test_a_manifest_prior_is_bounded_and_a_newer_one_says_upgrade(shipped_bundle, tmp_path):
    import shutil
    copy = tmp_path / "b"
    shutil.copytree(shipped_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    good = manifest["open_set"]
    for bad, message in ((dict(good, version=2), "newer edgemeta"),
                         ({**good, "metrics": {"euclidean": {"rows": [{**good["metrics"]["euclidean"]["rows"][0],
                                                                       "threshold": float("nan")}]}}}, "out of range"),
                         ({**good, "metrics": {"manhattan": good["metrics"]["euclidean"]}}, "is not one of"),
                         ({**good, "metrics": {"euclidean": {"rows": good["metrics"]["euclidean"]["rows"] * 20}}}, "shot counts")):
        (copy / "manifest.json").write_text(json.dumps({**manifest, "open_set": bad}))
        with pytest.raises(BundleError, match=message):
            load_bundle(copy)
    assert OpenSetPrior.from_dict(good).to_dict()["metrics"].keys() == good["metrics"].keys()


def test_eval_open_set_reports_every_rule_on_the_deployed_path(shipped_bundle, omniglot_paths):
    r = run_cli("eval", "--bundle", shipped_bundle, "--data", omniglot_paths[1], "--split", "all", "--shot", "1",
                "--query", "5", "--episodes", "20", "--open-set", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["known"] == out["strangers"] == 5 and out["episodes"] == 20 and 50 < out["auroc"] <= 100
    rules = out["rules"]
    assert set(rules) == {"none", "auto", "support set"}
    assert rules["none"]["known_rejected"] == 0 and rules["none"]["known_right"] == out["closed_accuracy"]
    assert rules["auto"]["balanced"] > rules["support set"]["balanced"]
    for rule in rules.values():
        assert rule["balanced"] == pytest.approx((rule["known_right"] + rule["unknown_rejected"]) / 2, abs=0.02)
    r = run_cli("eval", "--bundle", shipped_bundle, "--data", omniglot_paths[1], "--split", "all", "--shot", "19",
                "--open-set", "--episodes", "2")
    assert r.exit_code == 2 and "lower --shot or --query" in r.output


def test_review_names_confusable_classes_outlier_and_duplicate_shots(shipped_bundle, tagalog, chars, tmp_path):
    clf = FewShotClassifier.load(shipped_bundle, store=tmp_path / "s")
    a = chars[0]
    clf.enroll("first half", tagalog[a][:5])     # one character enrolled twice, from two halves of its drawings
    clf.enroll("second half", tagalog[a][10:15])
    clf.enroll("swapped", tagalog[chars[1]][:4] + tagalog[chars[2]][:1])   # a shot of another character
    clf.enroll("copies", [tagalog[chars[3]][0]] * 5)
    for c in chars[4:8]:
        clf.enroll(c, tagalog[c][:5])
    report = clf.review()
    assert report["pairs"][0]["confusion"] >= CONFUSION_FLAG
    assert {report["pairs"][0]["a"], report["pairs"][0]["b"]} == {"first half", "second half"}
    assert [p["confusion"] for p in report["pairs"]] == sorted((p["confusion"] for p in report["pairs"]), reverse=True)
    flags = {(f["label"], f["index"], f["flag"]) for f in report["shots"]}
    assert ("swapped", 4, "outlier") in flags
    clean = sum(c.shots for c in clf._state.classes if c.label not in ("swapped", "copies"))
    false_flags = {(lab, i) for lab, i, flag in flags if flag == "outlier"} - {("swapped", 4)}
    assert len(false_flags) <= clean // 10, false_flags  # the prior's limit is its 99th percentile of clean shots
    assert {(i, f) for lab, i, f in flags if lab == "copies"} == {(1, "duplicate"), (2, "duplicate"), (3, "duplicate"),
                                                                   (4, "duplicate")}
    advice = {c["label"]: " ".join(c["advice"]) for c in report["classes"]}
    assert "looks like 'second half'" in advice["first half"] and "shot 5 is far from the others" in advice["swapped"]
    assert "nearly the same picture" in advice["copies"]
    # the CLI prints the same report, and each enrollment's feedback
    r = run_cli("review", shipped_bundle, "--store", tmp_path / "s", "--json")
    assert r.exit_code == 0 and json.loads(r.output) == json.loads(json.dumps(report))
    r = run_cli("enroll", shipped_bundle, "--store", tmp_path / "s", "--label", "third half", *[
        str(p) for p in write(tmp_path, tagalog[a][15:18])])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and ("looks like 'first half'" in said or "looks like 'second half'" in said), r.output


def write(folder, images: list[bytes]) -> list:
    paths = []
    for i, data in enumerate(images):
        p = folder / f"img{len(list(folder.glob('img*.png')))}_{i}.png"
        p.write_bytes(data)
        paths.append(p)
    return paths


def test_negatives_reject_a_stranger_and_survive_a_restart_a_gallery_and_a_freeze(shipped_bundle, tagalog, chars, tmp_path):
    from edgemeta.runtime.frozen import FrozenClassifier
    from edgemeta.runtime.gallery import export_gallery, import_gallery
    store = tmp_path / "s"
    clf = FewShotClassifier.load(shipped_bundle, store=store)
    known = chars[:5]
    clf.enroll_many({c: tagalog[c][:5] for c in known})
    # the stranger the classes accept most often
    strangers = chars[5:]
    accepted = {c: np.mean([lab != UNKNOWN for lab in clf.predict(tagalog[c], reject="auto").labels]) for c in strangers}
    stranger = max(accepted, key=accepted.get)
    right_before, _ = balanced(clf, tagalog, known, [stranger])
    before = np.mean([lab == UNKNOWN for lab in clf.predict(tagalog[stranger][3:], reject="auto").labels])
    ids = clf.correct(tagalog[stranger][:3], none=True)["negatives"]
    assert len(ids) == 3 and [n["id"] for n in clf.negatives()] == ids
    after = np.mean([lab == UNKNOWN for lab in clf.predict(tagalog[stranger][3:], reject="auto").labels])
    right_after, _ = balanced(clf, tagalog, known, [stranger])
    assert after > before and after >= 0.6, (before, after)
    assert right_after >= right_before - 0.1
    # a restart
    again = FewShotClassifier.load(shipped_bundle, store=store)
    assert [n["id"] for n in again.negatives()] == ids and all(n["image"] for n in again.negatives())
    assert again.predict(tagalog[stranger][3:], reject="auto").labels == clf.predict(tagalog[stranger][3:], reject="auto").labels
    # a gallery round trip, with and without images
    for with_images in (False, True):
        export_gallery(store, tmp_path / f"g{with_images}.npz", images=with_images)
        state = import_gallery(tmp_path / f"g{with_images}.npz", tmp_path / f"s{with_images}")
        assert [n.id for n in state.negatives] == ids
    # a freeze: the graph's gate rejects what the negatives reject
    r = run_cli("freeze", shipped_bundle, "--store", store, "--out", tmp_path / "f")
    assert r.exit_code == 0, r.output
    frozen = FrozenClassifier.load(tmp_path / "f")
    assert frozen.frozen["auto"]["negatives"] == 3
    assert frozen.predict(tagalog[stranger], reject="auto").labels == clf.predict(tagalog[stranger], reject="auto").labels
    # removal: by id, all checked first
    r = run_cli("negatives", shipped_bundle, "--store", store, "--remove", ids[0], "--remove", "nope")
    assert r.exit_code == 2 and "no negative 'nope'" in r.output
    assert len(FewShotClassifier.load(shipped_bundle, store=store).negatives()) == 3
    r = run_cli("negatives", shipped_bundle, "--store", store, "--remove", ids[0])
    assert r.exit_code == 0 and "2 left" in r.output


def test_corrections_from_the_cli_and_their_bad_input(shipped_bundle, tagalog, chars, tmp_path):
    store = tmp_path / "s"
    clf = FewShotClassifier.load(shipped_bundle, store=store)
    clf.enroll_many({c: tagalog[c][:2] for c in chars[:3]})
    before = (store / "enrollment.npz").read_bytes()
    img = [str(p) for p in write(tmp_path, tagalog[chars[0]][5:6])]
    for args, message in (([], "a correction is one of"), (["--is", chars[0], "--none"], "a correction is one of"),
                          (["--not", "nobody"], "'nobody' is not enrolled"), (["--is", "unknown"], "cannot be a class label")):
        r = run_cli("correct", shipped_bundle, "--store", store, *img, *args)
        assert r.exit_code == 2 and r.output.startswith("error:") and message in r.output, r.output
        assert (store / "enrollment.npz").read_bytes() == before
    r = run_cli("correct", shipped_bundle, "--store", store, str(tmp_path / "missing.png"), "--none")
    assert r.exit_code == 2 and (store / "enrollment.npz").read_bytes() == before
    r = run_cli("correct", shipped_bundle, "--store", store, *img, "--is", chars[0])
    assert r.exit_code == 0 and f"added to {chars[0]!r}: 3 shot(s)" in r.output
    r = run_cli("correct", shipped_bundle, "--store", store, *img, "--not", chars[1])
    assert r.exit_code == 0 and "1 in the store" in r.output
    r = run_cli("negatives", shipped_bundle, "--store", store, "--json")
    assert json.loads(r.output)["negatives"][0]["note"] == chars[1]
    r = run_cli("review", shipped_bundle, "--store", tmp_path / "none")
    assert r.exit_code == 2 and "no store at" in r.output


def test_the_service_reviews_corrects_and_lists_negatives(shipped_bundle, tagalog, chars, tmp_path):
    httpx = pytest.importorskip("httpx", reason="httpx is part of the dev install")
    pytest.importorskip("fastapi", reason="edgemeta[serve] is part of the dev install")
    from serve_helpers import Server
    server = Server(shipped_bundle, tmp_path / "s")
    try:
        c = httpx.Client(base_url=server.url, timeout=60)
        assert c.get("/v1/review").status_code == 409
        r = c.post(f"/v1/classes/{chars[0]}/images", files=[("images", (f"{i}.png", b, "image/png"))
                                                             for i, b in enumerate(tagalog[chars[0]][:4])])
        assert r.status_code == 201 and set(r.json()["feedback"]) == {"pairs", "shots", "classes"}
        r = c.post(f"/v1/classes/{chars[0]} again/images", files=[("images", (f"{i}.png", b, "image/png"))
                                                                   for i, b in enumerate(tagalog[chars[0]][4:8])])
        feedback = r.json()["feedback"]
        assert feedback["pairs"][0]["b"] == chars[0] and feedback["pairs"][0]["confusion"] >= CONFUSION_FLAG
        whole = c.get("/v1/review").json()["pairs"]
        assert [({p["a"], p["b"]}, p["confusion"]) for p in whole] == [({chars[0], f"{chars[0]} again"}, feedback["pairs"][0]["confusion"])]
        model = c.get("/v1/model").json()
        assert model["unknown_auto"]["rule"] == "prior" and model["unknown_auto"]["negatives"] == 0
        one = [("images", ("x.png", tagalog[chars[9]][0], "image/png"))]
        for params, status in (({"is": chars[0], "none": "true"}, 400), ({}, 400), ({"not": "nobody"}, 404)):
            r = c.post("/v1/corrections", params=params, files=one)
            assert r.status_code == status and "error" in r.json(), r.text
        assert c.get("/v1/negatives").json() == {"negatives": []}
        r = c.post("/v1/corrections", params={"none": "true"}, files=one)
        assert r.status_code == 200 and r.json()["total_negatives"] == 1
        nid = r.json()["negatives"][0]
        assert c.get("/v1/negatives").json()["negatives"][0]["id"] == nid
        assert c.delete("/v1/negatives/nope").status_code == 404
        assert c.delete(f"/v1/negatives/{nid}").json() == {"negatives": []}
        r = c.post("/v1/corrections", params={"is": chars[9]}, files=one)
        assert r.status_code == 200 and r.json()["shots"] == 1
        assert r.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in r.headers["content-security-policy"]
        r = c.put(f"/v1/classes/{chars[0]}/limit", params={"unknown": "0.5"})
        assert r.status_code == 200 and r.json()["limits"][chars[0]] == {"limit": 0.5, "from": "own"}
        assert c.get("/v1/limits").json()["limits"][chars[9]]["from"] == "prior"
        assert c.put(f"/v1/classes/{chars[0]}/limit", params={"unknown": "-2"}).status_code == 400
        assert c.put("/v1/classes/nobody/limit", params={"unknown": "1"}).status_code == 404
    finally:
        server.stop()


def test_declared_negatives_must_match_what_the_file_holds(tmp_path):
    """A store's header that declares more negatives than its array holds, or too many, is refused
    in one line; a good one round-trips (version 2 only when negatives exist)."""
    import io

    from edgemeta.runtime.heads import HeadConfig
    from edgemeta.runtime.store import MAX_NEGATIVES, EnrolledClass, Negative, StoreError, StoreState, decode_state, encode_state, frozen
    emb = frozen(np.ones((2, 4), np.float32))
    state = StoreState("sha", "fp32", 4, HeadConfig(), (EnrolledClass("a", emb),), {"prototypes": frozen(emb[:1])}, 0,
                       (Negative(frozen(np.full(4, 2, np.float32)), "", "a"),))
    back = decode_state(encode_state(state), "s")
    assert [n.note for n in back.negatives] == ["a"] and back.negatives[0].id == state.negatives[0].id
    assert json.loads(str(np.load(io.BytesIO(encode_state(state)))["header"]))["version"] == 2
    assert json.loads(str(np.load(io.BytesIO(encode_state(StoreState("sha", "fp32", 4, HeadConfig()))))["header"]))["version"] == 1

    def forged(entries) -> bytes:
        z = dict(np.load(io.BytesIO(encode_state(state))))
        header = json.loads(str(z["header"]))
        header["negatives"] = entries
        z["header"] = np.array(json.dumps(header))
        buf = io.BytesIO()
        np.savez(buf, **z)
        return buf.getvalue()
    with pytest.raises(StoreError, match="2 negatives declared, the file holds"):
        decode_state(forged([{"note": "a"}, {"note": "a"}]), "s")
    with pytest.raises(StoreError, match="at most"):
        decode_state(forged([{}] * (MAX_NEGATIVES + 1)), "s")
    with pytest.raises(StoreError, match="kept image the store did not write"):
        decode_state(forged([{"image": "../x.png"}]), "s")


def test_a_class_can_have_its_own_limit_through_the_cli_library_and_a_gallery(shipped_bundle, tagalog, chars, tmp_path):
    from edgemeta.runtime.gallery import export_gallery, import_gallery
    store = tmp_path / "s"
    clf = FewShotClassifier.load(shipped_bundle, store=store)
    clf.enroll_many({c: tagalog[c][:2] for c in chars[:3]})
    auto = clf.limits()
    assert {v["from"] for v in auto.values()} == {"prior"}
    r = run_cli("limit", shipped_bundle, chars[0], "0", "--store", store)    # nothing is near enough: always unknown
    assert r.exit_code == 0, r.output
    again = FewShotClassifier.load(shipped_bundle, store=store)
    assert again.limits()[chars[0]] == {"limit": 0.0, "from": "own"} and again.limits()[chars[1]] == auto[chars[1]]
    assert set(again.predict(tagalog[chars[0]][10:15], reject="auto").labels) == {UNKNOWN}
    assert again.predict(tagalog[chars[0]][10:15]).labels.count(chars[0]) >= 3   # a fixed threshold is not touched
    again.enroll(chars[0], tagalog[chars[0]][2:3], mode="add")                       # kept through added shots
    assert again.limits()[chars[0]]["from"] == "own"
    export_gallery(store, tmp_path / "g.npz")
    assert import_gallery(tmp_path / "g.npz", tmp_path / "s2").classes[0].limit == 0.0
    for bad in ("-1", "nan", "far"):
        r = run_cli("limit", shipped_bundle, chars[0], bad, "--store", store)
        assert r.exit_code == 2 and r.output.startswith("error:"), r.output
    r = run_cli("limit", shipped_bundle, chars[0], "auto", "--store", store, "--json")
    assert r.exit_code == 0 and json.loads(r.output)[chars[0]]["from"] == "prior"
