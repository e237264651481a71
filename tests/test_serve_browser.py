"""The web page of `edgemeta serve` in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by Selenium) whose camera is a fake device playing a .y4m video built here
from shipped Omniglot drawings. Two browsers, each "looking at" a different character, enroll a class
from the camera; each then shows its own class as the live prediction; one class is forgotten from
the page and one enrolled from uploaded photos. Screenshots go to build/screenshots/ (EDGEMETA_SCREENSHOTS overrides) for a person to look at.

`.ci/run` installs Chromium, so CI runs this for real; elsewhere it is skipped, saying what to install."""
from __future__ import annotations

import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import Server

pytest.importorskip("fastapi", reason="edgemeta[serve] is part of the dev install")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is part of the dev install")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; .ci/run does)")
ROOT = Path(__file__).resolve().parent.parent
SIDE = 240
FRAMES = 30


def write_y4m(path: Path, drawing: bytes) -> None:
    """A 240×240 4:2:0 clip of one drawing held up to a camera: it drifts and turns a little from
    frame to frame, on a slightly uneven white."""
    ink = Image.open(io.BytesIO(drawing)).convert("L").resize((180, 180), Image.Resampling.LANCZOS)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{SIDE} H{SIDE} F10:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(FRAMES):
            angle = 6 * math.sin(2 * math.pi * i / FRAMES)
            turned = ink.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=255)
            frame = Image.new("L", (SIDE, SIDE), 255)
            frame.paste(turned, (30 + round(6 * math.cos(2 * math.pi * i / FRAMES)), 30 + round(4 * math.sin(4 * math.pi * i / FRAMES))))
            grey = np.clip(np.asarray(frame, np.float32) - 12 + rng.normal(0, 3, (SIDE, SIDE)), 0, 255).astype(np.uint8)
            ycbcr = Image.fromarray(grey).convert("RGB").convert("YCbCr")
            y, cb, cr = ycbcr.split()
            f.write(b"FRAME\n" + y.tobytes() + cb.resize((SIDE // 2, SIDE // 2)).tobytes() + cr.resize((SIDE // 2, SIDE // 2)).tobytes())


def browser(y4m: Path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,960",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-video-capture={y4m}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for(driver, condition, what: str, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except Exception:
        shot = screenshots() / f"failed-{what.replace(' ', '-')}.png"
        driver.save_screenshot(str(shot))
        raise AssertionError(f"timed out waiting for {what}; page text: {driver.find_element('tag name', 'body').text!r}; screenshot {shot}") from None


def screenshots() -> Path:
    folder = Path(os.environ.get("EDGEMETA_SCREENSHOTS", ROOT / "build" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def classes_on_page(driver) -> dict[str, str]:
    """Read in one script call: the list is re-rendered every few seconds."""
    return driver.execute_script("return Object.fromEntries([...document.querySelectorAll('#classes li[data-label]')]"
                                 ".map(li => [li.dataset.label, li.querySelector('.shots').textContent]))")


def enroll_from_camera(driver, url: str, label: str) -> None:
    driver.get(url)
    wait_for(driver, lambda d: d.execute_script("return document.getElementById('video').videoWidth") > 0, "the camera")
    assert driver.execute_script("return document.getElementById('video').videoWidth") == SIDE  # frames come from our clip
    field = driver.find_element("id", "label")
    field.clear()
    field.send_keys(label)
    driver.execute_script("document.getElementById('shots').value = 4; document.getElementById('spacing').value = 250;")
    driver.find_element("id", "enroll-camera").click()
    wait_for(driver, lambda d: classes_on_page(d).get(label) == "4 shots", f"{label} enrolled")


def test_enroll_two_classes_from_the_camera_predict_live_and_forget(shipped_bundle, tagalog, tmp_path):
    import httpx
    chars = sorted(tagalog)
    clips = {}
    for name, char in (("alpha", chars[0]), ("beta", chars[3])):
        clips[name] = tmp_path / f"{name}.y4m"
        write_y4m(clips[name], tagalog[char][0])
    srv = Server(shipped_bundle, tmp_path / "store")
    drivers = {}
    try:
        drivers["alpha"] = browser(clips["alpha"])
        enroll_from_camera(drivers["alpha"], srv.url, "alpha")
        # four frames of a still drawing: the feedback beside the form says they are near-duplicates,
        # and the class list shows the same advice
        wait_for(drivers["alpha"], lambda d: "nearly the same picture" in text(d, "feedback"), "duplicate-shot feedback")
        wait_for(drivers["alpha"], lambda d: "nearly the same picture" in
                 d.find_element("css selector", "#classes li[data-label='alpha']").text, "advice in the class list")
        drivers["beta"] = browser(clips["beta"])
        enroll_from_camera(drivers["beta"], srv.url, "beta")
        for name, driver in drivers.items():  # each camera is recognised as its own class, live
            wait_for(driver, lambda d, name=name: text(d, "live-label") == name, f"live prediction {name}")
            wait_for(driver, lambda d: set(classes_on_page(d)) == {"alpha", "beta"}, "both classes listed")
            assert text(driver, "ms-embed").endswith("ms") and text(driver, "ms-rtt").endswith("ms")
            top = driver.execute_script("return [...document.querySelectorAll('#top li .name')].map(e => e.textContent)")
            assert top[:1] == [name] and len(top) == 2
            driver.save_screenshot(str(screenshots() / f"serve-page-{name}.png"))
        assert text(drivers["alpha"], "health") == "ready" and "conv4" in text(drivers["alpha"], "model")
        # corrections from beta's page, where its camera shows beta: "none of these" keeps the frame
        # as a negative example; "it is alpha" adds the frame to alpha
        beta = drivers["beta"]
        beta.find_element("id", "correct-none").click()
        wait_for(beta, lambda d: "kept as a negative example" in text(d, "message"), "a negative kept")
        assert len(httpx.get(srv.url + "/v1/negatives").json()["negatives"]) == 1
        wait_for(beta, lambda d: text(d, "negatives").startswith("1 negative example"), "negatives shown")
        beta.execute_script("document.getElementById('correct-is').value = 'alpha'")
        beta.find_element("id", "correct-is-button").click()
        wait_for(beta, lambda d: classes_on_page(d).get("alpha") == "5 shots", "a frame added to alpha")
        beta.save_screenshot(str(screenshots() / "serve-page-corrections.png"))
        # forget beta from alpha's page: the first click only asks, the second forgets
        button = "#classes li[data-label='beta'] button"
        drivers["alpha"].find_element("css selector", button).click()
        wait_for(drivers["alpha"], lambda d: d.find_element("css selector", button).text == "forget “beta”?", "forget asks")
        assert set(classes_on_page(drivers["alpha"])) == {"alpha", "beta"}
        drivers["alpha"].find_element("css selector", button).click()
        wait_for(drivers["alpha"], lambda d: set(classes_on_page(d)) == {"alpha"}, "beta forgotten")
        assert "forgot" in text(drivers["alpha"], "message")
        assert [c["label"] for c in httpx.get(srv.url + "/v1/classes").json()["classes"]] == ["alpha"]
        # enroll from uploaded photos
        uploads = []
        for i, data in enumerate(tagalog[chars[6]][:3]):
            uploads.append(tmp_path / f"gamma-{i}.png")
            uploads[-1].write_bytes(data)
        field = drivers["alpha"].find_element("id", "label")
        field.clear()
        field.send_keys("gamma")
        drivers["alpha"].find_element("id", "upload").send_keys("\n".join(str(p) for p in uploads))
        wait_for(drivers["alpha"], lambda d: classes_on_page(d).get("gamma") == "3 shots", "gamma uploaded")
        # the phone-sized layout: one column, nothing wider than the screen
        drivers["alpha"].set_window_size(390, 844)
        wider = drivers["alpha"].execute_script(
            "const w = document.documentElement.clientWidth; return [...document.querySelectorAll('body *')]"
            ".filter(e => e.getBoundingClientRect().right > w + 1).map(e => `${e.tagName}#${e.id}.${e.className}`)")
        assert wider == []
        drivers["alpha"].save_screenshot(str(screenshots() / "serve-page-phone.png"))
    finally:
        for driver in drivers.values():
            driver.quit()
        srv.stop()


ATTACK_PAGE = """<!doctype html><title>pending</title><script>
// Any page the user has open: a "simple" cross-site POST (multipart, no custom headers, no-cors),
// which a browser sends without a CORS preflight. It cannot read the answer; it only has to land.
const png = Uint8Array.from(atob("%s"), c => c.charCodeAt(0));
const form = new FormData();
form.append("images", new Blob([png], {type: "image/png"}), "x.png");
// A DELETE is not "simple": the browser asks first (CORS preflight), and the service, with no
// --cors-origin, does not allow it.
Promise.allSettled([
  fetch("%s/v1/classes/mug/images?mode=replace", {method: "POST", body: form, mode: "no-cors"}),
  fetch("%s/v1/classes/evil/images", {method: "POST", body: form, mode: "no-cors"}),
  fetch("%s/v1/classes/mug", {method: "DELETE"}),
]).then(r => { document.title = "sent " + r.map(x => x.status).join(","); });
</script>"""


def test_a_page_of_another_origin_cannot_write_and_the_own_page_can(tmp_path):
    """Two loopback origins in one Chromium: the service's own page enrolls; a page served from
    another port sends the cross-site writes a malicious site would, and they change nothing."""
    import base64
    import functools
    import http.server
    import threading

    import httpx
    from serve_helpers import free_port
    bundle = Path(shutil.copytree(ROOT / "tests" / "tiny_bundle", tmp_path / "bundle"))
    srv = Server(bundle, tmp_path / "store")
    buf = io.BytesIO()
    Image.new("L", (16, 16), 90).save(buf, "PNG")
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (attacker / "index.html").write_text(ATTACK_PAGE % (base64.b64encode(buf.getvalue()).decode(), srv.url, srv.url, srv.url))
    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(http.server.SimpleHTTPRequestHandler,
                                                                                      directory=str(attacker)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    write_y4m(tmp_path / "grey.y4m", buf.getvalue())
    driver = browser(tmp_path / "grey.y4m")
    try:
        assert httpx.post(srv.url + "/v1/classes/mug/images", files=[("images", ("m.png", buf.getvalue(), "image/png"))]).status_code == 201
        driver.get(srv.url + "/")   # the service's own page writes through the same API
        status = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const png = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
            const form = new FormData();
            form.append("images", new Blob([png], {type: "image/png"}), "own.png");
            fetch("/v1/classes/own/images", {method: "POST", body: form}).then(r => done(r.status), e => done(String(e)));
        """, base64.b64encode(buf.getvalue()).decode())
        assert status == 201
        driver.get(f"http://127.0.0.1:{port}/index.html")
        wait_for(driver, lambda d: d.title != "pending", "the attack page's requests")
        assert driver.title == "sent fulfilled,fulfilled,rejected"   # the POSTs went out; the DELETE was blocked
        classes = {c["label"]: c["shots"] for c in httpx.get(srv.url + "/v1/classes").json()["classes"]}
        assert classes == {"mug": 1, "own": 1}      # nothing enrolled, replaced or forgotten
        assert 'edgemeta_http_requests_total{method="POST",route="refused",status="403"} 2.0' in httpx.get(srv.url + "/metrics").text
    finally:
        driver.quit()
        httpd.shutdown()
        srv.stop()
