"""`edgemeta serve` against a real server process on 127.0.0.1 (uvicorn on a free port, started and
stopped here): every route and error status, auth, limits, predictions equal to the library's,
batched equal to unbatched, another process writing the same store, a clean SIGTERM, and a bounded
load test. The model is the shipped Omniglot checkpoint; the images are real drawings of an alphabet
(Tagalog) it never saw."""
from __future__ import annotations

import io
import os
import random
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from serve_helpers import Server

httpx = pytest.importorskip("httpx", reason="httpx is part of the dev install")
pytest.importorskip("fastapi", reason="edgemeta[serve] is part of the dev install")

from edgemeta.runtime import FewShotClassifier  # noqa: E402

KEY = "k3y-for-the-test-0123456789abcdef"


def png(width: int, height: int, value: int = 128) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), value).save(buf, format="PNG")
    return buf.getvalue()


def files(images: list[bytes]) -> list:
    return [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def chars(tagalog):
    return sorted(tagalog)[:5]


@pytest.fixture(scope="module")
def server(shipped_bundle, tmp_path_factory):
    """Limits small enough to test: 1 MiB bodies, 8 images a request, 1 MP images; the 2 ms batch
    window of a GPU backend (on this CPU the default is 0)."""
    store = tmp_path_factory.mktemp("serve") / "store"
    srv = Server(shipped_bundle, store, "--max-body-mb", "1", "--max-images", "8", "--batch-window-ms", "2",
                 env={"EDGEMETA_MAX_PIXELS": "1000000"})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def enrolled(client, chars, tagalog):
    """Five classes, five drawings each, enrolled over HTTP."""
    for c in chars:
        r = client.post(f"/v1/classes/{c}/images", files=files(tagalog[c][:5]))
        assert r.status_code == 201, r.text
        assert r.json()["shots"] == 5
    return chars


def test_predictions_equal_the_library_on_the_same_images(server, client, enrolled, tagalog, shipped_bundle):
    queries = [tagalog[c][i] for c in enrolled for i in (10, 15)]
    r = client.post("/v1/predict", params={"top_k": 3, "unknown": "auto"}, files=files(queries[:8]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["ms"]) == {"decode", "embed", "head", "total"} and body["ms"]["total"] > 0
    served = body["predictions"] + client.post("/v1/predict", params={"top_k": 3, "unknown": "auto"},
                                               files=files(queries[8:])).json()["predictions"]
    with FewShotClassifier.load(shipped_bundle, store=server.store) as clf:
        local = clf.predict(queries, top_k=3, reject="auto")
    assert [p["label"] for p in served] == local.labels
    for p, top, d in zip(served, local.top_k, local.distances):
        assert [t["label"] for t in p["top_k"]] == [name for name, _ in top]
        assert [t["probability"] for t in p["top_k"]] == pytest.approx([prob for _, prob in top], abs=1e-5)
        assert p["distance"] == pytest.approx(float(d), rel=1e-5)
    # the model recognises unseen drawings of the enrolled characters
    truth = [c for c in enrolled for _ in (10, 15)]
    assert np.mean([p["label"] == t for p, t in zip(served, truth)]) >= 0.8
    # one raw image/png body is one image
    raw = client.post("/v1/predict", params={"unknown": "auto"}, content=queries[0], headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["predictions"][0]["label"] == served[0]["label"]


def test_classes_model_health_and_the_page(client, enrolled):
    body = client.get("/v1/classes").json()
    assert body["classes"] == [{"label": c, "shots": 5} for c in enrolled] and body["head"] == "prototype"
    model = client.get("/v1/model").json()
    assert model["backbone"] == "conv4" and model["input"]["width"] == 28 and model["variant"] == "fp32"
    assert model["backend"]["backend"] == "onnxruntime" and model["head"]["kind"] == "prototype"
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    assert "http" not in client.get("/static/app.js").text.replace("https:// or localhost", "")  # nothing from elsewhere
    openapi = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/classes", "/v1/classes/{label}/images", "/v1/classes/{label}", "/v1/model"} <= set(openapi["paths"])
    assert "access-control-allow-origin" not in client.options("/v1/classes", headers={
        "origin": "http://evil.example", "access-control-request-method": "GET"}).headers  # no CORS by default


def test_enroll_modes_and_forget(server, client, tagalog, enrolled):
    c = enrolled[0]
    assert client.post(f"/v1/classes/{c}/images", params={"mode": "add"}, files=files(tagalog[c][5:7])).json()["shots"] == 7
    assert client.post(f"/v1/classes/{c}/images", params={"mode": "replace"}, files=files(tagalog[c][:5])).json()["shots"] == 5
    name = "a mug / with a slash"
    r = client.post(f"/v1/classes/{name}/images", files=files(tagalog[c][7:9]))
    assert r.status_code == 201 and r.json()["label"] == name
    assert name in [x["label"] for x in client.get("/v1/classes").json()["classes"]]
    r = client.delete(f"/v1/classes/{name}")
    assert r.status_code == 200 and r.json() == {"forgotten": name, "classes": len(enrolled)}
    # a label is never a path: "../escape" is a label like any other, its images named by their sha256
    before = set(server.store.parent.iterdir())
    r = client.post("/v1/classes/..%2F..%2Fescape/images", files=files(tagalog[c][9:11]))
    assert r.status_code == 201 and r.json()["label"] == "../../escape"
    assert set(server.store.parent.iterdir()) == before and not list(server.store.rglob("*escape*"))
    assert client.delete("/v1/classes/..%2F..%2Fescape").status_code == 200


@pytest.mark.parametrize("case, status", [
    ("bad image", 400), ("bad label", 400), ("long label", 400), ("reserved label", 400), ("bad mode", 400),
    ("no images", 400), ("wrong content type", 400), ("bad unknown", 400), ("top_k 0", 400),
    ("unknown class", 404), ("label exists", 409),
    ("body too large", 413), ("too many images", 413), ("too many pixels", 413),
])
def test_error_statuses(client, enrolled, tagalog, case, status):
    good = tagalog[enrolled[0]][0]
    before = client.get("/v1/classes").json()
    send = {
        "bad image": lambda: client.post("/v1/predict", files=files([b"not an image"])),
        "bad label": lambda: client.post("/v1/classes/bad%01label/images", files=files([good])),
        "long label": lambda: client.post(f"/v1/classes/{'x' * 200}/images", files=files([good])),
        "reserved label": lambda: client.post("/v1/classes/unknown/images", files=files([good])),
        "bad mode": lambda: client.post("/v1/classes/new-one/images", params={"mode": "merge"}, files=files([good])),
        "no images": lambda: client.post("/v1/predict", files={"note": (None, "text only")}),
        "wrong content type": lambda: client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"}),
        "bad unknown": lambda: client.post("/v1/predict", params={"unknown": "far"}, files=files([good])),
        "top_k 0": lambda: client.post("/v1/predict", params={"top_k": 0}, files=files([good])),
        "unknown class": lambda: client.delete("/v1/classes/never-enrolled"),
        "label exists": lambda: client.post(f"/v1/classes/{enrolled[1]}/images", files=files([good])),
        "body too large": lambda: client.post("/v1/predict", content=os.urandom(1_200_000), headers={"content-type": "image/png"}),
        "too many images": lambda: client.post("/v1/predict", files=files([good] * 9)),
        "too many pixels": lambda: client.post("/v1/predict", files=files([png(1200, 1000)])),
    }[case]
    r = send()
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]
    assert client.get("/v1/classes").json() == before  # nothing changed


def test_metrics_count_routes_stages_and_batches(client, enrolled, tagalog):
    client.post("/v1/predict", files=files([tagalog[enrolled[0]][12]]))
    text = client.get("/metrics").text
    assert 'edgemeta_http_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'edgemeta_http_requests_total{method="POST",route="/v1/classes/{label:path}/images",status="201"}' in text
    for stage in ("decode", "embed", "head"):
        assert f'edgemeta_stage_seconds_count{{stage="{stage}"}}' in text
    assert f"edgemeta_enrolled_classes {float(len(enrolled))}" in text
    assert "edgemeta_embed_batch_images_count" in text and 'edgemeta_http_request_seconds_bucket{le="0.005",route="/v1/predict"}' in text


def test_concurrent_requests_are_batched_and_equal_to_alone(server, client, enrolled, tagalog, shipped_bundle):
    queries = [tagalog[c][i] for c in enrolled for i in range(8, 20)]  # 60 images, one per request
    def batches() -> tuple[float, float]:
        lines = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines() if line.startswith("edgemeta_embed_batch_images_"))
        return float(lines["edgemeta_embed_batch_images_count"]), float(lines["edgemeta_embed_batch_images_sum"])
    calls0, images0 = batches()
    barrier = threading.Barrier(16)

    def one(i: int) -> dict:
        if i < 16:
            barrier.wait()
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/v1/predict", params={"top_k": 2}, files=files([queries[i]]))
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]
    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(one, range(len(queries))))
    calls1, images1 = batches()
    assert images1 - images0 == len(queries)
    assert calls1 - calls0 < len(queries)  # some requests shared a backend call
    with FewShotClassifier.load(shipped_bundle, store=server.store) as clf:
        alone = [clf.predict([q], top_k=2) for q in queries]
    for p, a in zip(served, alone):
        assert p["label"] == a.labels[0]
        assert p["distance"] == pytest.approx(float(a.distances[0]), rel=1e-5, abs=1e-6)
        assert [t["probability"] for t in p["top_k"]] == pytest.approx([prob for _, prob in a.top_k[0]], abs=1e-5)


