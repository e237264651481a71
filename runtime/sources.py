"""Live sources: frames from a camera, a video file, an RTSP stream, a GStreamer pipeline or a
folder of images, decoded and resized to the model's input in a reader thread.

Source strings follow jetson-inference's videoSource conventions:

  /dev/video0, v4l2:///dev/video0   a V4L2 camera (USB webcam)
  csi://0                           the Jetson CSI camera (nvarguscamerasrc GStreamer pipeline)
  clip.mp4, file:///path/clip.mp4   a video file
  rtsp://host/stream, http(s)://…   a network stream
  photos/                           a folder of images, in name order
  "… ! appsink"                     a raw GStreamer pipeline (OpenCV built with GStreamer)

Video goes through OpenCV's VideoCapture (edgemeta's [video] extra; on a Jetson the system
OpenCV, which has GStreamer). A folder needs only Pillow.

Motion-JPEG (what most USB cameras send, and MJPG files): each frame is a JPEG, so for FFmpeg-read
files and streams the reader takes the compressed frame and decodes it the way `predict` decodes a
photo — in JPEG draft mode, scaled in the DCT domain to about the model's size — instead of a full
1080p decode, colour conversion and resize.

Real time: the reader thread decodes and resizes while the caller embeds; between them sits a queue
of `queue_size` frames. A live source (camera, stream, pipeline, or a file read with realtime=True)
never waits for the caller: when the queue is full the oldest frame is dropped, so the newest frame
wins and results never lag by more than the queue. A file or folder otherwise waits for the caller,
so every frame is seen.
"""
from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, ImageTooLargeError
from .preprocess import IMAGE_EXTENSIONS, InputSpec, load_image, open_image, to_pixels

CSI_PIPELINE = ("nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM), width={width}, height={height}, "
                "framerate={fps}/1 ! nvvidconv ! video/x-raw, format=BGRx ! videoconvert ! video/x-raw, format=BGR ! "
                "appsink drop=true max-buffers=1")
STALL_SECONDS = 10.0


@dataclass(frozen=True)
class SourceKind:
    """One kind of source, declared once: everything the reader needs to know about it. Adding a
    kind is one entry here (and its recognition in parse_source); the reader thread, the queue and
    the drop policy are shared."""

    name: str
    live: bool                       # frames arrive whether or not the caller keeps up (drop the oldest)
    opener: str                      # folder | capture (OpenCV VideoCapture)
    api: str = "ANY"                 # OpenCV's capture API: ANY | GSTREAMER | V4L2
    hint: str = ""                   # what to check when it will not open
    sized: bool = False              # takes a requested capture size
    own_clock: bool = False          # the container's timestamps are the frames' (files)
    jpeg_packets: bool = False       # FFmpeg may hand out Motion-JPEG frames undecoded


SOURCE_KINDS = {k.name: k for k in (
    SourceKind("folder", live=False, opener="folder"),
    SourceKind("file", live=False, opener="capture", own_clock=True, jpeg_packets=True,
               hint="the file is damaged, truncated or in a format OpenCV cannot decode"),
    SourceKind("stream", live=True, opener="capture", jpeg_packets=True, hint="check the URL and that the stream is up"),
    SourceKind("v4l2", live=True, opener="capture", api="V4L2", sized=True, hint="is another program using the camera?"),
    SourceKind("csi", live=True, opener="capture", api="GSTREAMER",
               hint="is this a Jetson with a CSI camera, and OpenCV built with GStreamer (JetPack's python3-opencv)?"),
    SourceKind("gstreamer", live=True, opener="capture", api="GSTREAMER",
               hint="check the pipeline with gst-launch-1.0, and that OpenCV has GStreamer support"),
)}


@dataclass(frozen=True)
class SourceSpec:
    kind: str      # a SOURCE_KINDS name
    target: str    # what is opened: a device path, a pipeline, a path or a URL

    @property
    def about(self) -> SourceKind:
        return SOURCE_KINDS[self.kind]

    @property
    def live(self) -> bool:
        return self.about.live


