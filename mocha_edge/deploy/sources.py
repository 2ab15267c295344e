"""Video sources addressed by URI: one :func:`open_source` for files, folders, cameras and streams.

| URI | what |
|---|---|
| ``photo.jpg`` | one image |
| ``folder/`` | every image of a folder, in sorted order; an unreadable file is one warning, then skipped |
| ``clip.mp4`` (or ``file://clip.mp4``) | a video file, to its end |
| ``v4l2:///dev/video0`` (or ``/dev/video0``) | a USB / V4L2 camera (OpenCV's V4L2 backend) |
| ``csi://0`` | a Jetson CSI camera through GStreamer (``nvarguscamerasrc`` ... ``appsink drop=1 max-buffers=1``) |
| ``rtsp://host/path`` (also ``rtsps``, ``http``, ``https``) | a network stream (OpenCV's FFmpeg backend) |

Cameras take options as a query: ``csi://0?width=1280&height=720&fps=60&flip=2``,
``v4l2:///dev/video0?width=640&height=480&fps=30``.

Live sources (cameras, streams) reconnect when a read fails: a warning, then exponential backoff (0.5 s
doubling to 8 s by default) until frames come back; frame numbering continues across the gap. Files end.
The capture object is made by an injectable factory (``capture_factory``), so tests drive the reconnect
logic with a simulated camera.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from mocha_edge.data.dataset import IMAGE_SUFFIXES
from mocha_edge.errors import MochaError

STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https")
SCHEMES = ("file", "v4l2", "csi", *STREAM_SCHEMES)
CAMERA_OPTIONS = {"csi": ("width", "height", "fps", "flip"), "v4l2": ("width", "height", "fps")}
CSI_DEFAULTS = {"width": 1920, "height": 1080, "fps": 30, "flip": 0}
ARGUS_RESTART = "sudo systemctl restart nvargus-daemon"
ARGUS_ERROR = "Failed to create CaptureSession"


class SourceError(MochaError):
    """A video source cannot be opened or read."""


@dataclass(frozen=True)
class Frame:
    """One frame: ``image_bgr`` (H, W, 3) uint8; ``index`` counts delivered frames from 0 (it goes on across
    camera reconnects); ``t`` seconds: the frame's time in a video file, Unix time of capture for a live
    source, 0 for still images; ``source_name`` the URI, or the image file for folders."""

    image_bgr: np.ndarray
    index: int
    t: float
    source_name: str


@dataclass(frozen=True)
class SourceURI:
    """A parsed source address. ``kind``: image | folder | video | v4l2 | csi | stream."""

    text: str  # as the user wrote it
    kind: str
    location: str  # file/folder path, device path, sensor id, or URL
    options: dict[str, int] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.kind in ("v4l2", "csi", "stream")


def camera_uri(n: int) -> str:
    """``--camera N`` -> ``v4l2:///dev/videoN``."""
    return f"v4l2:///dev/video{int(n)}"


def csi_uri(n: int) -> str:
    """``--csi N`` -> ``csi://N``."""
    return f"csi://{int(n)}"


def _options(kind: str, query: str, text: str) -> dict[str, int]:
    allowed = CAMERA_OPTIONS.get(kind, ())
    out: dict[str, int] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in allowed:
            valid = ", ".join(allowed) or "none"
            raise SourceError(f"{text}: unknown option {k!r} (valid for {kind}: {valid})")
        try:
            out[k] = int(v)
        except ValueError:
            raise SourceError(f"{text}: option {k}={v!r} must be an integer") from None
        if out[k] < 0 or (k != "flip" and out[k] == 0):
            raise SourceError(f"{text}: option {k}={v} out of range")
    if "flip" in out and out["flip"] > 7:
        raise SourceError(f"{text}: flip must be 0..7 (nvvidconv flip-method), got {out['flip']}")
    return out