def test_another_process_enrolling_the_same_store_is_seen(server, client, enrolled, tagalog, tmp_path, shipped_bundle):
    c = sorted(tagalog)[6]
    paths = []
    for i, data in enumerate(tagalog[c][:5]):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(data)
    r = run_cli("enroll", shipped_bundle, "--store", server.store, "--label", "from-the-cli", *paths)
    assert r.exit_code == 0, r.output
    assert {"label": "from-the-cli", "shots": 5} in client.get("/v1/classes").json()["classes"]
    pred = client.post("/v1/predict", files=files([tagalog[c][15]])).json()["predictions"][0]
    assert pred["label"] == "from-the-cli"
    assert client.delete("/v1/classes/from-the-cli").status_code == 200
    r = run_cli("classes", shipped_bundle, "--store", server.store, "--json")
    assert "from-the-cli" not in r.stdout


def test_api_key_required_when_set(shipped_bundle, tmp_path, tagalog):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    srv = Server(shipped_bundle, tmp_path / "store", "--api-key-file", str(key_file), "--max-batch", "1")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            image = files([tagalog[sorted(tagalog)[0]][0]])
            assert c.get("/v1/classes").status_code == 401
            assert c.get("/v1/classes", headers={"x-api-key": KEY[:-1] + "X"}).status_code == 401
            assert c.post("/v1/classes/a/images", files=image).json() == {"error": "missing API key: send it in the x-api-key header"}
            assert c.get("/metrics").status_code == 401
            assert c.get("/v2/health/ready").status_code == 200 and c.get("/").status_code == 200  # probes and the page need no key
            ok = {"x-api-key": KEY}
            assert c.post("/v1/predict", headers=ok, files=image).status_code == 409  # nothing enrolled yet
            assert c.post("/v1/classes/a/images", headers=ok, files=image).status_code == 201
            assert c.get("/v1/classes", headers=ok).json()["classes"] == [{"label": "a", "shots": 1}]
            backend = c.get("/v1/model", headers=ok).json()["backend"]
            assert backend["max_batch"] == 1 and backend["batch_window_ms"] == 0.0  # a CPU backend waits for no one
    finally:
        assert srv.stop() == 0


