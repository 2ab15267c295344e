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
``v4l2:///dev/video0?width=640&height=480&fps=30``. Files (images, folders, videos) take
``?loop=1`` (start again at the end; frame indices and times keep increasing), ``?realtime=1`` (paced:
frame i is not delivered before t0 + i/fps, fps being the video's rate, else ``fps=`` or 10) and ``fps=``
(overrides the rate): ``clip.mp4?loop=1&realtime=1``. A file whose real name holds ``?`` is found first.

Live sources (cameras, streams) reconnect when a read fails: a warning, then exponential backoff (0.5 s
doubling to 8 s by default) until frames come back; frame numbering continues across the gap. Files end,
and say how in ``Source.ended``: ``"end"``, or ``"error: ..."`` when a video's reads fail before the
frame count its container gives (up to ``MAX_BAD_FRAMES`` unreadable frames in a row are skipped with a
warning; more, or a file cut short, is the error). The capture object is made by an injectable factory
(``capture_factory``), and pacing uses the injected ``clock`` / ``sleep``, so tests simulate both.

Credentials never leave the source: ``Source.name`` (hence ``Frame.source_name``, the JSON-lines records,
the reconnect warnings and the run summary) is the URI through :func:`redact_uri`
(``rtsp://admin:***@cam1/live``, ``?token=***``); only the capture factory gets the real URI.
"""

from __future__ import annotations

import re
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
FILE_KINDS = ("image", "folder", "video")
FILE_OPTIONS = ("loop", "realtime", "fps")
DEFAULT_FILE_FPS = 10.0  # pace of ?realtime=1 for images and folders without fps=
MAX_BAD_FRAMES = 50  # unreadable video frames in a row skipped before the read is an error
CSI_DEFAULTS = {"width": 1920, "height": 1080, "fps": 30, "flip": 0}
ARGUS_RESTART = "sudo systemctl restart nvargus-daemon"
ARGUS_ERROR = "Failed to create CaptureSession"
SECRET_PARAMS = ("password", "passwd", "pass", "pwd", "token", "key", "secret", "auth")
_SECRET_NAMES = "|".join(SECRET_PARAMS)
_SECRET_PARAM = re.compile(rf"(^|[&;])((?:[A-Za-z0-9]*[_-])?(?:{_SECRET_NAMES}))=([^&;#]*)", re.IGNORECASE)
REDACTED = "***"
LOCAL_SCHEMES = ("file", "v4l2", "csi")  # no credentials: a ":" and "@" there belong to a name


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
    options: dict[str, Any] = field(default_factory=dict)  # ints, except a file's fps (float)

    @property
    def live(self) -> bool:
        return self.kind in ("v4l2", "csi", "stream")

    @property
    def loop(self) -> bool:
        return bool(self.options.get("loop"))

    @property
    def realtime(self) -> bool:
        return bool(self.options.get("realtime"))


def camera_uri(n: int) -> str:
    """``--camera N`` -> ``v4l2:///dev/videoN``."""
    return f"v4l2:///dev/video{int(n)}"


def csi_uri(n: int) -> str:
    """``--csi N`` -> ``csi://N``."""
    return f"csi://{int(n)}"


def _options(kind: str, query: str, text: str) -> dict[str, Any]:
    allowed = FILE_OPTIONS if kind in FILE_KINDS else CAMERA_OPTIONS.get(kind, ())
    out: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in allowed:
            valid = ", ".join(allowed) or "none"
            raise SourceError(f"{text}: unknown option {k!r} (valid for {kind}: {valid})")
        if k in ("loop", "realtime"):
            if v not in ("0", "1"):
                raise SourceError(f"{text}: option {k}={v!r} must be 0 or 1")
            out[k] = int(v)
            continue
        if k == "fps" and kind in FILE_KINDS:
            try:
                out[k] = float(v)
            except ValueError:
                raise SourceError(f"{text}: option fps={v!r} must be a number") from None
            if not 0.0 < out[k] <= 1000.0:
                raise SourceError(f"{text}: option fps={v} out of range (0, 1000]")
            continue
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
    """Parse a source address (see the module doc); unknown schemes and options are one-line errors."""
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
    body = text.split("://", 1)[1] if scheme == "file" else text  # file://clip.mp4, file:///abs/clip.mp4
    query = ""
    if "?" in body and not Path(body).expanduser().exists():  # a real name may hold "?": checked first
        body, _, query = body.rpartition("?")
    path = Path(body).expanduser()
    if str(path).startswith("/dev/video"):
        return SourceURI(text, "v4l2", str(path), _options("v4l2", query, text))
    if path.is_dir():
        return SourceURI(text, "folder", str(path), _options("folder", query, text))
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    kind = "image" if path.suffix.lower() in IMAGE_SUFFIXES else "video"
    return SourceURI(text, kind, str(path), _options(kind, query, text))


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


def redact_uri(uri: str) -> str:
    """``uri`` fit to print: the password of ``scheme://user:password@host`` and the values of query
    parameters named like a secret (:data:`SECRET_PARAMS`, also as a suffix: ``api_key``, ``access-token``)
    become ``***``; everything else is kept as written. Plain paths come back unchanged."""
    text = str(uri)
    scheme, sep, rest = text.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return text
    # the last "@": a password may hold "/", "?" or "@" unescaped (an "@" further on, in a path or a
    # query, redacts too much, never too little)
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo and scheme.lower() not in LOCAL_SCHEMES:
        rest = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    head, q, query = rest.partition("?")
    if q:
        query, h, fragment = query.partition("#")
        query = _SECRET_PARAM.sub(lambda m: f"{m.group(1)}{m.group(2)}={REDACTED}", query) + h + fragment
    return f"{scheme}{sep}{head}{q}{query}"


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


class Pacer:
    """``?realtime=1``: :meth:`wait` holds frame ``i`` until ``t0 + i / fps`` (t0: the first call). A clock
    that jumps back (more than a frame early) restarts the schedule from now instead of stalling."""

    def __init__(self, fps: float, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self.period, self.clock, self.sleep = 1.0 / float(fps), clock, sleep
        self.t0: float | None = None

    def wait(self, index: int) -> None:
        now = self.clock()
        if self.t0 is None:
            self.t0 = now - index * self.period
        delay = self.t0 + index * self.period - now
        if delay > self.period * 1.001:  # the clock went back
            self.t0, delay = now - index * self.period, 0.0
        if delay > 0:
            self.sleep(delay)


class Source:
    """An iterable of :class:`Frame` with ``name``, ``live``, ``fps`` (None when unknown), counters of
    ``skipped`` files/frames and ``reconnects``, ``ended`` (None while frames may come; ``"end"`` or
    ``"error: ..."`` once the iteration is over), and :meth:`close`. Use as a context manager."""

    name: str
    live: bool = False
    fps: float | None = None

    def __init__(self) -> None:
        self.skipped = 0
        self.reconnects = 0
        self.ended: str | None = None

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the device or file."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageSource(Source):
    """One image file, or every image of a folder (sorted). Unreadable files: a warning each, skipped.
    ``?loop=1`` goes round again (files re-read, warnings only on the first round); ``?realtime=1`` paces
    at ``fps=`` (10 by default). ``Frame.t`` is ``index / fps`` when a rate is set, else 0."""

    def __init__(
        self,
        uri: SourceURI,
        warn: Callable[[str], None],
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.name = redact_uri(uri.text)
        self.warn, self.sleep, self.clock = warn, sleep, clock
        self.loop, self.realtime = uri.loop, uri.realtime
        fps = uri.options.get("fps")
        self.fps = float(fps) if fps else (DEFAULT_FILE_FPS if self.realtime else None)
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

        self.ended = None
        pacer = Pacer(self.fps, self.clock, self.sleep) if self.realtime and self.fps else None
        index, first = 0, True
        while True:
            delivered = 0
            for p in self.paths:
                try:
                    rgb = read_rgb(p)
                except ImageReadError as e:
                    if self.single:
                        self.ended = f"error: {p}: {e}"
                        raise SourceError(f"{p}: {e}") from None
                    if first:
                        self.warn(f"{p}: {e} (skipped)")
                        self.skipped += 1
                    continue
                if pacer is not None:
                    pacer.wait(index)
                t = index / self.fps if self.fps else 0.0
                yield Frame(np.ascontiguousarray(rgb[..., ::-1]), index, t, str(p))
                index += 1
                delivered += 1
            first = False
            if not self.loop or delivered == 0:
                break
        self.ended = "end"


class CaptureSource(Source):
    """A video file (ends at its last frame, or goes round with ``?loop=1``; see the module doc for read
    errors) or a live camera/stream (reconnects)."""

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
        self.uri, self.name, self.live = uri, redact_uri(uri.text), uri.live
        self.warn, self.factory, self.sleep, self.clock = warn, capture_factory, sleep, clock
        self.backoff = backoff or Backoff()
        self.cap: Capture | None = None
        self.cap = self._open()
        if not self.cap.isOpened():
            self.cap.release()
            raise SourceError(self._scrub(self._open_failure()))
        self.fps = self._fps()

    def _scrub(self, message: str) -> str:
        """``message`` with the real URI (as given, and its location) replaced by the redacted one."""
        for secret in sorted({self.uri.text, self.uri.location}, key=len, reverse=True):
            if secret:
                message = message.replace(secret, redact_uri(secret))
        return message

    def _open(self) -> Capture:
        try:
            return self.factory(self.uri)
        except SourceError as e:
            raise SourceError(self._scrub(str(e))) from None
        except Exception as e:  # cv2.error and friends: one line, with the Argus fix when it applies
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise SourceError(self._scrub(f"cannot open {self.name}: {msg}{argus_hint(str(e))}")) from None

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

    def _get(self, prop: str) -> float | None:
        """A ``cv2.CAP_PROP_*`` value of the capture; None when it has none (a simulated camera)."""
        get = getattr(self.cap, "get", None)
        if get is None:
            return None
        import cv2

        try:
            return float(get(getattr(cv2, f"CAP_PROP_{prop}")) or 0.0)
        except Exception:
            return None

    def _fps(self) -> float | None:
        if "fps" in self.uri.options:
            return float(self.uri.options["fps"])
        if self.uri.kind == "csi":
            return float(CSI_DEFAULTS["fps"])
        fps = self._get("FPS")
        return fps if fps is not None and 0.0 < fps <= 1000.0 else None

    def _frame_count(self) -> int | None:
        """The container's frame count (exact from an mp4/avi index, estimated for some), None if unknown."""
        n = self._get("FRAME_COUNT")
        return int(n) if n is not None and 0 < n < 1e12 else None

    def _read(self) -> tuple[np.ndarray | None, str | None]:
        """``(image, None)``, ``(None, None)`` for no frame, ``(None, message)`` for a read that raised."""
        cap = self.cap
        if cap is None or not cap.isOpened():
            return None, None
        try:
            ok, img = cap.read()
        except Exception as e:  # cv2.error from a backend: a lost frame, with its message
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            return None, self._scrub(f"{msg}{argus_hint(str(e))}")
        if not ok or img is None or img.size == 0:
            return None, None
        return img, None

    def __iter__(self) -> Iterator[Frame]:
        return self._live() if self.live else self._file()

    def _file(self) -> Iterator[Frame]:
        """A video file: passes over it (one, or endless with ``?loop=1``), paced with ``?realtime=1``."""
        self.ended = None
        pacer = Pacer(self.fps or DEFAULT_FILE_FPS, self.clock, self.sleep) if self.uri.realtime else None
        index, offset = 0, 0  # frames delivered; frames of the earlier passes (for Frame.t)
        while True:
            count, pos, bad, bad_at, delivered = self._frame_count(), 0, 0, 0, 0
            first_err: str | None = None  # the first message of a stretch of failed reads
            while True:
                img, err = self._read()
                if img is not None:
                    if bad:
                        last = f"-{pos - 1}" if bad > 1 else ""
                        self.warn(
                            f"{self.name}: frame{'s' if bad > 1 else ''} {bad_at}{last} unreadable (skipped)"
                        )
                        self.skipped, bad = self.skipped + bad, 0
                    if pacer is not None:
                        pacer.wait(index)
                    t = (offset + pos) / self.fps if self.fps else 0.0
                    yield Frame(img, index, t, self.name)
                    index, pos, delivered = index + 1, pos + 1, delivered + 1
                    continue
                if not bad and err is None and (count is None or pos >= count - 1):
                    break  # the end (a count one frame off is an estimate's rounding, not an error)
                if not bad:
                    bad_at, first_err = pos, err
                bad, pos, first_err = bad + 1, pos + 1, first_err or err
                if bad >= MAX_BAD_FRAMES or (count is not None and pos >= count):
                    of = f" of {count}" if count is not None else ""
                    why = f" ({first_err})" if first_err else " (cut short or damaged)"
                    self.ended = f"error: read failed at frame {bad_at}{of}{why}"
                    self.warn(f"{self.name}: read failed at frame {bad_at}{of}{why}; stopping")
                    return
            offset += pos
            if not self.uri.loop or delivered == 0:
                break
            self._release()
            try:
                self.cap = self._open()
                why = "" if self.cap.isOpened() else "cannot reopen the file to loop"
            except SourceError as e:
                why = str(e)
            if why:
                self.ended = f"error: {why}"
                self.warn(f"{self.name}: {why}; stopping")
                return
        self.ended = "end"

    def _live(self) -> Iterator[Frame]:
        """A camera or stream: frames until closed; a failed read reconnects with backoff."""
        self.ended = None
        index, failures, delay = 0, 0, self.backoff.initial
        while True:
            img, err = self._read()
            if img is not None:
                failures, delay = 0, self.backoff.initial
                yield Frame(img, index, self.clock(), self.name)
                index += 1
                continue
            if err is not None:
                self.warn(f"{self.name}: read failed ({err})")
            if self.backoff.retries is not None and failures >= self.backoff.retries:
                msg = f"camera {self.name} lost: no frame after {failures} reconnection attempts"
                self.ended = f"error: {msg}"
                raise SourceError(msg)
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
    :class:`SourceError`); iterate the result for :class:`Frame` objects; ``close()`` it when done.
    ``sleep`` / ``clock``: reconnect backoff, ``?realtime=1`` pacing and live frame times (tests fake them)."""
    u = uri if isinstance(uri, SourceURI) else parse_uri(uri)
    if u.kind in ("image", "folder"):
        return ImageSource(u, warn, sleep, clock)
    return CaptureSource(u, warn, capture_factory, backoff, sleep, clock)


__all__ = [
    "Backoff",
    "Capture",
    "CaptureSource",
    "Frame",
    "ImageSource",
    "Pacer",
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
    "redact_uri",
]
