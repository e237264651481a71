"""`edgemeta watch` on real video: a clip written from shipped Omniglot drawings (a test alphabet the
shipped model never saw), enrollment from the clip, per-segment accuracy, --every, --smooth, frame
dropping behind a slow model, and one clear error line for sources that cannot be read."""
from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image

cv2 = pytest.importorskip("cv2", reason="edgemeta[video] (opencv-python-headless) is part of the dev install")

SIDE = 112  # frames are 112×112 BGR; the drawings are 105×105, centred on white


def write_clip(path, drawings: list[bytes], fps: float = 25.0) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (SIDE, SIDE))
    assert writer.isOpened()
    for data in drawings:
        canvas = Image.new("RGB", (SIDE, SIDE), "white")
        canvas.paste(Image.open(io.BytesIO(data)).convert("RGB"), ((SIDE - 105) // 2, (SIDE - 105) // 2))
        writer.write(cv2.cvtColor(np.asarray(canvas), cv2.COLOR_RGB2BGR))
    writer.release()


@pytest.fixture(scope="module")
def clips(tmp_path_factory, tagalog):
    folder = tmp_path_factory.mktemp("clips")
    chars = sorted(tagalog)[:4]
    for c in chars:  # drawings 0-5 of each character: what the user holds up to enroll it
        write_clip(folder / f"enroll-{c}.avi", tagalog[c][:6])
    # then 10 new drawings of each character in turn, as a camera would see them
    write_clip(folder / "test.avi", [img for c in chars for img in tagalog[c][10:20]])
    return folder, chars


@pytest.fixture(scope="module")
def enrolled(shipped_bundle, clips, tmp_path_factory):
    folder, chars = clips
    store = tmp_path_factory.mktemp("store") / "s"
    for c in chars:
        r = run_cli("watch", shipped_bundle, "--store", store, "--source", folder / f"enroll-{c}.avi",
                    "--enroll", c, "--shots", "3", "--spacing", "2")
        assert r.exit_code == 0, r.output
        assert f"enrolled '{c}' from" in r.stdout and "3 shot(s)" in r.stdout
    return store


def watch_results(*args) -> list[dict]:
    r = run_cli("watch", *args)
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_watch_labels_each_segment_of_a_real_clip(shipped_bundle, clips, enrolled):
    folder, chars = clips
    results = watch_results(shipped_bundle, "--store", enrolled, "--source", folder / "test.avi", "--top-k", "2")
    assert [r["frame"] for r in results] == list(range(40))
    for i, c in enumerate(chars):
        segment = results[i * 10:(i + 1) * 10]
        accuracy = np.mean([r["raw_label"] == c for r in segment])
        assert accuracy >= 0.8, (c, [r["raw_label"] for r in segment])
    first = results[0]
    assert len(first["top_k"]) == 2 and first["distance"] > 0
    assert set(first["ms"]) == {"decode", "embed", "head"} and first["ms"]["embed"] > 0


def test_every_and_smooth(shipped_bundle, clips, enrolled):
    folder, chars = clips
    every = watch_results(shipped_bundle, "--store", enrolled, "--source", folder / "test.avi", "--every", "3")
    assert [r["frame"] for r in every] == list(range(0, 40, 3))
    smooth = watch_results(shipped_bundle, "--store", enrolled, "--source", folder / "test.avi", "--smooth", "5",
                           "--max-frames", "25")
    assert len(smooth) == 25
    raw_changes = sum(a["raw_label"] != b["raw_label"] for a, b in zip(smooth, smooth[1:]))
    shown_changes = sum(a["label"] != b["label"] for a, b in zip(smooth, smooth[1:]))
    assert shown_changes <= raw_changes
    # each shown label is the most frequent of the last 5 raw labels
    for i, r in enumerate(smooth):
        window = [x["raw_label"] for x in smooth[max(0, i - 4):i + 1]]
        assert window.count(r["label"]) == max(window.count(x) for x in window)


def test_a_slow_model_drops_old_frames_and_never_lags_more_than_the_queue(shipped_bundle, clips, enrolled, tagalog,
                                                                          monkeypatch):
    from edgemeta.runtime import FewShotClassifier
    from edgemeta.runtime.sources import VideoSource
    from edgemeta.runtime.watch import watch
    folder, chars = clips
    write_clip(folder / "fast.avi", [img for c in chars for img in tagalog[c][10:20]], fps=200.0)
    clf = FewShotClassifier.load(shipped_bundle, store=enrolled)
    real_embed = clf.backend.embed

    def slow_embed(batch):
        time.sleep(0.03)  # a model at ~30 frames/s behind a 200 frames/s source
        return real_embed(batch)
    monkeypatch.setattr(clf.backend, "embed", slow_embed)
    lags = []
    with VideoSource(str(folder / "fast.avi"), clf.bundle.spec, realtime=True, queue_size=2) as source:
        summary = watch(clf, source, on_result=lambda r: lags.append(r["behind"]))
    assert summary.dropped > 10 and summary.classified + summary.dropped == summary.read == 40
    assert max(lags) <= 2 + 1  # a frame taken is never older than the queue's two, plus the one being read
    with VideoSource(str(folder / "fast.avi"), clf.bundle.spec, realtime=False) as source:  # a file waits for the model
        assert watch(clf, source, max_frames=10).dropped == 0


def test_sources_that_cannot_be_read_are_one_error_line(shipped_bundle, clips, enrolled, tmp_path):
    folder, _ = clips
    truncated = tmp_path / "cut.avi"
    truncated.write_bytes((folder / "test.avi").read_bytes()[:200])
    for source, why in (("/dev/video9", "camera /dev/video9 not found"),
                        (str(tmp_path / "none.mp4"), "source not found"),
                        (str(truncated), "cannot open file source"),
                        ("rtsp://127.0.0.1:9/stream", "cannot open stream source"),
                        ("csi://x", "csi://N")):
        r = run_cli("watch", shipped_bundle, "--store", enrolled, "--source", source)
        assert r.exit_code == 2, (source, r.output)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and why in lines[0], (source, r.output)


def test_a_folder_of_images_is_a_source(shipped_bundle, enrolled, tagalog, tmp_path):
    chars = sorted(tagalog)[:4]
    for i, img in enumerate(tagalog[chars[2]][10:15]):
        (tmp_path / f"{i:03d}.png").write_bytes(img)
    results = watch_results(shipped_bundle, "--store", enrolled, "--source", tmp_path)
    assert [r["frame"] for r in results] == list(range(5))
    assert np.mean([r["raw_label"] == chars[2] for r in results]) >= 0.8


def test_source_strings_follow_jetson_inference_conventions():
    from edgemeta.runtime.sources import parse_source
    csi = parse_source("csi://1", csi_size=(640, 480))
    assert csi.kind == "csi" and csi.live and "sensor-id=1" in csi.target and "width=640, height=480" in csi.target
    assert parse_source("v4l2:///dev/video2").target == "/dev/video2" and parse_source("/dev/video0").kind == "v4l2"
    assert parse_source("rtsp://cam.local/stream").kind == "stream"
    assert parse_source("v4l2src ! videoconvert ! appsink").kind == "gstreamer"


def test_capture_size_is_checked(shipped_bundle, enrolled, clips):
    folder, _ = clips
    r = run_cli("watch", shipped_bundle, "--store", enrolled, "--source", folder / "test.avi", "--capture-size", "big")
    assert r.exit_code == 2 and "WIDTHxHEIGHT" in r.stderr


def test_motion_jpeg_frames_are_decoded_from_their_jpeg_bytes(tmp_path, tagalog, shipped_bundle):
    """An MJPG file hands its compressed frames to the reader (draft-mode decode at about the model's
    size); another codec is decoded by OpenCV. Both give the model the same drawing."""
    from edgemeta.runtime import load_bundle
    from edgemeta.runtime.sources import VideoSource
    drawings = tagalog[sorted(tagalog)[0]][:8]
    write_clip(tmp_path / "mjpg.avi", drawings)
    writer = cv2.VideoWriter(str(tmp_path / "other.avi"), cv2.VideoWriter_fourcc(*"FFV1"), 25.0, (SIDE, SIDE))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write FFV1")
    for data in drawings:
        canvas = Image.new("RGB", (SIDE, SIDE), "white")
        canvas.paste(Image.open(io.BytesIO(data)).convert("RGB"), ((SIDE - 105) // 2, (SIDE - 105) // 2))
        writer.write(cv2.cvtColor(np.asarray(canvas), cv2.COLOR_RGB2BGR))
    writer.release()
    spec = load_bundle(shipped_bundle).spec
    with VideoSource(str(tmp_path / "mjpg.avi"), spec, keep_images=True) as fast, VideoSource(str(tmp_path / "other.avi"), spec) as slow:
        assert fast.compressed and not slow.compressed
        a, b = list(fast), list(slow)
    assert len(a) == len(b) == 8 and a[0].image.shape == (SIDE, SIDE, 3)
    diff = np.abs(np.stack([f.pixels for f in a]).astype(int) - np.stack([f.pixels for f in b]).astype(int))
    assert diff.mean() < 4.0  # grey levels out of 255: JPEG loss and the DCT-domain downscale
    assert [f.index for f in a] == list(range(8)) and a[1].timestamp == pytest.approx(0.04, abs=1e-3)


def test_every_source_kind_is_declared_completely():
    """A source kind is one SourceKind entry: how it opens, whether it is live, what to check when
    it will not open (a forgotten hint used to be a KeyError instead of a clean error)."""
    from edgemeta.runtime.sources import SOURCE_KINDS, parse_source
    for name, kind in SOURCE_KINDS.items():
        assert kind.name == name and kind.opener in ("folder", "capture")
        assert kind.opener == "folder" or kind.hint, name
        assert kind.api in ("ANY", "GSTREAMER", "V4L2")
    assert parse_source("csi://0").kind == "csi" and parse_source("csi://0").live
    assert parse_source("rtsp://cam/1").about.jpeg_packets and not parse_source("v4l2:///dev/video9").about.own_clock


def test_watch_enroll_checks_the_label_before_capturing(shipped_bundle, enrolled, clips, monkeypatch):
    """`watch --enroll` checked the label only after capturing the shots."""
    import edgemeta.runtime.watch as watch_module
    folder, _ = clips
    captured = []
    real = watch_module.capture_shots
    monkeypatch.setattr(watch_module, "capture_shots", lambda *a, **k: captured.append(1) or real(*a, **k))
    for label, why in (("UNKNOWN", "reads as the reserved"), ("a\nb", "control")):
        r = run_cli("watch", shipped_bundle, "--store", enrolled, "--source", folder / "test.avi", "--enroll", label)
        assert r.exit_code == 2 and why in r.output, r.output
    assert captured == []


def test_a_video_frame_over_the_pixel_limit_names_the_source_and_capture_size(shipped_bundle, enrolled, clips, monkeypatch):
    """An 8192² MJPG video's error named neither the video nor --capture-size (shaped here with a
    pixel limit below the clip's frames)."""
    folder, _ = clips
    monkeypatch.setenv("EDGEMETA_MAX_PIXELS", "1000")
    r = run_cli("watch", shipped_bundle, "--store", enrolled, "--source", folder / "test.avi", "--max-frames", "2")
    said = " ".join(r.output.split())
    assert "test.avi" in said and "--capture-size" in said and "too large" in said, r.output