def test_refuses_to_start_unsafely(shipped_bundle, tmp_path):
    r = run_cli("serve", shipped_bundle, "--store", tmp_path / "s", "--host", "0.0.0.0")
    assert r.exit_code == 2 and "without an API key" in r.output and len(r.output.strip().splitlines()) == 1
    loose = tmp_path / "key"
    loose.write_text(KEY)
    loose.chmod(0o644)
    r = run_cli("serve", shipped_bundle, "--store", tmp_path / "s", "--api-key-file", loose)
    assert r.exit_code == 2 and "chmod 600" in r.output
    short = tmp_path / "short"
    short.write_text("abc")
    short.chmod(0o600)
    r = run_cli("serve", shipped_bundle, "--store", tmp_path / "s", "--api-key-file", short)
    assert r.exit_code == 2 and "16–" in r.output
    r = run_cli("serve", shipped_bundle, "--store", tmp_path / "s", "--ssl-certfile", loose)
    assert r.exit_code == 2 and "--ssl-keyfile" in r.output
    r = run_cli("serve", shipped_bundle, "--store", tmp_path / "s", "--max-batch", "0")
    assert r.exit_code == 2 and "--max-batch" in r.output
    with __import__("socket").socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_cli("serve", shipped_bundle, "--store", tmp_path / "s", "--port", str(busy.getsockname()[1]))
    assert r.exit_code == 2 and "in use" in r.output
    assert not (tmp_path / "s").exists()


