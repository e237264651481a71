"""The device runtime: enroll / predict / forget, the store across restarts and crashes,
concurrency, and agreement of the deployed path with torch."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import ROOT, run_cli
from edgemeta.runtime import FewShotClassifier, ImageDecodeError, StoreError
from edgemeta.runtime.heads import head_names
from edgemeta.runtime.store import EnrollmentStore


def _split(tagalog, n_classes=5, shots=5):
    chars = sorted(tagalog)[:n_classes]
    support = {c: tagalog[c][:shots] for c in chars}
    query = [(c, img) for c in chars for img in tagalog[c][shots:]]
    return support, query


def test_enroll_predict_forget_on_unseen_alphabet(tiny_bundle, tagalog, tmp_path):
    support, query = _split(tagalog)
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    for label, imgs in support.items():
        assert clf.enroll(label, imgs) == 5
    assert clf.classes == sorted(support)
    labels, probs = clf.predict([img for _, img in query], top_k=3)
    accuracy = np.mean([p == c for p, (c, _) in zip(labels, query)])
    assert accuracy > 0.6  # 5-way 5-shot on an alphabet never seen in training; chance is 0.2
    assert probs.shape == (len(query), 3) and np.all(np.diff(probs, axis=1) <= 1e-7)
    clf.forget(sorted(support)[0])
    assert clf.classes == sorted(support)[1:]
    assert clf.predict([query[0][1]]).labels[0] != sorted(support)[0]


def test_enrolled_classes_survive_a_restart(tiny_bundle, tagalog, tmp_path):
    support, query = _split(tagalog, 3)
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    for label, imgs in support.items():
        clf.enroll(label, imgs)
    before = clf.predict([img for _, img in query], top_k=2)
    again = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s")
    assert again.classes == clf.classes and again.shots() == clf.shots()
    after = again.predict([img for _, img in query], top_k=2)
    assert after.labels == before.labels
    np.testing.assert_allclose(after.probabilities, before.probabilities, rtol=1e-6)


@pytest.mark.parametrize("head", head_names())
def test_every_head_classifies_and_prototype_enrollment_touches_only_the_new_class(tiny_bundle, tagalog, head):
    support, query = _split(tagalog, 4)
    clf = FewShotClassifier.load(tiny_bundle, head=head)
    for label, imgs in support.items():
        clf.enroll(label, imgs)
    acc = np.mean([p == c for p, (c, _) in zip(clf.predict([i for _, i in query]).labels, query)])
    assert acc > 0.6, head
    if head == "prototype":
        before = clf._state.fitted["prototypes"].copy()
        clf.enroll("extra", tagalog[sorted(tagalog)[10]][:5])
        after = clf._state.fitted["prototypes"]
        np.testing.assert_array_equal(after[:4], before)  # existing rows untouched, bit for bit


def test_add_and_replace_shots(tiny_bundle, tagalog):
    clf = FewShotClassifier.load(tiny_bundle)
    imgs = tagalog[sorted(tagalog)[0]]
    clf.enroll("a", imgs[:2])
    with pytest.raises(StoreError, match="already enrolled \\(2 shots\\).*--add.*--replace"):
        clf.enroll("a", imgs[2:4])
    assert clf.enroll("a", imgs[2:4], mode="add") == 4
    assert clf.enroll("a", imgs[:1], mode="replace") == 1


def test_bad_input_is_refused_and_loses_nothing(tiny_bundle, tagalog, tmp_path):
    store = tmp_path / "s"
    clf = FewShotClassifier.load(tiny_bundle, store=store)
    clf.enroll("a", tagalog[sorted(tagalog)[0]][:3])
    saved = (store / "enrollment.npz").read_bytes()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageDecodeError, match="broken.png"):
        clf.enroll("b", [tagalog[sorted(tagalog)[1]][0], tmp_path / "broken.png"])
    with pytest.raises(StoreError, match="no images"):
        clf.enroll("c", [])
    with pytest.raises(ImageDecodeError, match="uint8 \\[N, 28, 28, 1\\]"):
        clf.enroll("d", np.zeros((2, 28, 28, 3), np.uint8))  # wrong channel count
    with pytest.raises(StoreError, match="not enrolled"):
        clf.forget("zzz")
    assert clf.classes == ["a"] and (store / "enrollment.npz").read_bytes() == saved
    with pytest.raises(StoreError, match="no classes are enrolled"):
        FewShotClassifier.load(tiny_bundle).predict([tagalog[sorted(tagalog)[0]][0]])


def test_unknown_rejection_calibrated_on_the_support_set(tiny_bundle, tagalog):
    chars = sorted(tagalog)
    clf = FewShotClassifier.load(tiny_bundle)
    for c in chars[:5]:
        clf.enroll(c, tagalog[c][:10])
    known = clf.predict([img for c in chars[:5] for img in tagalog[c][10:]], reject="auto")
    assert np.mean([lab == "unknown" for lab in known.labels]) < 0.2
    far = clf.predict(list(tagalog[chars[5]]), reject=0.0)
    assert set(far.labels) == {"unknown"}  # a zero distance threshold rejects everything
    never = clf.predict(list(tagalog[chars[5]]), reject=None)
    assert "unknown" not in never.labels


def test_a_store_for_another_bundle_is_refused_then_reembedded(tiny_bundle, tagalog, tmp_path):
    import shutil
    store = tmp_path / "s"
    clf = FewShotClassifier.load(tiny_bundle, store=store)
    clf.enroll("a", tagalog[sorted(tagalog)[0]][:3])
    with pytest.raises(StoreError, match="made for another model.*--reembed"):
        FewShotClassifier.load(tiny_bundle, store=store, variant="int8")
    moved = FewShotClassifier.load(tiny_bundle, store=store, variant="int8", reembed=True)
    assert moved.shots() == {"a": 3}
    assert EnrollmentStore(store).read().variant == "int8-cpu"  # the U8S8 graph ONNX Runtime runs on a CPU
    shutil.rmtree(store / "images")
    store2 = tmp_path / "s2"
    no_images = FewShotClassifier.load(tiny_bundle, store=store2, keep_images=False)
    no_images.enroll("a", tagalog[sorted(tagalog)[0]][:2])
    with pytest.raises(StoreError, match="Enroll the classes again"):
        FewShotClassifier.load(tiny_bundle, store=store2, variant="int8")


CHILD = textwrap.dedent("""
    import sys, zipfile
    from edgemeta.runtime import FewShotClassifier
    bundle, store, zpath = sys.argv[1:4]
    z = zipfile.ZipFile(zpath)
    imgs = [z.read(n) for n in sorted(z.namelist()) if n.endswith('.png')][:400]
    clf = FewShotClassifier.load(bundle, store=store, keep_images=False)
    print('ready', flush=True)
    i = 0
    while True:  # enroll and forget forever, saving each time, until killed
        clf.enroll(f'tmp{i}', imgs[(i * 5) % 395:(i * 5) % 395 + 5])
        if i % 3 == 0:
            clf.forget(f'tmp{i}')
        if i == 0:
            print('saving', flush=True)  # at least one save done: the kill lands among saves
        i += 1
