"""Outputs of the live loop, opened by URI through one factory, :func:`open_sink`.

| URI | what |
|---|---|
| ``x.jsonl`` (``?kind=detections``) | one JSON line per detection, appended (a restart keeps the history), flushed per frame |
| ``x.jsonl?rotate=100MB&keep=5`` | the same, rotated before a write would take it past the size (K/M/G = 1024-based); old files ``x.jsonl.1`` (newest) .. ``x.jsonl.5``; a frame's lines never straddle two files |
| ``out.mp4`` / ``out.avi`` / ``out.mkv`` (``.m4v``, ``.mov``) | the annotated video, written under a temporary name and renamed at the end |

``{camera}`` in a path is replaced by the source's name as a safe file-name fragment (``clip.mp4`` ->
``clip``, ``rtsp://user:pw@cam1:8554/live`` -> ``cam1_8554_live``). Parsed but refused in this version:
``?kind=events`` (events come with tracking), ``?segment=10m`` (with the hardening issue), ``mqtt://`` and
``http(s)://`` (with the live-identities issue). Anything else unknown is a one-line :class:`SinkError`
naming the URI. Every sink has ``write(frame, records, annotated)`` and ``close() -> SinkReport``.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import parse_qsl

from mocha_edge.errors import MochaError

if TYPE_CHECKING:
    import numpy as np

    from mocha_edge.deploy.sources import Frame

VIDEO_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
DEFAULT_FPS = 10.0  # video rate when the source has none (folders, images)
JSONL_SUFFIXES = (".jsonl",)
SINK_OPTIONS = {"jsonl": ("kind", "rotate", "keep"), "video": ("segment",)}
JSONL_KINDS = ("detections", "events")
DEFAULT_KEEP = 5
LATER_SCHEMES = ("mqtt", "mqtts", "http", "https")  # come with the live-identities issue
PLACEHOLDERS = ("camera",)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class SinkError(MochaError):
    """An output cannot be opened or written (bad path, codec, URI)."""


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def detection_records(
    frame: Frame, dets: Any, class_names: list[str], identity_names: list[str]
) -> list[dict[str, Any]]:
    """The JSON-lines records of one frame: one per detection (schema in the module doc of ``run``)."""
    out = []
    for i in range(len(dets.scores)):
        ident = int(dets.identity[i])
        c = int(dets.cls[i])
        out.append(
            {
                "source": frame.source_name,
                "frame": frame.index,
                "t": round(float(frame.t), 6),
                "box_xyxy": [round(float(v), 2) for v in dets.boxes[i]],
                "cls": class_names[c] if 0 <= c < len(class_names) else str(c),
                "score": round(float(dets.scores[i]), 5),
                "identity": identity_names[ident] if 0 <= ident < len(identity_names) else None,
                "similarity": _finite(round(float(dets.similarity[i]), 5)),
            }
        )
    return out


# ------------------------------------------------------------------------------------------ URIs
@dataclass(frozen=True)
class SinkURI:
    """A parsed output address. ``kind``: jsonl | video; ``path`` may still hold ``{camera}``."""

    text: str  # as the user wrote it
    kind: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_size(value: str, text: str) -> int:
    """``100MB``, ``512K``, ``1G``, ``2048`` (bytes) -> bytes (1024-based)."""
    m = _SIZE.match(value)
    if m is None or float(m.group(1)) <= 0:
        raise SinkError(f"{text}: rotate={value!r} is not a size (e.g. 100MB, 512K, 1G)")
    return max(1, int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2).upper() or " ")))


def parse_duration(value: str, text: str) -> float:
    """``10m``, ``30s``, ``1h``, ``90`` (seconds) -> seconds."""
    m = _DURATION.match(value)
    if m is None or float(m.group(1)) <= 0:
        raise SinkError(f"{text}: segment={value!r} is not a duration (e.g. 30s, 10m, 1h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2).lower()]


def _sink_kind(path: str) -> str | None:
    suffix = Path(path).suffix.lower()
    return "jsonl" if suffix in JSONL_SUFFIXES else "video" if suffix in VIDEO_FOURCC else None


def parse_sink(text: str, *, alias: str | None = None) -> SinkURI:
    """Parse an output address (see the module doc). ``alias`` (``--save`` / ``--jsonl``): ``text`` is a
    plain path, taken literally, of that option's kind (``--jsonl`` takes any suffix)."""
    text = str(text).strip()
    if not text:
        raise SinkError(f"empty {alias or '--sink'}")
    if alias == "--jsonl":
        return SinkURI(text, "jsonl", text, {"kind": "detections"})
    if alias == "--save":
        if _sink_kind(text) != "video":
            raise SinkError(f"{text}: --save needs one of {', '.join(VIDEO_FOURCC)}")
        return SinkURI(text, "video", text)
    m = _SCHEME.match(text)
    scheme, rest = (m.group(1).lower(), text[m.end() :]) if m else ("", text)
    if scheme in LATER_SCHEMES:
        raise SinkError(
            f"{text}: {scheme}:// outputs come with the live-identities issue (not in this version)"
        )
    if scheme and scheme != "file":
        raise SinkError(f"{text}: unknown output scheme {scheme!r} (valid: a path, or file://)")
    path, query = (rest if scheme else text), ""
    if "?" in path:  # a query when what precedes it is a known output; else "?" is part of the name
        head, _, tail = path.rpartition("?")
        if _sink_kind(head) is not None:
            path, query = head, tail
    kind = _sink_kind(path)
    if kind is None:
        valid = ", ".join((*JSONL_SUFFIXES, *VIDEO_FOURCC))
        raise SinkError(
            f"{text}: unknown output type {Path(path).suffix or '(no suffix)'!r} (valid: {valid})"
        )
    options: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        allowed = SINK_OPTIONS[kind]
        if k not in allowed:
            raise SinkError(f"{text}: unknown option {k!r} (valid for {kind}: {', '.join(allowed)})")
        if k == "kind":
            if v not in JSONL_KINDS:
                raise SinkError(f"{text}: kind={v!r} must be one of {', '.join(JSONL_KINDS)}")
            options[k] = v
        elif k == "rotate":
            options[k] = parse_size(v, text)
        elif k == "keep":
            if not v.isdigit():
                raise SinkError(f"{text}: keep={v!r} must be a whole number of old files (0 or more)")
            options[k] = int(v)
        elif k == "segment":
            options[k] = parse_duration(v, text)
    if "keep" in options and "rotate" not in options:
        raise SinkError(f"{text}: keep= needs rotate=SIZE")
    return SinkURI(text, kind, path, options)