def parse_source(text: str, csi_size: tuple[int, int] = (1280, 720), csi_fps: int = 30) -> SourceSpec:
    """What a source string names; nothing is opened."""
    text = str(text).strip()
    if not text:
        raise DataError("--source is empty: give a camera (/dev/video0, csi://0), a video file, a URL or a folder")
    if "!" in text:
        return SourceSpec("gstreamer", text)
    if text.startswith("csi://"):
        sensor = text[len("csi://"):] or "0"
        if not sensor.isdigit():
            raise DataError(f"{text}: a CSI camera is csi://N with N the sensor number, e.g. csi://0")
        return SourceSpec("csi", CSI_PIPELINE.format(sensor=sensor, width=csi_size[0], height=csi_size[1], fps=csi_fps))
    if text.startswith("v4l2://"):
        return SourceSpec("v4l2", text[len("v4l2://"):])
    if re.match(r"/dev/video\d+$", text):
        return SourceSpec("v4l2", text)
    if re.match(r"(rtsp|rtmp|http|https)://", text):
        return SourceSpec("stream", text)
    path = text[len("file://"):] if text.startswith("file://") else text
    if Path(path).is_dir():
        return SourceSpec("folder", path)
    if not Path(path).exists():
        raise DataError(f"source not found: {path} (a camera is /dev/videoN or csi://N, a stream rtsp://…)")
    return SourceSpec("file", path)


@dataclass
class Frame:
    index: int                    # position in the source, counting frames that were dropped
    timestamp: float              # seconds: the file's own clock (index / fps), else since the source opened
    pixels: np.ndarray            # uint8 [H, W, C]: the model's input (InputSpec size and colour)
    image: np.ndarray | None = None  # uint8 RGB at the source's size, when asked for (enrollment)
    decode_ms: float = 0.0        # reading, colour conversion and resizing, in the reader thread


@dataclass
class SourceStats:
    read: int = 0                 # frames decoded
    dropped: int = 0              # frames thrown away because the caller was slower (live sources)
    fps: float | None = None      # the source's nominal rate, when it has one
    errors: list[str] = field(default_factory=list)


_END = object()