def parse_uri(text: str) -> SourceURI:
    """Parse a source address (see the module doc); unknown schemes list the valid ones."""
    text = str(text).strip()
    if not text:
        raise SourceError("empty --source")
    if text.isdigit():  # shorthand: "0" -> the first V4L2 camera
        return SourceURI(text, "v4l2", f"/dev/video{text}")
    parts = urlsplit(text)
    scheme = parts.scheme.lower() if "://" in text else ""
    if scheme == "csi":
        sensor = parts.netloc or parts.path.strip("/")
        if not sensor.isdigit():
            raise SourceError(f"{text}: expected csi://N with N the sensor id (csi://0)")
        return SourceURI(text, "csi", sensor, _options("csi", parts.query, text))
    if scheme == "v4l2":
        dev = parts.path or ""
        if not dev.startswith("/dev/"):
            raise SourceError(f"{text}: expected v4l2:///dev/videoN (three slashes: v4l2:// + /dev/videoN)")
        return SourceURI(text, "v4l2", dev, _options("v4l2", parts.query, text))
    if scheme in STREAM_SCHEMES:
        return SourceURI(text, "stream", text)
    if scheme and scheme != "file":
        raise SourceError(
            f"{text}: unknown source scheme {scheme!r} (valid: {', '.join(SCHEMES)}, or a path)"
        )
    path = Path(parts.path if scheme == "file" else text).expanduser()
    if str(path).startswith("/dev/video"):
        return SourceURI(text, "v4l2", str(path))
    if path.is_dir():
        return SourceURI(text, "folder", str(path))
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    kind = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
    return SourceURI(text, kind, str(path))


def csi_pipeline(
    sensor_id: int = 0, width: int = 1920, height: int = 1080, fps: int = 30, flip: int = 0
) -> str:
    """The GStreamer pipeline for a Jetson CSI camera, BGR out, newest frame only (no queueing latency)."""
    return (
        f"nvarguscamerasrc sensor-id={int(sensor_id)} ! "
        f"video/x-raw(memory:NVMM),width={int(width)},height={int(height)},framerate={int(fps)}/1 ! "
        f"nvvidconv flip-method={int(flip)} ! video/x-raw,format=BGRx ! videoconvert ! "
        "video/x-raw,format=BGR ! appsink drop=1 max-buffers=1"
    )


def opencv_build_value(key: str, build_info: str | None = None) -> str:
    """The value of one line of ``cv2.getBuildInformation()`` (e.g. ``GStreamer`` -> ``YES (1.20.3)``)."""
    if build_info is None:
        import cv2

        build_info = cv2.getBuildInformation()
    for line in build_info.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return ""


def has_gstreamer(build_info: str | None = None) -> bool:
    """Whether OpenCV was built with GStreamer (pip's ``opencv-python`` wheels are not)."""
    return opencv_build_value("GStreamer", build_info).upper().startswith("YES")


def argus_hint(message: str) -> str:
    """The fix for a stuck Argus camera daemon when ``message`` shows one, else ``""``."""
    return f" (Argus: run `{ARGUS_RESTART}`)" if ARGUS_ERROR in message else ""


# ------------------------------------------------------------------------------------------ sources
class Capture(Protocol):
    """What a source needs of ``cv2.VideoCapture`` (a simulated camera implements the same)."""

    def isOpened(self) -> bool: ...  # OpenCV's name
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...


CaptureFactory = Callable[[SourceURI], Capture]


