"""`edgemeta data` with no internet: a local HTTP server on 127.0.0.1 serves small archives built
from shipped data under the real file names (Omniglot's two zips, a CIFAR-100 python archive).
fetch downloads, resumes an interrupted transfer, verifies, refuses a corrupted or wrong file
(nothing left that looks complete), takes --from FILE; verify catches a modified file; a shipped
config then trains from the fetched data without being edited."""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import threading
import time
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import OMNIGLOT, ROOT, run_cli
from edgemeta.runtime.errors import ConfigError, DataError
from PIL import Image

from edgemeta.data.catalog import CATALOG, parse_name
from edgemeta.data.fetch import fetch, verify


class Files(BaseHTTPRequestHandler):
    """GET /NAME with Range support; a name in `cut` is sent half, then the connection drops (once)."""

    files: dict[str, bytes] = {}
    cut: set[str] = set()
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        name = self.path.lstrip("/")
        self.requests.append((name, self.headers.get("Range")))
        if name.startswith("drip/"):  # a mirror sending a byte every 50 ms, for ever
            self.send_response(200)
            self.end_headers()
            for _ in range(2000):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.05)
            return
        if name.startswith("endless/"):  # no Content-Length, and far more than the file
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(bytes(1 << 20))
            except OSError:
                pass
            self.close_connection = True
            return
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        body = data[start:]
        if name in self.cut:
            self.cut.discard(name)
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def omniglot_archives() -> dict[str, bytes]:
    """images_background.zip / images_evaluation.zip in the official layout, from the shipped slices."""
    out = {}
    for name, source in (("images_background.zip", OMNIGLOT[0]), ("images_evaluation.zip", OMNIGLOT[1])):
        out[name] = source.read_bytes()
    return out


def cifar100_archive(per_class: int = 16) -> bytes:
    """cifar-100-python.tar.gz in CIFAR's own format (pickled dicts of uint8 arrays), with the 80
    CIFAR-FS class names, drawn from shipped Omniglot drawings."""
    import json
    split = json.loads((ROOT / "data/splits/cifar-fs.json").read_text())
    names = sorted(split["train"] + split["val"] + split["test"])
    drawings = []
    with zipfile.ZipFile(OMNIGLOT[1]) as z:
        for n in sorted(z.namelist()):
            if n.endswith(".png"):
                drawings.append(np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB").resize((32, 32))))
            if len(drawings) == 100 * per_class:
                break
    images = np.stack(drawings).transpose(0, 3, 1, 2).reshape(len(drawings), -1)
    labels = np.repeat(np.arange(100), per_class)
    train = {"data": images[::2].copy(), "fine_labels": labels[::2].tolist()}
    test = {"data": images[1::2].copy(), "fine_labels": labels[1::2].tolist()}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, obj in (("meta", {"fine_label_names": names}), ("train", train), ("test", test)):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(server):
    Files.files = {**omniglot_archives(), "cifar-100-python.tar.gz": cifar100_archive()}
    return server


def catalog_for(server: str) -> dict:
    """The real catalog with the served copies' URLs and checksums (their content differs from the official files)."""
    def local(f):
        return replace(f, urls=(f"{server}/{f.name}",), md5=hashlib.md5(Files.files[f.name]).hexdigest(), size=None)
    return {name: replace(d, files=tuple(local(f) for f in d.files)) for name, d in CATALOG.items() if name != "tiny-imagenet"}


def test_fetch_downloads_resumes_verifies_and_skips_what_is_verified(served, tmp_path):
    catalog = catalog_for(served)
    Files.cut = {"images_background.zip"}
    Files.requests = []
    with pytest.raises(DataError, match="stopped after .* run the same command again to resume"):
        fetch("omniglot", tmp_path, catalog=catalog)
    target = tmp_path / "omniglot/images_background.zip"
    part = target.with_name(target.name + ".part")
    half = part.stat().st_size
    assert not target.exists() and 0 < half < len(Files.files["images_background.zip"])
    parts = fetch("omniglot", tmp_path, catalog=catalog)  # resumes where it stopped
    assert [rng for name, rng in Files.requests if name == "images_background.zip"] == [None, f"bytes={half}-"]
    assert target.read_bytes() == Files.files["images_background.zip"] and not part.exists()
    assert parts == {"background": target, "evaluation": tmp_path / "omniglot/images_evaluation.zip"}
    assert verify("omniglot", tmp_path, catalog) == []
    Files.requests = []
    fetch("omniglot", tmp_path, catalog=catalog)
    assert Files.requests == []  # already verified: nothing downloaded again
    r = run_cli("data", "path", "omniglot:evaluation", "--root", tmp_path)
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "omniglot/images_evaluation.zip")