def check_sink(uri: SinkURI) -> SinkURI:
    """Refuse what parses but is not in this version (raises :class:`SinkError`); ``uri`` otherwise."""
    if uri.options.get("kind") == "events":
        raise SinkError(f"{uri.text}: events come with tracking (not in this version); use kind=detections")
    if "segment" in uri.options:
        raise SinkError(f"{uri.text}: segment= comes with the hardening issue (not in this version)")
    return uri


def camera_slug(name: str) -> str:
    """A source name as a safe file-name fragment: no scheme, credentials, query or folders."""
    scheme, sep, rest = str(name).partition("://")
    if not sep:
        scheme, rest = "", str(name)
    rest = rest.split("?", 1)[0]  # no query
    if sep:
        rest = rest.rsplit("@", 1)[-1]  # no user:password@
    if scheme.lower() in ("", "file", "v4l2"):
        p = Path(rest.rstrip("/"))
        rest = p.stem if p.suffix else p.name
    elif scheme.lower() == "csi":
        rest = f"csi{rest}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", rest).strip("._-")[:80]
    return slug or "source"


def sink_path(uri: SinkURI, camera: str = "") -> Path:
    """``uri``'s path with its placeholders filled in."""

    def fill(m: re.Match[str]) -> str:
        if m.group(1) not in PLACEHOLDERS:
            valid = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            raise SinkError(f"{uri.text}: unknown placeholder {m.group(0)} (valid: {valid})")
        return camera_slug(camera)

    return Path(_PLACEHOLDER.sub(fill, uri.path)).expanduser()


# ------------------------------------------------------------------------------------------ sinks
@dataclass
class SinkReport:
    """What one sink wrote: ``count`` ``unit`` (lines, frames) to ``path``."""

    path: Path
    kind: str
    count: int
    unit: str
    written: bool = True
    note: str = ""

    def line(self) -> str:
        if not self.written:
            return f"{self.path}: nothing written (no frames)"
        return f"wrote {self.path} ({self.count} {self.unit}{', ' + self.note if self.note else ''})"


class Sink:
    """One output of the loop. ``needs_records`` / ``needs_image``: what :meth:`write` wants (the loop
    builds the detection records and the annotated image only when some sink or window needs them)."""

    path: Path
    needs_records = False
    needs_image = False

    def write(self, frame: Frame, records: list[dict[str, Any]], annotated: np.ndarray | None) -> None:
        raise NotImplementedError

    def close(self) -> SinkReport:
        raise NotImplementedError