""")


def test_kill_9_during_saves_never_loses_enrolled_classes(tiny_bundle, tagalog, tmp_path, omniglot_paths):
    store = tmp_path / "s"
    base = FewShotClassifier.load(tiny_bundle, store=store, keep_images=False)
    chars = sorted(tagalog)[:8]
    for c in chars:
        base.enroll(c, tagalog[c][:5])
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = np.random.default_rng(0)
    for round_ in range(6):
        child = subprocess.Popen([sys.executable, str(script), str(tiny_bundle), str(store), str(omniglot_paths[0])],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        assert child.stdout.readline().strip() == "saving"
        time.sleep(float(rng.uniform(0.05, 0.4)))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        state = EnrollmentStore(store).read()  # always a complete, decodable state
        assert set(chars) <= set(state.labels), f"round {round_}"
        assert all(c.embeddings.shape == (5, 64) for c in state.classes)
        FewShotClassifier.load(tiny_bundle, store=store).predict([tagalog[chars[0]][9]])
    assert EnrollmentStore(store).read().generation >= 8 + 6  # every round saved at least once before the kill


def test_predict_while_enrolling_in_another_thread_sees_consistent_heads(tiny_bundle, tagalog, tmp_path):
    chars = sorted(tagalog)
    clf = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s", keep_images=False)
    clf.enroll(chars[0], tagalog[chars[0]][:5])
    errors, seen = [], []
    stop = threading.Event()

    def enroller():
        try:
            for c in chars[1:12]:
                clf.enroll(c, tagalog[c][:5])
                clf.forget(c) if c == chars[5] else None
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    def predictor():
        query = [tagalog[chars[0]][10], tagalog[chars[1]][10]]
        while not stop.is_set():
            try:
                p = clf.predict(query, top_k=2)
                assert len(p.labels) == 2 and all(lab in chars for lab in p.labels)
                assert np.all(p.probabilities.sum(1) <= 1 + 1e-5)
                seen.append(len(p.top_k[0]))
            except Exception as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=enroller), threading.Thread(target=predictor), threading.Thread(target=predictor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen and clf.classes == [c for c in chars[:12] if c != chars[5]]


def test_deployed_path_matches_torch_evaluation_within_0_2_points(tiny_run, tiny_bundle, omniglot_paths):
    data = [x for p in omniglot_paths for x in ("--data", p)]
    common = [*data, "--split-mode", "seeded", "--episodes", "300", "--json"]
    torch_result = json.loads(run_cli("eval", tiny_run / "best.safetensors", *common).stdout)
    deployed = json.loads(run_cli("eval", "--bundle", tiny_bundle, *common).stdout)
    assert abs(deployed["accuracy"] - torch_result["accuracy"]) <= 0.2
    int8 = json.loads(run_cli("eval", "--bundle", tiny_bundle, "--variant", "int8", *common).stdout)
    assert abs(int8["accuracy"] - torch_result["accuracy"]) <= 2.0


def test_cli_enroll_predict_forget_classes(tiny_bundle, tagalog, tmp_path):
    folder = tmp_path / "photos"
    for c in sorted(tagalog)[:3]:
        (folder / c).mkdir(parents=True)
        for i, img in enumerate(tagalog[c][:4]):
            (folder / c / f"{i}.png").write_bytes(img)
    store = tmp_path / "store"
    r = run_cli("enroll", tiny_bundle, "--store", store, "--from-folder", folder)
    assert r.exit_code == 0, r.output
    assert "3 class(es)" in r.stdout
    query = tmp_path / "q.png"
    query.write_bytes(tagalog[sorted(tagalog)[1]][15])
    out = json.loads(run_cli("predict", tiny_bundle, query, "--store", store, "--json", "--top-k", "2").stdout)
    assert out[0]["label"] == sorted(tagalog)[1] and len(out[0]["top_k"]) == 2
    again = run_cli("enroll", tiny_bundle, "--store", store, "--label", sorted(tagalog)[0], folder / sorted(tagalog)[0] / "0.png")
    assert again.exit_code == 2 and "already enrolled" in again.output and "--add" in again.output
    assert run_cli("enroll", tiny_bundle, "--store", store, "--label", sorted(tagalog)[0], "--add",
                   folder / sorted(tagalog)[0] / "0.png").exit_code == 0
    (folder / "empty").mkdir()
    empty = run_cli("enroll", tiny_bundle, "--store", store, "--from-folder", folder)
    assert empty.exit_code == 2 and "has no images" in empty.output
    assert run_cli("forget", tiny_bundle, sorted(tagalog)[2], "--store", store).exit_code == 0
    listed = json.loads(run_cli("classes", "--store", store, "--json").stdout)["classes"]
    assert listed == {sorted(tagalog)[0]: 5, sorted(tagalog)[1]: 4}
    missing = run_cli("predict", tiny_bundle, query, "--store", tmp_path / "nostore")
    assert missing.exit_code == 2 and "enroll classes first" in missing.output


NO_TORCH = textwrap.dedent("""
    import json, sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == 'torch' or name.startswith('torch.'):
                raise ImportError('torch is blocked: the runtime must not need it')
    sys.meta_path.insert(0, Block())
    from edgemeta.cli import app
    from typer.testing import CliRunner
    r = CliRunner()
    for args in sys.argv[1:]:
        res = r.invoke(app, json.loads(args))
        assert res.exit_code == 0, res.output
        print(res.stdout)
    assert 'torch' not in sys.modules
    import edgemeta.runtime
    print('NO_TORCH_OK')