def test_https_with_a_certificate(shipped_bundle, tmp_path, tagalog):
    """--ssl-certfile/--ssl-keyfile: the service speaks HTTPS (what a phone's browser needs for the camera)."""
    import shutil
    import ssl
    import subprocess
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key),
                    "-out", str(cert), "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = Server(shipped_bundle, tmp_path / "store", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    try:
        assert srv.url.startswith("https://")
        with httpx.Client(base_url=srv.url, timeout=30, verify=ssl.create_default_context(cafile=str(cert))) as c:  # verified against our certificate
            assert c.post("/v1/classes/a/images", files=files(tagalog[sorted(tagalog)[0]][:2])).status_code == 201
            assert c.get("/v1/classes").json()["classes"] == [{"label": "a", "shots": 2}]
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url.replace("https", "http") + "/v2/health/live", timeout=5)  # no plain HTTP on that port
    finally:
        assert srv.stop() == 0


def test_sigterm_finishes_requests_in_flight_and_keeps_the_store(shipped_bundle, tmp_path, tagalog):
    srv = Server(shipped_bundle, tmp_path / "store")
    chars = sorted(tagalog)[:4]
    results: dict[str, int | str] = {}
    started = threading.Barrier(len(chars) + 1)

    def enroll(c: str) -> None:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            client.get("/v2/health/live")  # connected before the signal
            started.wait()
            try:
                results[c] = client.post(f"/v1/classes/{c}/images", files=files(tagalog[c][:10])).status_code
            except httpx.HTTPError as exc:  # not accepted once the server is shutting down
                results[c] = type(exc).__name__
    threads = [threading.Thread(target=enroll, args=(c,)) for c in chars]
    for t in threads:
        t.start()
    started.wait()
    threading.Event().wait(0.01)
    assert srv.stop(signal.SIGTERM) == 0  # a clean exit
    for t in threads:
        t.join()
    done = [c for c, status in results.items() if status == 201]
    assert done, results  # requests in flight at the signal finished
    assert all(status == 201 or isinstance(status, str) for status in results.values()), results  # no 5xx
    with FewShotClassifier.load(shipped_bundle, store=tmp_path / "store") as clf:
        assert set(done) <= set(clf.classes)  # every enrollment answered 201 is on disk
        assert all(n == 10 for n in clf.shots().values())  # and none is torn


def test_load_mixed_predict_enroll_forget(shipped_bundle, tmp_path, tagalog):
    """16 clients × 200 requests: 80% predict, 10% enroll, 10% forget, each client on its own labels."""
    srv = Server(shipped_bundle, tmp_path / "store")
    chars = sorted(tagalog)
    statuses: list[int] = []
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/v1/classes/base/images", files=files(tagalog[chars[0]][:5])).status_code == 201

        def client_run(k: int) -> set[str]:
            rng = random.Random(k)
            mine: set[str] = set()
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                for i in range(200):
                    roll = rng.random()
                    char = chars[rng.randrange(1, len(chars))]
                    if roll < 0.1:
                        label = f"c{k}-{i}"
                        r = c.post(f"/v1/classes/{label}/images", files=files(tagalog[char][:2]))
                        if r.status_code == 201:
                            mine.add(label)
                    elif roll < 0.2 and mine:
                        label = sorted(mine)[rng.randrange(len(mine))]
                        r = c.delete(f"/v1/classes/{label}")
                        if r.status_code == 200:
                            mine.discard(label)
                    else:
                        r = c.post("/v1/predict", params={"top_k": 3, "unknown": "auto"}, files=files([tagalog[char][rng.randrange(20)]]))
                    statuses.append(r.status_code)
            return mine
        with ThreadPoolExecutor(16) as pool:
            expected = set().union(*pool.map(client_run, range(16))) | {"base"}
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            served = {x["label"] for x in c.get("/v1/classes").json()["classes"]}
    finally:
        assert srv.stop() == 0
    assert len(statuses) == 16 * 200
    assert not [s for s in statuses if s >= 500]
    assert set(statuses) <= {200, 201}
    assert served == expected  # no class lost, none resurrected
    with FewShotClassifier.load(shipped_bundle, store=tmp_path / "store") as clf:
        assert set(clf.classes) == expected