class JsonlSink(Sink):
    """Detections as JSON lines, appended to ``path`` (``tail -f`` follows it), flushed per frame.

    ``rotate`` (bytes): before a frame's lines would take the file past it, the file becomes
    ``path.1`` (``path.1`` -> ``path.2`` ..., the oldest beyond ``keep`` dropped; ``keep=0``: none kept)
    and a new file starts; a frame's lines are never split, so one frame larger than ``rotate`` still goes
    whole into a fresh file.
    """

    needs_records = True

    def __init__(self, path: Path, rotate: int | None = None, keep: int = DEFAULT_KEEP) -> None:
        self.path, self.rotate, self.keep = Path(path), rotate, int(keep)
        self.lines = self.rotations = self.size = 0
        self.fh: BinaryIO | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        try:
            self.fh = open(self.path, "ab")  # noqa: SIM115 - closed in close()
            self.size = os.fstat(self.fh.fileno()).st_size
        except OSError as e:
            raise SinkError(f"{self.path}: cannot write ({e.strerror or e})") from None

    def _rotate(self) -> None:
        assert self.fh is not None
        self.fh.close()
        if self.keep > 0:
            for i in range(self.keep - 1, 0, -1):
                older = Path(f"{self.path}.{i}")
                if older.exists():
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            self.path.unlink(missing_ok=True)
        self.rotations += 1
        self._open()

    def write(self, frame: Frame, records: list[dict[str, Any]], annotated: np.ndarray | None = None) -> None:
        if self.fh is None or not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        try:
            if self.rotate is not None and self.size > 0 and self.size + len(data) > self.rotate:
                self._rotate()
            assert self.fh is not None
            self.fh.write(data)
            self.fh.flush()
        except OSError as e:
            raise SinkError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self.size += len(data)
        self.lines += len(records)

    def close(self) -> SinkReport:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        note = f"rotated {self.rotations}x" if self.rotations else ""
        return SinkReport(self.path, "jsonl", self.lines, "lines", note=note)


class VideoSink(Sink):
    """An annotated video: written to a temporary file beside ``path``, renamed onto it by :meth:`close`.

    Frames of another size than the first are resized to it (a folder of mixed images).
    """

    needs_image = True

    def __init__(self, path: Path, fps: float) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in VIDEO_FOURCC:
            raise SinkError(f"{self.path}: a video output needs one of {', '.join(VIDEO_FOURCC)}")
        self.fps = float(fps)
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self.tmp: Path | None = None
        self.writer: Any = None

    def write(self, frame: Frame | None, records: Any, annotated: np.ndarray | None) -> None:
        import cv2
        import numpy as np

        if annotated is None:
            raise SinkError(f"{self.path}: a video output needs the annotated frame")
        bgr = annotated
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=f".partial{self.path.suffix}",
                                       dir=self.path.parent)  # fmt: skip
            os.close(fd)
            self.tmp = Path(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes 0600; the video is an ordinary file
            h, w = bgr.shape[:2]
            self.size = (w, h)
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_FOURCC[self.path.suffix.lower()])
            self.writer = cv2.VideoWriter(str(self.tmp), fourcc, self.fps, self.size)
            if not self.writer.isOpened():
                self.writer = None
                self.tmp.unlink(missing_ok=True)
                raise SinkError(
                    f"{self.path}: this OpenCV cannot encode {self.path.suffix} video; try .avi (MJPG)"
                )
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(np.ascontiguousarray(bgr))
        self.frames += 1

    def close(self) -> SinkReport:
        """Finish the file and move it to ``path`` (nothing is written when no frame came)."""
        if self.writer is None:
            return SinkReport(self.path, "video", 0, "frames", written=False)
        self.writer.release()
        self.writer = None
        assert self.tmp is not None
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return SinkReport(self.path, "video", self.frames, "frames")


def open_sink(uri: str | SinkURI, *, camera: str = "", fps: float | None = None) -> Sink:
    """Open the output at ``uri`` (a :class:`SinkURI` from :func:`parse_sink`, or its text): ``camera`` fills
    ``{camera}``, ``fps`` is a video's rate (:data:`DEFAULT_FPS` when None)."""
    u = check_sink(uri if isinstance(uri, SinkURI) else parse_sink(uri))
    path = sink_path(u, camera)
    if u.kind == "jsonl":
        return JsonlSink(path, rotate=u.options.get("rotate"), keep=u.options.get("keep", DEFAULT_KEEP))
    return VideoSink(path, fps or DEFAULT_FPS)


def sink_paths(uris: list[SinkURI], camera: str = "") -> list[Path]:
    """The files ``uris`` write to (placeholders filled, refusals checked); the same file twice is refused."""
    seen: dict[Path, str] = {}
    for u in uris:
        path = sink_path(check_sink(u), camera)
        key = path.resolve()
        if key in seen:
            raise SinkError(f"{u.text}: the same file as {seen[key]} (an output given twice)")
        seen[key] = u.text
    return [sink_path(u, camera) for u in uris]


def open_sinks(uris: list[SinkURI], *, camera: str = "", fps: float | None = None) -> list[Sink]:
    """Open every output (checked first by :func:`sink_paths`); on a failure the ones open are closed."""
    sink_paths(uris, camera)
    sinks: list[Sink] = []
    try:
        for u in uris:
            sinks.append(open_sink(u, camera=camera, fps=fps))
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return sinks


__all__ = [
    "DEFAULT_FPS",
    "VIDEO_FOURCC",
    "JsonlSink",
    "Sink",
    "SinkError",
    "SinkReport",
    "SinkURI",
    "VideoSink",
    "camera_slug",
    "check_sink",
    "detection_records",
    "open_sink",
    "open_sinks",
    "parse_sink",
    "sink_path",
    "sink_paths",
]