""")


def test_runtime_and_device_cli_work_with_torch_blocked(tiny_bundle, tagalog, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(tagalog[sorted(tagalog)[0]][0])
    script = tmp_path / "nt.py"
    script.write_text(NO_TORCH)
    enroll = json.dumps(["enroll", str(tiny_bundle), "--store", str(tmp_path / "s"), "--label", "a", str(img)])
    predict = json.dumps(["predict", str(tiny_bundle), "--store", str(tmp_path / "s"), str(img), "--json"])
    out = subprocess.run([sys.executable, str(script), enroll, predict], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "NO_TORCH_OK" in out.stdout


def test_importing_the_runtime_does_not_import_torch():
    code = "import sys, edgemeta.runtime, edgemeta.runtime.backends, edgemeta.cli; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_labels_and_messages_with_brackets_print_verbatim(tiny_bundle, tagalog, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(tagalog[sorted(tagalog)[0]][0])
    r = run_cli("enroll", tiny_bundle, "--store", tmp_path / "s", "--label", "[bold]mug", img)
    assert r.exit_code == 0 and "[bold]mug" in r.stdout
    assert "[bold]mug" in run_cli("classes", "--store", tmp_path / "s").stdout
    again = run_cli("enroll", tiny_bundle, "--store", tmp_path / "s", "--label", "[bold]mug", img)
    assert again.exit_code == 2 and "'[bold]mug' is already enrolled" in again.output


def test_cli_reembeds_a_store_for_another_variant(tiny_bundle, tagalog, tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(tagalog[sorted(tagalog)[0]][0])
    assert run_cli("enroll", tiny_bundle, "--store", tmp_path / "s", "--label", "a", img).exit_code == 0
    refused = run_cli("predict", tiny_bundle, img, "--store", tmp_path / "s", "--variant", "int8")
    assert refused.exit_code == 2 and "--reembed" in refused.output
    ok = run_cli("predict", tiny_bundle, img, "--store", tmp_path / "s", "--variant", "int8", "--reembed", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)[0]["label"] == "a"


def test_two_writers_on_one_store_see_each_others_classes(tiny_bundle, tagalog, tmp_path):
    chars = sorted(tagalog)
    a = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s", keep_images=False)
    b = FewShotClassifier.load(tiny_bundle, store=tmp_path / "s", keep_images=False)
    a.enroll(chars[0], tagalog[chars[0]][:2])
    b.enroll(chars[1], tagalog[chars[1]][:2])   # b picks up a's save before writing its own
    assert b.classes == chars[:2]
    a.enroll(chars[2], tagalog[chars[2]][:2])
    assert a.classes == chars[:3]
    assert FewShotClassifier.load(tiny_bundle, store=tmp_path / "s").classes == chars[:3]


def test_backends_by_name_and_onnxruntime_providers_by_short_name(tmp_path):
    """`--backend onnxruntime:cpu` (or openvino, coreml… where installed) reaches ONNX Runtime's
    providers by name; an unknown one is one clear error; each backend says whether it is on a GPU."""
    import shutil

    from conftest import TINY_BUNDLE
    from edgemeta.runtime.backends import parse_backend
    from edgemeta.runtime.errors import ConfigError
    assert parse_backend("auto") == ("auto", None)
    assert parse_backend("onnxruntime:openvino") == ("onnxruntime", ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ConfigError, match="unknown ONNX Runtime provider 'tpu'"):
        parse_backend("onnxruntime:tpu")
    with pytest.raises(ConfigError, match="backend must be auto or one of onnxruntime:PROVIDER.*, tensorrt, not 'tflite'"):
        parse_backend("tflite")
    with pytest.raises(ConfigError, match="backend must be auto or one of"):
        parse_backend("tensorrt:fast")  # tensorrt takes no options
    bundle = shutil.copytree(TINY_BUNDLE, tmp_path / "b")
    clf = FewShotClassifier.load(bundle, backend="onnxruntime:cpu")
    assert clf.backend.describe()["providers"] == ["CPUExecutionProvider"] and clf.backend.on_gpu is False
    with pytest.raises(ConfigError, match="OpenVINOExecutionProvider not available here"):
        FewShotClassifier.load(bundle, backend="onnxruntime:openvino")


def test_a_backend_is_one_registration_and_every_entry_point_reaches_it(tmp_path, tagalog):
    """A new backend registered the way runtime/backends/*.py register theirs is a `--backend`
    choice of the CLI, is what `auto` picks by its rank, and serves the classifier; the registry
    refuses a name twice and options without their parser."""
    import shutil

    from conftest import TINY_BUNDLE
    from edgemeta.runtime.backends import Backend, backend_names, open_backend
    from edgemeta.runtime.backends.onnxruntime import open_onnxruntime
    from edgemeta.runtime.backends.registry import BACKEND_KINDS, BackendKind, BackendUnavailable, register_backend
    from edgemeta.runtime.bundle import load_bundle

    class Counting(Backend):
        name = "counting"

        def __init__(self, inner):
            super().__init__(inner.spec, inner.embedding_dim)
            self.inner, self.calls = inner, 0

        def _run(self, batch):
            self.calls += 1
            return self.inner._run(batch)

    wanted = {"on": False}

    def open_counting(bundle, request):
        if not wanted["on"]:
            raise BackendUnavailable("counting is switched off")
        return Counting(open_onnxruntime(bundle, request))

    def counting_runs_here(bundle, device):
        return {bundle.variant_file("fp32"): "yes — counting" if wanted["on"] else "no — switched off"}

    bundle = shutil.copytree(TINY_BUNDLE, tmp_path / "b")
    register_backend(BackendKind("counting", open_counting, "counts calls", auto_rank=-1, runs_here=counting_runs_here))
    try:
        assert set(backend_names()) == {"auto", "onnxruntime", "tensorrt", "counting"}
        with pytest.raises(ValueError, match="taken"):
            register_backend(BackendKind("counting", open_counting, "twice", runs_here=counting_runs_here))
        with pytest.raises(ValueError, match="options and parse_options go together"):
            register_backend(BackendKind("other", open_counting, "x", options="MODE", runs_here=counting_runs_here))
        with pytest.raises(ValueError, match="runs_here"):  # a backend must say what it runs here
            register_backend(BackendKind("mute", open_counting, "x"))
        from edgemeta.runtime.backends import runnable_here
        assert runnable_here(load_bundle(bundle))["embed.onnx"].startswith("yes — onnxruntime")  # one says yes
        with pytest.warns(RuntimeWarning, match="counting is switched off. Falling back to onnxruntime"):
            assert open_backend(load_bundle(bundle), "auto").name == "onnxruntime"
        wanted["on"] = True
        assert isinstance(open_backend(load_bundle(bundle), "auto"), Counting)  # rank -1: before TensorRT and ONNX Runtime
        clf = FewShotClassifier.load(bundle, store=tmp_path / "s", backend="counting")
        clf.enroll("a", tagalog[sorted(tagalog)[0]][:2])
        assert clf.backend.calls == 1 and clf.backend.graph == "fp32"
        files = [tmp_path / "q.png"]
        files[0].write_bytes(tagalog[sorted(tagalog)[0]][2])
        result = run_cli("predict", bundle, "--store", tmp_path / "s", "--backend", "counting", "--json", *files)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)[0]["label"] == "a"
    finally:
        BACKEND_KINDS.pop("counting")
    result = run_cli("predict", bundle, "--store", tmp_path / "s", "--backend", "counting", *files)
    assert result.exit_code == 2 and "backend must be auto or one of" in result.output


def test_every_backend_module_registers_itself_without_an_import_line():
    """The backends package imports every module of its folder: a backend module whose import line
    was forgotten used to register nothing, silently."""
    import pkgutil

    import edgemeta.runtime.backends as backends
    from edgemeta.runtime.backends.registry import BACKEND_KINDS
    modules = {m.name for m in pkgutil.iter_modules(backends.__path__)} - {"base", "registry", "ort_graph_cache"}
    registered = {kind.open.__module__.rsplit(".", 1)[-1] for kind in BACKEND_KINDS.values()}
    assert modules <= registered, modules - registered