class VideoSource:
    """Iterate Frames from a source. Use as a context manager (the reader thread and the capture
    are released on exit). realtime: drop frames when the caller is slow; default: live sources
    only. keep_images: also hand out each frame at full size (RGB)."""

    def __init__(self, source: str, spec: InputSpec, *, realtime: bool | None = None, queue_size: int = 2,
                 keep_images: bool = False, stall_seconds: float = STALL_SECONDS,
                 capture_size: tuple[int, int] | None = None):
        """capture_size (width, height): ask a camera for frames of this size (V4L2, CSI) — decoding
        a 640×480 frame instead of a 1080p one is most of a live source's cost."""
        if queue_size < 1:
            raise DataError(f"queue size must be ≥ 1, got {queue_size}")
        self.spec, self.keep_images, self.stall_seconds = spec, keep_images, stall_seconds
        self.capture_size = capture_size
        self.source = parse_source(source, csi_size=capture_size or (1280, 720))
        self.realtime = self.source.live if realtime is None else realtime
        self.stats = SourceStats()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._open()
        self._thread = threading.Thread(target=self._read_loop, name="edgemeta-source", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ opening
    def _open(self) -> None:
        self._files: list[Path] = []
        self._capture = None
        self.compressed = False  # frames arrive as JPEG bytes (Motion-JPEG through FFmpeg)
        kind = self.source.about
        if kind.opener == "folder":
            self._files = sorted(p for p in Path(self.source.target).iterdir()
                                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
            if not self._files:
                raise DataError(f"folder {self.source.target} holds no images (png, jpg, …)")
            return
        from .extras import load
        cv2 = load("cv2", "reading video and cameras")
        target = self.source.target
        if kind.name == "v4l2" and not Path(target).exists():
            raise DataError(f"camera {target} not found (is it plugged in? `ls /dev/video*` lists the cameras)")
        capture = cv2.VideoCapture(target) if kind.api == "ANY" else cv2.VideoCapture(target, getattr(cv2, f"CAP_{kind.api}"))
        if self.capture_size is not None and kind.sized:
            capture.set(cv2.CAP_PROP_FRAME_WIDTH, self.capture_size[0])
            capture.set(cv2.CAP_PROP_FRAME_HEIGHT, self.capture_size[1])
        if not capture.isOpened():
            capture.release()
            raise DataError(f"cannot open {kind.name} source {target}: {kind.hint}")
        fps = capture.get(cv2.CAP_PROP_FPS)
        self.stats.fps = float(fps) if fps and fps > 0 and np.isfinite(fps) else None
        self.compressed = self._jpeg_packets(capture, cv2)
        self._capture, self._cv2 = capture, cv2

    def _jpeg_packets(self, capture, cv2) -> bool:
        """Switch an FFmpeg-read Motion-JPEG file or stream to handing out its compressed frames
        (CAP_PROP_FORMAT = -1). A probe capture checks first that the packets really are JPEGs."""
        if not self.source.about.jpeg_packets or capture.getBackendName() != "FFMPEG":
            return False
        fourcc = int(capture.get(cv2.CAP_PROP_FOURCC))
        if "".join(chr((fourcc >> (8 * i)) & 0xFF) for i in range(4)).upper() != "MJPG":
            return False
        probe = cv2.VideoCapture(self.source.target)
        try:
            ok = probe.set(cv2.CAP_PROP_FORMAT, -1)
            got, packet = probe.read() if ok else (False, None)
            jpeg = bool(got) and packet is not None and packet.size > 4 and bytes(packet.ravel()[:2]) == b"\xff\xd8"
        finally:
            probe.release()
        return jpeg and bool(capture.set(cv2.CAP_PROP_FORMAT, -1))

    # ------------------------------------------------------------------ the reader thread
    def _frames(self):
        """(image path, JPEG bytes or RGB array; source timestamp or None)."""
        if self._files:
            for path in self._files:
                yield path, None
            return
        cv2 = self._cv2
        while not self._stop.is_set():
            ok, bgr = self._capture.read()
            if not ok or bgr is None:
                if self.source.live:
                    self.stats.errors.append(f"{self.source.kind} source {self.source.target} stopped delivering frames")
                return
            position = self._capture.get(cv2.CAP_PROP_POS_MSEC)
            stamp = position / 1000.0 if self.source.about.own_clock and position >= 0 else None
            if self.compressed:
                yield bgr.tobytes(), stamp
                continue
            if bgr.ndim == 2:
                rgb = np.repeat(bgr[..., None], 3, axis=2)
            elif bgr.shape[2] == 4:
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGRA2RGB)
            else:
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # OpenCV decodes to BGR; the model was trained on RGB
            yield rgb, stamp

    def _read_loop(self) -> None:
        t_open = time.perf_counter()
        period = 1.0 / self.stats.fps if self.realtime and self.source.about.own_clock and self.stats.fps else 0.0
        try:
            for index, (raw, stamp) in enumerate(self._frames()):
                if self._stop.is_set():
                    break
                if period:  # a file read in real time arrives at its own frame rate, as from a camera
                    wait = t_open + index * period - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                t0 = time.perf_counter()
                if isinstance(raw, (Path, bytes)):  # an image file, or a Motion-JPEG frame
                    pixels, image = load_image(raw, self.spec), None
                    if self.keep_images:
                        image = np.asarray(open_image(raw).convert("RGB"))
                else:
                    from PIL import Image
                    pixels = to_pixels(Image.fromarray(raw), self.spec)
                    image = raw if self.keep_images else None
                frame = Frame(index, stamp if stamp is not None else time.perf_counter() - t_open, pixels, image,
                              (time.perf_counter() - t0) * 1e3)
                self.stats.read += 1
                self._put(frame)
        except ImageTooLargeError as exc:  # a frame over the pixel limit (an 8192² MJPG): which source, what to do
            self.stats.errors.append(f"{self.source.kind} source {self.source.target}: a frame is too large to decode "
                                     f"({exc}); ask a camera for smaller frames with --capture-size WIDTHxHEIGHT")
        except DataError as exc:  # an undecodable image in a folder
            self.stats.errors.append(str(exc) if self._files else f"{self.source.kind} source {self.source.target}: {exc}")
        except Exception as exc:  # a camera that disappears mid-read: reported, never a traceback
            self.stats.errors.append(f"{self.source.kind} source {self.source.target} failed: {exc}")
        finally:
            self._put(_END, final=True)

    def _put(self, item, final: bool = False) -> None:
        while not self._stop.is_set():
            if self.realtime and not final:
                try:
                    self._queue.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        self._queue.get_nowait()  # the newest frame wins: drop the oldest
                        self.stats.dropped += 1
                    except queue.Empty:
                        pass
                    continue
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    # ------------------------------------------------------------------ the caller's side
    def __iter__(self):
        while True:
            try:
                item = self._queue.get(timeout=self.stall_seconds)
            except queue.Empty:
                raise DataError(f"{self.source.kind} source {self.source.target} stalled: no frame for "
                                f"{self.stall_seconds:.0f} s") from None
            if item is _END:
                if self.stats.errors and self.stats.read == 0:
                    raise DataError(self.stats.errors[0])
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
        if self._capture is not None:
            self._capture.release()

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
