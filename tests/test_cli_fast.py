"""The device commands' fast path (edgemeta.cli.fast): the same options as typer's declarations,
read the same way, and everything it cannot read plainly left to typer."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_BUNDLE
from PIL import Image

from edgemeta.cli import device_actions, fast


def test_the_spec_file_is_the_typer_declarations():
    """device_commands.json is generated; a changed option must regenerate it."""
    from edgemeta.cli import register
    assert fast.describe(register(("device",))) == json.loads(fast.SPEC.read_text()), \
        "the device commands' options changed: run `python -m edgemeta.cli.fast` to regenerate device_commands.json"


PLAIN = [
    ["predict", "b", "x.png", "--store", "s"],
    ["predict", "b", "x.png", "y.jpg", "--store=s", "--top-k", "3", "--json", "--unknown", "auto"],
    ["predict", "--json", "b", "--head", "logistic", "x.png", "--variant", "int8", "--backend", "onnxruntime:cpu",
     "--no-reembed", "--store", "s"],
    ["predict", "b", "--store", "s", "--reembed", "--top-k=2", "--top-k", "4", "--", "-odd.png"],
    ["enroll", "b", "--store", "s", "--label", "mug", "a.png", "b.png", "--add"],
    ["enroll", "b", "--store", "s", "--from-folder", "photos", "--replace", "--backend", "auto"],
    ["forget", "b", "mug", "cup", "--store", "s"],
    ["classes", "--store", "s", "--json"],
]


@pytest.mark.parametrize("argv", PLAIN, ids=[" ".join(a) for a in PLAIN])
def test_the_fast_path_passes_what_typer_passes(argv, monkeypatch):
    from typer.testing import CliRunner

    from edgemeta.cli import register
    seen = []
    monkeypatch.setattr(device_actions, argv[0], lambda **kw: seen.append(kw))
    result = CliRunner().invoke(register(("device",)), argv)
    assert result.exit_code == 0, result.output
    assert fast.parse(json.loads(fast.SPEC.read_text())[argv[0]], argv[1:]) == seen[0]


LEFT_TO_TYPER = [
    ["predict", "--help"], ["predict", "b", "x.png", "--store", "s", "-h"],
    ["predict", "b", "--store", "s"],                      # no image
    ["predict", "b", "x.png", "--top-k", "0"],             # out of range
    ["predict", "b", "x.png", "--top-k", "two"],
    ["predict", "b", "x.png", "--variant", "int4"],
    ["predict", "b", "x.png", "--head", "knn"],
    ["predict", "b", "x.png", "--backend", "nope"],
    ["predict", "b", "x.png", "--store"],                   # a value missing
    ["predict", "b", "x.png", "--json=yes"],
    ["predict", "b", "x.png", "--colour", "L"],             # unknown option
    ["classes"],                                            # required option missing
    ["classes", "--store", "s", "extra"],                   # an argument it does not take
    ["forget", "b", "--store", "s"],
]


@pytest.mark.parametrize("argv", LEFT_TO_TYPER, ids=[" ".join(a) for a in LEFT_TO_TYPER])
def test_what_the_fast_path_cannot_read_plainly_is_left_to_typer(argv, monkeypatch):
    from typer.testing import CliRunner

    from edgemeta.cli import register
    assert fast.parse(json.loads(fast.SPEC.read_text())[argv[0]], argv[1:]) is None
    monkeypatch.setattr(device_actions, argv[0], lambda **kw: pytest.fail(f"typer ran {argv[0]} with {kw}"))
    result = CliRunner().invoke(register(("device",)), argv)
    assert "--help" in argv or result.exit_code == 2  # and typer answers: help, or one usage error


ENTRY_POINT = "import sys; sys.argv[0] = 'edgemeta'; from edgemeta.cli import main; main()"


def _python(script: str, *args, check: bool = False) -> subprocess.CompletedProcess:
    """`script` with `args` in a fresh Python process."""
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, check=check,
                          timeout=120)


def _edgemeta(*args, check=True):
    """The installed entry point's code path: edgemeta.cli.main in a fresh process."""
    return _python(ENTRY_POINT, *args, check=check)


@pytest.fixture
def one_png(tmp_path):
    """A 16×16 greyscale PNG."""
    image = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)).save(image)
    return image