def open_cv2_capture(uri: SourceURI) -> Any:
    """The default capture factory: ``cv2.VideoCapture`` with the backend and settings ``uri`` needs."""
    import cv2

    if uri.kind == "video":
        return cv2.VideoCapture(uri.location)
    if uri.kind == "csi":
        if not has_gstreamer():
            raise SourceError(
                f"{uri.text}: this OpenCV ({cv2.__version__}, {Path(cv2.__file__).parent}) is built without "
                "GStreamer, which CSI cameras need; use JetPack's OpenCV instead of pip's opencv-python "
                "(`pip uninstall opencv-python`, then `python3 -c 'import cv2'` must find the system one; "
                "see docs/jetson.md)"
            )
        opts = {**CSI_DEFAULTS, **uri.options}
        return cv2.VideoCapture(csi_pipeline(int(uri.location), **opts), cv2.CAP_GSTREAMER)
    if uri.kind == "v4l2":
        if not Path(uri.location).exists():
            raise SourceError(f"{uri.location}: no such camera device (list them with `ls /dev/video*`)")
        cap = cv2.VideoCapture(uri.location, cv2.CAP_V4L2)
        props = {
            "width": cv2.CAP_PROP_FRAME_WIDTH,
            "height": cv2.CAP_PROP_FRAME_HEIGHT,
            "fps": cv2.CAP_PROP_FPS,
        }
        for k, v in uri.options.items():
            cap.set(props[k], float(v))
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # newest frame, not a queue
        return cap
    if uri.kind == "stream":
        cap = cv2.VideoCapture(uri.location, cv2.CAP_FFMPEG)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap
    raise SourceError(f"{uri.text}: not a capture source ({uri.kind})")


@dataclass
class Backoff:
    """Reconnect delays: ``initial`` seconds, times ``factor`` per failed attempt, at most ``maximum``;
    ``retries`` attempts in a row before giving up (None: never give up)."""

    initial: float = 0.5
    maximum: float = 8.0
    factor: float = 2.0
    retries: int | None = None