def test_a_corrupted_download_is_refused_and_nothing_looks_complete(served, tmp_path):
    catalog = catalog_for(served)
    bad = {k: replace(d, files=tuple(replace(f, md5="0" * 32) for f in d.files)) for k, d in catalog.items()}
    with pytest.raises(DataError, match="not the expected file .*md5.* nothing was installed"):
        fetch("omniglot", tmp_path, catalog=bad)
    assert not list((tmp_path / "omniglot").iterdir())  # no file, no .part
    # the real table against the served copies (a mirror with the wrong files): refused the same way, via the CLI
    r = run_cli("data", "fetch", "omniglot", "--root", tmp_path / "real", "--mirror", served)
    assert r.exit_code == 2 and "not the expected file" in r.output and "68d2efa1b9178cc56df9314c21c6e718" in r.output
    assert not any(p.is_file() for p in (tmp_path / "real").rglob("*.zip*"))


def test_unreachable_urls_say_how_to_place_the_file_by_hand(tmp_path):
    dead = {"omniglot": replace(CATALOG["omniglot"], files=tuple(replace(f, urls=("http://127.0.0.1:9/" + f.name,))
                                                                  for f in CATALOG["omniglot"].files))}
    with pytest.raises(DataError, match=r"could not download images_background.zip: http://127.0.0.1:9/.*--from images_background.zip.*md5 68d2"):
        fetch("omniglot", tmp_path, catalog=dead, timeout=2)


def test_from_file_verifies_what_the_user_brought(served, tmp_path):
    catalog = catalog_for(served)
    brought = tmp_path / "downloads-by-hand"
    brought.mkdir()
    for name, data in Files.files.items():
        (brought / name).write_bytes(data)
    Files.requests = []
    fetch("omniglot", tmp_path / "root", from_files=(brought / "images_background.zip", brought / "images_evaluation.zip"), catalog=catalog)
    assert Files.requests == [] and verify("omniglot", tmp_path / "root", catalog) == []
    (brought / "wrong.zip").write_bytes(b"PK not really")
    with pytest.raises(DataError, match="not the expected file"):
        fetch("cifar-fs", tmp_path / "root", from_files=(brought / "wrong.zip",), catalog=catalog)
    assert not (tmp_path / "root/downloads/cifar-100-python.tar.gz").exists()