def test_the_device_commands_end_to_end_through_the_fast_path(tmp_path, tagalog):
    """enroll, classes, predict, forget on real Omniglot characters in fresh processes (the way a
    shell loop runs them); errors are one line, exit status 2, and leave the store as it was."""
    names = sorted(tagalog)[:2]
    files = {}
    for name in names:
        files[name] = []
        for i, png in enumerate(tagalog[name][:4]):
            path = tmp_path / f"{name}-{i}.png"
            path.write_bytes(png)
            files[name].append(path)
    store = tmp_path / "store"
    for name in names:
        done = _edgemeta("enroll", TINY_BUNDLE, *files[name][:3], "--store", store, "--label", name)
        assert f"enrolled {name!r}: 3 shot(s)" in done.stdout
    assert json.loads(_edgemeta("classes", "--store", store, "--json").stdout)["classes"] == dict.fromkeys(names, 3)
    queries = [files[n][3] for n in names]
    rows = json.loads(_edgemeta("predict", TINY_BUNDLE, *queries, "--store", store, "--json", "--top-k", "2").stdout)
    assert [r["image"] for r in rows] == [str(q) for q in queries]
    assert all(len(r["top_k"]) == 2 and abs(sum(t["probability"] for t in r["top_k"]) - 1) < 1e-5 for r in rows)
    bad = _edgemeta("predict", TINY_BUNDLE, tmp_path / "missing.png", "--store", store, "--json", check=False)
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error:") and "missing.png" in bad.stderr
    refused = _edgemeta("forget", TINY_BUNDLE, names[0], "nope", "--store", store, check=False)
    assert refused.returncode == 2 and "'nope' is not enrolled" in refused.stderr
    assert json.loads(_edgemeta("classes", "--store", store, "--json").stdout)["classes"] == dict.fromkeys(names, 3)
    assert f"forgot {names[0]!r}" in _edgemeta("forget", TINY_BUNDLE, names[0], "--store", store).stdout
    assert list(json.loads(_edgemeta("classes", "--store", store, "--json").stdout)["classes"]) == [names[1]]


def test_ctrl_c_in_the_fast_path_is_one_line_and_exit_status_1(monkeypatch, capsys):
    def interrupted(**kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(device_actions, "classes", interrupted)
    with pytest.raises(SystemExit) as exc:
        fast.run(["classes", "--store", "s"])
    assert exc.value.code == 1 and capsys.readouterr().err.strip() == "error: aborted"


def test_a_finished_device_command_ends_the_process_with_its_output_and_exit_hooks(tmp_path, one_png):
    """The fast path ends the process when the command is done (no interpreter teardown): the JSON
    comes whole through a pipe, exit hooks run, the store is written, and nothing after main() runs."""
    script = ("import atexit, sys; sys.argv = ['edgemeta', *sys.argv[1:]]\n"
              "atexit.register(lambda: print('exit hook', file=sys.stderr))\n"
              "from edgemeta.cli import main\nmain()\nprint('after main')\n")
    enrolled = _python(script, "enroll", TINY_BUNDLE, one_png, "--store", tmp_path / "s", "--label", "a")
    assert (enrolled.returncode, enrolled.stderr) == (0, "exit hook\n") and "after main" not in enrolled.stdout
    done = _python(script, "predict", TINY_BUNDLE, one_png, one_png, "--store", tmp_path / "s", "--json")
    assert (done.returncode, done.stderr) == (0, "exit hook\n")
    assert [r["label"] for r in json.loads(done.stdout)] == ["a", "a"]  # the whole output, nothing after it
    # the caller that goes on in the same process
    kept = _python(script.replace("main()", "main(exit_when_done=False)"), "classes", "--store", tmp_path / "s")
    assert kept.returncode == 0 and kept.stdout.endswith("after main\n")


def test_the_quick_exit_leaves_a_running_thread_or_a_tracer_to_the_normal_exit():
    """A non-daemon thread still running, or a tracer (coverage saves at exit), keep the normal exit:
    exit_without_teardown returns and the process goes on."""
    thread = ("import threading\nfrom edgemeta.cli.fast import exit_without_teardown\n"
              "go = threading.Event(); t = threading.Thread(target=go.wait); t.start()\n"
              "exit_without_teardown(); print('went on'); go.set()\n")
    tracer = ("import sys\nfrom edgemeta.cli.fast import exit_without_teardown\n"
              "sys.settrace(lambda *a: None); exit_without_teardown(); sys.settrace(None); print('went on')\n")
    plain = "from edgemeta.cli.fast import exit_without_teardown\nexit_without_teardown(); print('went on')\n"
    assert _python(thread).stdout == "went on\n"
    assert _python(tracer).stdout == "went on\n"
    ended = _python(plain)
    assert (ended.returncode, ended.stdout) == (0, "")


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path, one_png):
    """`edgemeta predict … | head -1` where head has gone: no error line, exit status 141 (128 +
    SIGPIPE, as a shell reports for other tools), and the store as it was."""
    _edgemeta("enroll", TINY_BUNDLE, one_png, "--store", tmp_path / "s", "--label", "a")
    child = subprocess.Popen([sys.executable, "-c", ENTRY_POINT, "predict", TINY_BUNDLE, "--store", tmp_path / "s", "--json",
                              *[one_png] * 2000], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before the first line
    stderr = child.stderr.read()
    assert (child.wait(timeout=120), stderr) == (141, b"")
    assert json.loads(_edgemeta("classes", "--store", tmp_path / "s", "--json").stdout)["classes"] == {"a": 1}