class Source:
    """An iterable of :class:`Frame` with ``name``, ``live``, ``fps`` (None when unknown), counters of
    ``skipped`` files and ``reconnects``, and :meth:`close`. Use as a context manager."""

    name: str
    live: bool = False
    fps: float | None = None

    def __init__(self) -> None:
        self.skipped = 0
        self.reconnects = 0

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device or file."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageSource(Source):
    """One image file, or every image of a folder (sorted). Unreadable files: a warning each, skipped."""

    def __init__(self, uri: SourceURI, warn: Callable[[str], None]) -> None:
        super().__init__()
        self.name = uri.text
        self.warn = warn
        root = Path(uri.location)
        if uri.kind == "folder":
            self.paths = sorted(
                p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not self.paths:
                raise SourceError(f"{root}: no image in this folder ({', '.join(IMAGE_SUFFIXES)})")
        else:
            self.paths = [root]
        self.single = uri.kind == "image"

    def __iter__(self) -> Iterator[Frame]:
        from mocha_edge.data.images import ImageReadError, read_rgb

        index = 0
        for p in self.paths:
            try:
                rgb = read_rgb(p)
            except ImageReadError as e:
                if self.single:
                    raise SourceError(f"{p}: {e}") from None
                self.warn(f"{p}: {e} (skipped)")
                self.skipped += 1
                continue
            yield Frame(np.ascontiguousarray(rgb[..., ::-1]), index, 0.0, str(p))
            index += 1


class CaptureSource(Source):
    """A video file (ends at its last frame) or a live camera/stream (reconnects; see the module doc)."""

    def __init__(
        self,
        uri: SourceURI,
        warn: Callable[[str], None],
        capture_factory: CaptureFactory = open_cv2_capture,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.uri, self.name, self.live = uri, uri.text, uri.live
        self.warn, self.factory, self.sleep, self.clock = warn, capture_factory, sleep, clock
        self.backoff = backoff or Backoff()
        self.cap: Capture | None = None
        self.cap = self._open()
        if not self.cap.isOpened():
            self.cap.release()
            raise SourceError(self._open_failure())
        self.fps = self._fps()

    def _open(self) -> Capture:
        try:
            return self.factory(self.uri)
        except SourceError:
            raise
        except Exception as e:  # cv2.error and friends: one line, with the Argus fix when it applies
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise SourceError(f"cannot open {self.name}: {msg}{argus_hint(str(e))}") from None

    def _open_failure(self) -> str:
        u = self.uri
        if u.kind == "csi":
            return (
                f"cannot open {u.text}: the Argus camera did not start (pipeline: "
                f"{csi_pipeline(int(u.location), **{**CSI_DEFAULTS, **u.options})}); if GStreamer printed "
                f"'{ARGUS_ERROR}' or the camera worked before, run `{ARGUS_RESTART}`; in Docker mount "
                "/tmp/argus_socket (see docs/jetson.md)"
            )
        if u.kind == "v4l2":
            if not Path(u.location).exists():
                return f"{u.location}: no such camera device (list them with `ls /dev/video*`)"
            return (
                f"cannot open {u.location}: in use by another program, no permission, or not a capture device"
            )
        if u.kind == "stream":
            return f"cannot open stream {u.location} (check the address, credentials and network)"
        return f"{u.location}: cannot open as a video (unsupported format or corrupt file)"

    def _fps(self) -> float | None:
        if "fps" in self.uri.options:
            return float(self.uri.options["fps"])
        if self.uri.kind == "csi":
            return float(CSI_DEFAULTS["fps"])
        get = getattr(self.cap, "get", None)
        if get is None:
            return None
        import cv2

        fps = float(get(cv2.CAP_PROP_FPS) or 0.0)
        return fps if 0.0 < fps <= 1000.0 else None

    def _read(self) -> np.ndarray | None:
        cap = self.cap
        if cap is None or not cap.isOpened():
            return None
        try:
            ok, img = cap.read()
        except Exception as e:  # cv2.error from a backend: treated as a lost frame
            self.warn(f"{self.name}: read failed ({str(e).strip().splitlines()[-1]}){argus_hint(str(e))}")
            return None
        if not ok or img is None or img.size == 0:
            return None
        return img

    def __iter__(self) -> Iterator[Frame]:
        index, failures, delay = 0, 0, self.backoff.initial
        while True:
            img = self._read()
            if img is not None:
                failures, delay = 0, self.backoff.initial
                t = self.clock() if self.live else (index / self.fps if self.fps else 0.0)
                yield Frame(img, index, t, self.name)
                index += 1
                continue
            if not self.live:
                return  # end of the file
            if self.backoff.retries is not None and failures >= self.backoff.retries:
                raise SourceError(f"camera {self.name} lost: no frame after {failures} reconnection attempts")
            hint = f" (if it stays lost: `{ARGUS_RESTART}`)" if self.uri.kind == "csi" else ""
            state = "lost" if failures == 0 else f"still lost (attempt {failures + 1})"
            self.warn(f"camera {self.name} {state}, reconnecting in {delay:g}s{hint}")
            failures += 1
            self.reconnects += 1
            self._release()
            self.sleep(delay)
            delay = min(delay * self.backoff.factor, self.backoff.maximum)
            try:
                self.cap = self._open()
            except SourceError as e:
                self.warn(str(e))
                self.cap = None

    def _release(self) -> None:
        if self.cap is not None:
            try:
                self.cap.release()
            finally:
                self.cap = None

    def close(self) -> None:
        self._release()


def open_source(
    uri: str | SourceURI,
    *,
    warn: Callable[[str], None] = print,
    capture_factory: CaptureFactory = open_cv2_capture,
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
) -> Source:
    """Open the source at ``uri`` (checked now: a missing file or a camera that will not start raises
    :class:`SourceError`); iterate the result for :class:`Frame` objects; ``close()`` it when done."""
    u = uri if isinstance(uri, SourceURI) else parse_uri(uri)
    if u.kind in ("image", "folder"):
        return ImageSource(u, warn)
    return CaptureSource(u, warn, capture_factory, backoff, sleep, clock)


__all__ = [
    "Backoff",
    "Capture",
    "CaptureSource",
    "Frame",
    "ImageSource",
    "Source",
    "SourceError",
    "SourceURI",
    "argus_hint",
    "camera_uri",
    "csi_pipeline",
    "csi_uri",
    "has_gstreamer",
    "open_source",
    "parse_uri",
]