def test_verify_catches_a_modified_file(served, tmp_path):
    catalog = catalog_for(served)
    fetch("omniglot", tmp_path, catalog=catalog)
    with open(tmp_path / "omniglot/images_evaluation.zip", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    problems = verify("omniglot", tmp_path, catalog)
    assert len(problems) == 1 and "images_evaluation.zip" in problems[0] and "md5" in problems[0]
    r = run_cli("data", "verify", "omniglot", "--root", tmp_path)
    assert r.exit_code == 2 and "images_evaluation.zip" in r.output


def test_terms_names_and_parts_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="--accept-terms"):
        fetch("tiny-imagenet", tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet21k'"):
        parse_name("imagenet21k")
    with pytest.raises(ConfigError, match="no part 'test'"):
        parse_name("omniglot:test")
    r = run_cli("data", "path", "cifar-fs", "--root", tmp_path)
    assert r.exit_code == 2 and "edgemeta data fetch cifar-fs" in r.output
    r = run_cli("data", "list", "--root", tmp_path)
    assert r.exit_code == 0 and "omniglot:evaluation" in r.output and "tiny-imagenet" in r.output


def test_cifar_fs_is_built_and_a_shipped_config_trains_from_it_unedited(served, tmp_path, monkeypatch):
    root = tmp_path / "data"
    parts = fetch("cifar-fs", root, catalog=catalog_for(served))
    with zipfile.ZipFile(parts["all"]) as z:
        names = z.namelist()
    classes = {split: {n.split("/")[2] for n in names if n.startswith(f"cifar-fs/{split}/")} for split in ("train", "val", "test")}
    assert [len(classes[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert not (classes["train"] & classes["val"]) and not (classes["test"] & (classes["train"] | classes["val"]))
    assert sum(n.endswith(".png") for n in names) == 100 * 16
    assert verify("cifar-fs", root, catalog_for(served)) == []
    monkeypatch.setenv("EDGEMETA_DATA", str(root))
    monkeypatch.chdir(ROOT)
    r = run_cli("train", "--config", "configs/cifarfs-conv4-pretrain.toml", "--episodes", "4", "--val-every", "4",
                "--val-episodes", "3", "--batch-size", "16", "--out", tmp_path / "run", "--quiet")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run/last.safetensors").is_file()


def test_a_config_naming_a_dataset_that_is_not_fetched_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMETA_DATA", str(tmp_path))
    monkeypatch.chdir(ROOT)
    r = run_cli("train", "--config", "configs/omniglot-conv4-protonet.toml", "--episodes", "1", "--out", tmp_path / "run", "--quiet")
    assert r.exit_code == 2 and "edgemeta data fetch omniglot" in r.output
    assert not (tmp_path / "run").exists()


def test_the_pickle_reader_refuses_code(tmp_path):
    from edgemeta.data.builders import build_cifar_fs

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = pickle.dumps({"fine_label_names": Evil()})
        info = tarfile.TarInfo("cifar-100-python/meta")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "c.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="refusing to load"):
        build_cifar_fs(tmp_path / "c.tar.gz", tmp_path / "out.zip", [], [], [])
    assert not (tmp_path / "out.zip").exists()


def test_tiny_imagenet_is_rebuilt_in_our_layout(tmp_path):
    """The official layout (train/<wnid>/images/<wnid>_<i>.JPEG, val/images + val_annotations.txt) →
    tiny-imagenet-fs/<wnid>/… with the 100 train and the class's validation images, bytes unchanged."""
    from edgemeta.data.builders import build_tiny_imagenet_fs
    with zipfile.ZipFile(OMNIGLOT[0]) as z:
        drawing = z.read(sorted(n for n in z.namelist() if n.endswith(".png"))[0])
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(drawing)).convert("RGB").resize((64, 64)).save(jpeg, format="JPEG")
    names = {"n01443537": "goldfish", "n01629819": "salamander"}
    with zipfile.ZipFile(tmp_path / "tiny-imagenet-200.zip", "w") as z:
        for wnid in [*names, "n09999999"]:
            for i in range(100):
                z.writestr(f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{i}.JPEG", jpeg.getvalue())
        lines = []
        for k in range(6):
            wnid = [*names, "n09999999"][k % 3]
            z.writestr(f"tiny-imagenet-200/val/images/val_{k}.JPEG", jpeg.getvalue())
            lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
        z.writestr("tiny-imagenet-200/val/val_annotations.txt", "\n".join(lines) + "\n")
    assert build_tiny_imagenet_fs(tmp_path / "tiny-imagenet-200.zip", tmp_path / "out.zip", names) == 2 * 102
    with zipfile.ZipFile(tmp_path / "out.zip") as z:
        listing = z.namelist()
        assert z.read("tiny-imagenet-fs/classes.tsv").decode() == "n01443537\tgoldfish\nn01629819\tsalamander\n"
        assert z.read("tiny-imagenet-fs/n01629819/val_1.JPEG") == jpeg.getvalue()
    assert sum(n.startswith("tiny-imagenet-fs/n01443537/") for n in listing) == 102 and not any("n09999999" in n for n in listing)
    with pytest.raises(DataError, match="lacks"):
        build_tiny_imagenet_fs(tmp_path / "tiny-imagenet-200.zip", tmp_path / "bad.zip", {"n00000001": "nothing"})
    assert not (tmp_path / "bad.zip").exists()


def test_pins_win_over_a_forged_ledger(served, tmp_path):
    """Edit the downloaded file and write its new digests into the ledger: fetch must not take it."""
    import json
    catalog = catalog_for(served)
    fetch("omniglot", tmp_path, catalog=catalog)
    target = tmp_path / "omniglot/images_evaluation.zip"
    forged = b"PK forged content"
    target.write_bytes(forged)
    ledger_path = tmp_path / ".edgemeta-data.json"
    ledger = json.loads(ledger_path.read_text())
    ledger["omniglot/images_evaluation.zip"].update(size=len(forged), sha256=hashlib.sha256(forged).hexdigest(),
                                                     md5=catalog["omniglot"].files[1].md5)
    ledger_path.write_text(json.dumps(ledger))
    Files.requests = []
    fetch("omniglot", tmp_path, catalog=catalog)
    assert ("images_evaluation.zip", None) in Files.requests            # fetched again: the pin decided
    assert target.read_bytes() == Files.files["images_evaluation.zip"]


def test_a_dripping_mirror_is_cut_off_and_an_endless_one_capped(served, tmp_path):
    import edgemeta.data.fetch as fetch_module
    one = CATALOG["omniglot"].files[0]
    drip = {"omniglot": replace(CATALOG["omniglot"], files=(replace(one, urls=(f"{served}/drip/{one.name}",)),))}
    with pytest.raises(DataError, match="under 10,000 B/s after"):
        fetch("omniglot", tmp_path / "a", catalog=drip, timeout=1)
    part = next((tmp_path / "a").rglob("*.part"))
    assert part.stat().st_size < 500        # cut off after about a second, not after the whole 2,000-byte drip
    endless = {"omniglot": replace(CATALOG["omniglot"], files=(replace(one, urls=(f"{served}/endless/{one.name}",),
                                                                       size=3 << 20),))}
    with pytest.raises(DataError, match="more than the file's 3,145,728 bytes"):
        fetch("omniglot", tmp_path / "b", catalog=endless)
    assert not list((tmp_path / "b").rglob("*.part"))
    assert fetch_module.MIN_RATE == 10_000


def test_disk_full_during_a_download_says_so_and_leaves_no_part(served, tmp_path, monkeypatch):
    import builtins
    import errno
    catalog = catalog_for(served)
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if str(path).endswith(".part") and "b" in mode and ("a" in mode or "w" in mode) else f
    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(DataError, match="No space left on device; the partial file was removed. Free space"):
        fetch("omniglot", tmp_path, catalog=catalog)
    assert not list(tmp_path.rglob("*.part"))


def test_a_wrong_file_is_refused_on_its_size_before_hashing_and_timeouts_are_bounded(tmp_path):
    """A 5 GB file passed to `data fetch --from` was hashed for 49 s before the pinned size refused
    it; `--timeout nan/0/-1/inf` were accepted."""
    from conftest import run_cli
    wrong = tmp_path / "tiny-imagenet-200.zip"
    with open(wrong, "wb") as f:
        f.truncate(5 << 30)          # sparse: 5 GB that costs nothing to make, and would cost a minute to hash
    import time
    t0 = time.monotonic()
    r = run_cli("data", "fetch", "tiny-imagenet", "--accept-terms", "--from", wrong, "--root", tmp_path / "root")
    assert r.exit_code == 2 and "not the right file" in r.output and time.monotonic() - t0 < 5, r.output
    for bad in ("nan", "0", "-1", "inf"):
        r = run_cli("data", "fetch", "omniglot", "--timeout", bad, "--root", tmp_path / "root")
        assert r.exit_code == 2 and "--timeout must be" in r.output, (bad, r.output)
