"""Outputs of the live loop, opened by URI through one factory, :func:`open_sink`.

| URI | what |
|---|---|
| ``x.jsonl`` (``?kind=detections``) | one JSON line per detection, appended (a restart keeps the history), written per frame |
| ``x.jsonl?rotate=100MB&keep=5`` | the same, rotated before a write would take it past the size (K/M/G = 1024-based); old files ``x.jsonl.1`` (newest) .. ``x.jsonl.5``; a frame's lines never straddle two files |
| ``x.jsonl?rotate=daily&keep=30`` | the same, one file a day (local time; ``TZ=UTC`` for UTC): at the first write of a new day ``x.jsonl`` becomes ``x.2026-11-30.jsonl`` (the day its lines were written), ``keep`` such files (glob ``x.*.jsonl``) |
| ``out.mkv`` / ``out.avi`` | the annotated video, written under its own name: a kill or power cut leaves it playable up to its last written part |
| ``out.mp4`` (``.m4v``, ``.mov``) | the annotated video, written under a temporary name and renamed at the end (an .mp4 cut short does not play) |
| ``out.mkv?segment=10m&keep=144`` | the video in segments ``out-20261130-210000.mkv`` (local start time; sorted by name = by time; glob ``out-*.mkv``), each finished (fsynced) when the next starts; a crash loses at most the open segment's unflushed end; ``keep`` bounds how many stay (oldest removed). ``.mkv`` / ``.avi`` only |
| ``x.jsonl?kind=events`` | the tracks' events (enter, identified, changed, leave), one JSON line each |
| ``mqtt://[user:pw@]host[:port][/prefix]`` (``mqtts://``: TLS) | events, a retained presence state per identity and camera, Home Assistant discovery (``mocha_edge.deploy.notify``; ``?snapshot=1``, ``?discovery=0`` ...) |
| ``http(s)://host/path[?query][#options]`` | a webhook: each event POSTed as JSON, retried with backoff (``#batch=1&tries=5&timeout=5``) |

``{camera}`` in a path is replaced by the source's name as a safe file-name fragment (``clip.mp4`` ->
``clip``, ``rtsp://user:pw@cam1:8554/live`` -> ``cam1_8554_live``). The network outputs (``mqtt://``,
``http(s)://``) write no file: they queue events in memory and deliver them from a thread, so a slow or dead
broker or server never stalls the loop (dropped events counted; ``mocha_edge.deploy.notify``). Anything
else unknown, or malformed, is a one-line :class:`SinkError` naming the URI (its password, if any,
redacted). Every sink has ``write(frame, records, annotated)``, ``write_events(frame, events)`` and
``close() -> SinkReport``.

Failing writes (full disk, I/O error) neither stop the loop nor lose lines silently: the sink pauses with
one message naming the file and the error, retries every :data:`RETRY_EVERY` seconds and says when it
resumes. A JSON-lines sink holds the lines meanwhile (up to :data:`BUFFER_LIMIT` bytes; beyond, the oldest
frames' lines are dropped and counted) and writes them in order once it can. A video sink drops the frames
of the pause (counted); as OpenCV's writer reports no write error, it also pauses while its disk has less
than :data:`MIN_FREE` bytes free. The :class:`SinkReport` counts what was written, dropped, and held
unwritten at the end. Messages go to the ``log`` callable given to :func:`open_sinks` (stderr by default).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from mocha_edge.errors import MochaError

if TYPE_CHECKING:
    import numpy as np

    from mocha_edge.deploy.sources import Frame
    from mocha_edge.deploy.tracking import Event

VIDEO_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
KILL_SAFE = (".mkv", ".avi")  # play when cut short (kill -9 measured in tests/test_sinks_hardening.py)
DEFAULT_FPS = 10.0  # video rate when the source has none (folders, images)
JSONL_SUFFIXES = (".jsonl",)
SINK_OPTIONS = {"jsonl": ("kind", "rotate", "keep"), "video": ("segment", "keep")}
JSONL_KINDS = ("detections", "events")
DEFAULT_KEEP = 5
DAILY = "daily"
RETRY_EVERY = 5.0  # seconds between the attempts of a paused sink
BUFFER_LIMIT = 4 * 2**20  # bytes of JSON lines a paused sink holds (about 20k detections)
MIN_FREE = 64 * 2**20  # a video sink pauses below this many free bytes on its disk
SEGMENT_TIME = "%Y%m%d-%H%M%S"  # local time of a segment's start, in its name
NETWORK_SCHEMES = ("mqtt", "mqtts", "http", "https")  # mocha_edge.deploy.notify
NETWORK_KINDS = ("mqtt", "webhook")  # outputs that write no file
PLACEHOLDERS = ("camera",)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{(\w*)\}")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


Log = Callable[[str], None]


class SinkError(MochaError):
    """An output cannot be opened or written (bad path, codec, URI)."""


def log_stderr(message: str) -> None:
    """The default ``log`` of the sinks: the message on standard error."""
    print(message, file=sys.stderr, flush=True)


def _shown(text: str) -> str:
    """``text`` fit for a message: a password or token in it redacted."""
    from mocha_edge.deploy.sources import redact_uri

    return redact_uri(text)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def detection_records(
    frame: Frame, dets: Any, class_names: list[str], identity_names: list[str]
) -> list[dict[str, Any]]:
    """The JSON-lines records of one frame: one per detection (schema in the module doc of ``run``)."""
    out = []
    tids = getattr(dets, "track_ids", None)
    for i in range(len(dets.scores)):
        ident = int(dets.identity[i])
        c = int(dets.cls[i])
        out.append(
            {
                "source": frame.source_name,
                "frame": frame.index,
                "t": round(float(frame.t), 6),
                "box_xyxy": [_finite(round(float(v), 2)) for v in dets.boxes[i]],
                "cls": class_names[c] if 0 <= c < len(class_names) else str(c),
                "score": _finite(round(float(dets.scores[i]), 5)),
                "identity": identity_names[ident] if 0 <= ident < len(identity_names) else None,
                "similarity": _finite(round(float(dets.similarity[i]), 5)),
                "track_id": int(tids[i]) if tids is not None and int(tids[i]) >= 0 else None,
            }
        )
    return out


# ------------------------------------------------------------------------------------------ URIs
@dataclass(frozen=True)
class SinkURI:
    """A parsed output address. ``kind``: jsonl | video | mqtt | webhook; ``path``: the file (may still hold
    ``{camera}``), or for a network output its redacted address; ``options`` of a network output hold its
    parsed parts (credentials too: never show them, show :attr:`shown`)."""

    text: str  # as the user wrote it
    kind: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def shown(self) -> str:
        """``text`` for messages (credentials redacted)."""
        return _shown(self.text)


def parse_size(value: str, text: str) -> int:
    """``100MB``, ``512K``, ``1G``, ``2048`` (bytes) -> bytes (1024-based)."""
    m = _SIZE.match(value)
    if m is None or float(m.group(1)) <= 0:
        raise SinkError(f"{text}: rotate={value!r} is not a size (e.g. 100MB, 512K, 1G) or daily")
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
    shown = _shown(text)
    if alias == "--jsonl":
        return SinkURI(text, "jsonl", text, {"kind": "detections"})
    if alias == "--save":
        if _sink_kind(text) != "video":
            raise SinkError(f"{shown}: --save needs one of {', '.join(VIDEO_FOURCC)}")
        return SinkURI(text, "video", text)
    m = _SCHEME.match(text)
    scheme, rest = (m.group(1).lower(), text[m.end() :]) if m else ("", text)
    if scheme in NETWORK_SCHEMES:
        from mocha_edge.deploy.notify import parse_network

        return parse_network(text, shown)
    if scheme and scheme != "file":
        raise SinkError(
            f"{shown}: unknown output scheme {scheme!r} (valid: a path, file://, mqtt://, mqtts://, http://, "
            "https://)"
        )
    path, query = (rest if scheme else text), ""
    if "?" in path:  # a query when what precedes it is a known output; else "?" is part of the name
        head, _, tail = path.rpartition("?")
        if _sink_kind(head) is not None:
            path, query = head, tail
    kind = _sink_kind(path)
    if kind is None:
        valid = ", ".join((*JSONL_SUFFIXES, *VIDEO_FOURCC))
        raise SinkError(
            f"{shown}: unknown output type {Path(path).suffix or '(no suffix)'!r} (valid: {valid})"
        )
    options: dict[str, Any] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        allowed = SINK_OPTIONS[kind]
        if k not in allowed:
            raise SinkError(f"{shown}: unknown option {k!r} (valid for {kind}: {', '.join(allowed)})")
        if k == "kind":
            if v not in JSONL_KINDS:
                raise SinkError(f"{shown}: kind={v!r} must be one of {', '.join(JSONL_KINDS)}")
            options[k] = v
        elif k == "rotate":
            options[k] = DAILY if v.strip().lower() == DAILY else parse_size(v, shown)
        elif k == "keep":
            if not v.isdigit():
                raise SinkError(f"{shown}: keep={v!r} must be a whole number of old files (0 or more)")
            options[k] = int(v)
        elif k == "segment":
            options[k] = parse_duration(v, shown)
    if "keep" in options and not ({"rotate", "segment"} & options.keys()):
        need = "rotate=SIZE or rotate=daily" if kind == "jsonl" else "segment=DURATION"
        raise SinkError(f"{shown}: keep= needs {need}")
    suffix = Path(path).suffix.lower()
    if "segment" in options and suffix not in KILL_SAFE:
        raise SinkError(
            f"{shown}: segment= needs a container that plays when cut short ({', '.join(KILL_SAFE)}); "
            f"an unfinished {suffix} does not play"
        )
    return SinkURI(text, kind, path, options)


def check_sink(uri: SinkURI) -> SinkURI:
    """Refuse what parses but is not in this version (raises :class:`SinkError`); ``uri`` otherwise."""
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
            raise SinkError(f"{uri.shown}: unknown placeholder {m.group(0)} (valid: {valid})")
        return camera_slug(camera)

    return Path(_PLACEHOLDER.sub(fill, uri.path)).expanduser()


# ------------------------------------------------------------------------------------------ sinks
@dataclass
class SinkReport:
    """What one sink wrote: ``count`` ``unit`` (lines, frames) to ``path``; ``dropped``: lost while paused
    (a full memory buffer, video frames); ``buffered``: held in memory and still unwritten when it closed
    (lost too); ``pauses``: how many times writing failed and paused."""

    path: Path
    kind: str
    count: int
    unit: str
    written: bool = True
    note: str = ""
    buffered: int = 0
    dropped: int = 0
    pauses: int = 0

    def line(self) -> str:
        extra = [self.note] if self.note else []
        if self.pauses:
            extra.append(f"paused {self.pauses}x")
        if self.dropped:
            extra.append(f"{self.dropped} {self.unit} dropped")
        if self.buffered:
            extra.append(f"{self.buffered} {self.unit} NOT written")
        if not self.written:
            return f"{self.path}: nothing written (no frames{''.join(', ' + e for e in extra)})"
        return f"wrote {self.path} ({self.count} {self.unit}{''.join(', ' + e for e in extra)})"


class Sink:
    """One output of the loop. ``needs_records`` / ``needs_image``: what :meth:`write` wants (the loop
    builds the detection records and the annotated image only when some sink or window needs them);
    ``needs_events``: the sink takes the tracks' events (:class:`~mocha_edge.deploy.tracking.Event`) through
    :meth:`write_events`, called once per frame (with an empty list when nothing happened)."""

    path: Path
    needs_records = False
    needs_image = False
    needs_events = False

    def write(self, frame: Frame, records: list[dict[str, Any]], annotated: np.ndarray | None) -> None:
        raise NotImplementedError

    def write_events(self, frame: Frame, events: list[Event]) -> None:
        """The events of one frame (sinks with ``needs_events``)."""

    def close(self) -> SinkReport:
        raise NotImplementedError


def local_day(t: float) -> str:
    """The local date of Unix time ``t``, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.localtime(t))


def _why(e: BaseException) -> str:
    """The one-line reason of ``e`` (an OSError's strerror: "No space left on device")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


class _Pause:
    """The pause/retry state a sink shares: one message when it starts, one when writing works again."""

    def __init__(self, path: Path, log: Log, clock: Callable[[], float], retry_every: float) -> None:
        self.path, self.log, self.clock, self.retry_every = path, log, clock, float(retry_every)
        self.error: str | None = None  # why it is paused; None: writing
        self.since = self.retry_at = 0.0
        self.count = 0
        self.dropped_before = 0  # the sink's dropped count when the pause began

    def due(self) -> bool:
        """Whether writing may be tried now (not paused, or the next retry is due)."""
        return self.error is None or self.clock() >= self.retry_at

    def pause(self, why: str, what: str, dropped: int) -> None:
        now = self.clock()
        self.retry_at = now + self.retry_every
        if self.error is None:
            self.error, self.since, self.dropped_before = why, now, dropped
            self.count += 1
            self.log(f"{self.path}: {why}; paused: {what}, retrying every {self.retry_every:g} s")

    def resume(self, done: str, dropped: int) -> None:
        if self.error is None:
            return
        lost = dropped - self.dropped_before
        self.log(
            f"{self.path}: writing again after {self.clock() - self.since:.0f} s ({done}"
            f"{f', {lost} dropped' if lost else ''})"
        )
        self.error = None


class JsonlSink(Sink):
    """Detections as JSON lines, appended to ``path`` (``tail -f`` follows it), written per frame.

    ``rotate`` (bytes): before a frame's lines would take the file past it, the file becomes
    ``path.1`` (``path.1`` -> ``path.2`` ..., the oldest beyond ``keep`` dropped; ``keep=0``: none kept)
    and a new file starts; a frame's lines are never split, so one frame larger than ``rotate`` still goes
    whole into a fresh file. ``rotate="daily"``: at the first frame of a later local day than the file's
    lines (an existing file: its modification day), the file becomes ``stem.YYYY-MM-DD.jsonl`` (that
    day), ``keep`` of those kept; a clock going back never rotates.

    A failing write pauses the sink (see the module doc): the frames' lines wait in memory, in order, up to
    ``buffer_limit`` bytes (beyond: the oldest frames dropped, counted), and are written by the first
    retry that works (every ``retry_every`` seconds of ``clock``, at a write or at :meth:`close`).
    """

    needs_records = True

    def __init__(
        self,
        path: Path,
        rotate: int | str | None = None,
        keep: int = DEFAULT_KEEP,
        *,
        kind: str = "detections",
        log: Log | None = None,
        clock: Callable[[], float] = time.time,
        retry_every: float = RETRY_EVERY,
        buffer_limit: int = BUFFER_LIMIT,
    ) -> None:
        if isinstance(rotate, str) and rotate != DAILY:
            raise SinkError(f"{path}: rotate={rotate!r} must be a size in bytes or {DAILY!r}")
        if kind not in JSONL_KINDS:
            raise SinkError(f"{path}: kind={kind!r} must be one of {', '.join(JSONL_KINDS)}")
        self.kind = kind  # detections: one line per detection; events: one line per track event
        self.needs_records, self.needs_events = kind == "detections", kind == "events"
        self.path, self.rotate, self.keep = Path(path), rotate, int(keep)
        self.clock, self.buffer_limit = clock, int(buffer_limit)
        self.log = log or log_stderr
        self.lines = self.rotations = self.size = self.dropped = 0
        self.fh: Any = None  # an unbuffered FileIO: what it reports written is in the file
        self.pending: deque[tuple[bytes, int, float]] = deque()  # (lines, how many, clock) per frame
        self.pending_bytes = 0
        self.offset = 0  # bytes of pending[0] already in the file (a write cut short)
        self.lines_at_pause = 0
        self.state = _Pause(self.path, self.log, clock, retry_every)
        self.closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        except OSError as e:
            raise SinkError(f"{self.path}: cannot write ({_why(e)})") from None
        self.day = local_day(os.stat(self.path).st_mtime) if self.size else None  # of the file's lines

    def _open(self) -> None:
        self.fh = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self.size = os.fstat(self.fh.fileno()).st_size

    def _close_fh(self) -> None:
        fh, self.fh = self.fh, None
        if fh is not None:
            fh.close()

    def dated(self, day: str, n: int = 0) -> Path:
        """The name of the daily file of ``day`` (``n``: a second one of the same day)."""
        return self.path.with_name(f"{self.path.stem}.{day}{f'.{n}' if n else ''}{self.path.suffix}")

    def dated_files(self) -> list[Path]:
        """The daily files of this output, oldest first."""
        pat = re.compile(
            rf"{re.escape(self.path.stem)}\.(\d{{4}}-\d\d-\d\d)(?:\.(\d+))?{re.escape(self.path.suffix)}"
        )
        found = [(m.group(1), int(m.group(2) or 0), p) for p in self.path.parent.iterdir()
                 if (m := pat.fullmatch(p.name))]  # fmt: skip
        return [p for *_, p in sorted(found)]

    def _rotate_sized(self) -> None:
        self._close_fh()
        if self.keep > 0:
            for i in range(self.keep - 1, 0, -1):
                older = Path(f"{self.path}.{i}")
                if older.exists():
                    os.replace(older, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            self.path.unlink(missing_ok=True)
        self.rotations, self.size = self.rotations + 1, 0

    def _rotate_daily(self, day: str) -> None:
        assert self.day is not None
        self._close_fh()
        n = 0
        while self.dated(self.day, n).exists():  # only when a clock went back and forth: never overwrite
            n += 1
        os.replace(self.path, self.dated(self.day, n))
        self.rotations, self.size, self.day = self.rotations + 1, 0, day
        for old in self.dated_files()[: max(0, len(self.dated_files()) - self.keep)]:
            old.unlink(missing_ok=True)

    def _before(self, nbytes: int, t: float) -> None:
        """Rotate, when due, before a frame's ``nbytes`` written at clock ``t``."""
        if self.rotate == DAILY:
            day = local_day(t)
            if self.size == 0 or self.day is None:
                self.day = day
            elif day > self.day:
                self._rotate_daily(day)
        elif self.rotate is not None and self.size > 0 and self.size + nbytes > int(self.rotate):
            self._rotate_sized()

    def _drain(self) -> None:
        """Write what is pending, in order; a failure pauses (the rest stays pending)."""
        try:
            while self.pending:
                data, n, t = self.pending[0]
                if self.offset == 0:
                    self._before(len(data), t)
                if self.fh is None:
                    self._open()
                view = memoryview(data)[self.offset :]
                while view:
                    k = self.fh.write(view)
                    if not k:
                        raise OSError(errno.EIO, "the write wrote nothing")
                    self.offset, self.size, view = self.offset + k, self.size + k, view[k:]
                self.pending.popleft()
                self.pending_bytes -= len(data)
                self.offset = 0
                self.lines += n
        except OSError as e:
            held = sum(n for _, n, _ in self.pending)
            if self.state.error is None:
                self.lines_at_pause = self.lines
            self.state.pause(f"cannot write ({_why(e)})",
                             f"holding the lines in memory (up to {_mib(self.buffer_limit)}, {held} now)",
                             self.dropped)  # fmt: skip
            with contextlib.suppress(OSError):  # its error is the one reported above
                self._close_fh()  # reopened by the retry (a remounted disk, a new file)
            return
        self.state.resume(f"{self.lines - self.lines_at_pause} held lines written", self.dropped)

    def _bound(self) -> None:
        """Keep the pending lines within ``buffer_limit`` bytes: drop the oldest whole frames (never one
        partly written, never the newest)."""
        first = 1 if self.offset else 0
        while self.pending_bytes > self.buffer_limit and len(self.pending) > first + 1:
            data, n, _ = self.pending[first]
            del self.pending[first]
            self.pending_bytes -= len(data)
            if self.dropped == self.state.dropped_before:  # the first drop of this pause
                self.log(f"{self.path}: memory buffer full ({_mib(self.buffer_limit)}): dropping the oldest "
                         "held lines until writing works again")  # fmt: skip
            self.dropped += n

    def write(self, frame: Frame, records: list[dict[str, Any]], annotated: np.ndarray | None = None) -> None:
        if self.closed:
            return
        if records:
            # allow_nan=False: a NaN that got this far is a fault of this frame, never a line that is not JSON
            data = "".join(
                json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records
            ).encode()
            self.pending.append((data, len(records), self.clock()))
            self.pending_bytes += len(data)
            self._bound()
        if self.pending and self.state.due():
            self._drain()

    def write_events(self, frame: Frame, events: list[Event]) -> None:
        if self.needs_events:
            self.write(frame, [e.record() for e in events])

    def close(self) -> SinkReport:
        """Write what is held (one last try), close the file, and report."""
        if not self.closed:
            self.closed = True
            if self.pending:
                self._drain()
            held = sum(n for _, n, _ in self.pending)
            if held:
                self.log(f"{self.path}: {self.state.error} at the end; {held} held lines are lost")
            try:
                self._close_fh()
            except OSError as e:
                self.log(f"{self.path}: closing failed ({_why(e)}); the last lines may be missing")
        held = sum(n for _, n, _ in self.pending)
        note = f"rotated {self.rotations}x" if self.rotations else ""
        return SinkReport(self.path, "jsonl", self.lines, "lines", note=note, buffered=held,
                          dropped=self.dropped, pauses=self.state.count)  # fmt: skip


def free_bytes(path: Path) -> int:
    """Bytes free to an ordinary user on the file system of ``path`` (or of its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


class VideoSink(Sink):
    """An annotated video. ``.mkv`` / ``.avi`` (:data:`KILL_SAFE`) are written under their own name (what a
    kill leaves plays); others under a temporary name beside ``path``, renamed onto it by :meth:`close`.

    ``segment`` (seconds of ``clock``): one file per segment, ``stem-YYYYmmdd-HHMMSS.suffix`` (local time of
    its start; a name taken moves on a second), finished and fsynced when the next starts; ``keep``: the
    newest that many segment files of this output stay (older ones, earlier runs' included, are removed).
    Frames of another size than the first are resized to it (a folder of mixed images).

    Faults pause the sink (frames dropped and counted, a retry every ``retry_every`` s): a write or a new
    segment failing, or less than ``min_free`` bytes free on its disk (``free_space``, checked as often).
    """

    needs_image = True

    def __init__(
        self,
        path: Path,
        fps: float,
        *,
        segment: float | None = None,
        keep: int | None = None,
        log: Log | None = None,
        clock: Callable[[], float] = time.time,
        retry_every: float = RETRY_EVERY,
        min_free: int = MIN_FREE,
        free_space: Callable[[Path], int] = free_bytes,
    ) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in VIDEO_FOURCC:
            raise SinkError(f"{self.path}: a video output needs one of {', '.join(VIDEO_FOURCC)}")
        if segment is not None and suffix not in KILL_SAFE:
            raise SinkError(f"{self.path}: segment= needs one of {', '.join(KILL_SAFE)}")
        self.fps, self.segment, self.keep = float(fps), segment, keep
        self.in_place = suffix in KILL_SAFE
        self.clock, self.min_free, self.free_space = clock, int(min_free), free_space
        self.log = log or log_stderr
        self.frames = self.dropped = 0
        self.size: tuple[int, int] | None = None
        self.tmp: Path | None = None  # the file being written (the temporary name, or the final one)
        self.target: Path | None = None  # where it ends up
        self.segments: list[Path] = []  # the files this sink started, in order
        self.started = 0.0  # clock at the open file's start
        self.writer: Any = None
        self.state = _Pause(self.path, self.log, clock, retry_every)
        self.check_at = -math.inf  # next free-space check

    def segment_files(self) -> list[Path]:
        """This output's segment files on disk (any run), oldest first."""
        pat = re.compile(rf"{re.escape(self.path.stem)}-\d{{8}}-\d{{6}}{re.escape(self.path.suffix)}")
        if not self.path.parent.is_dir():
            return []
        return sorted(p for p in self.path.parent.iterdir() if pat.fullmatch(p.name))

    def _segment_name(self, t: float) -> Path:
        while True:
            p = self.path.with_name(
                f"{self.path.stem}-{time.strftime(SEGMENT_TIME, time.localtime(t))}{self.path.suffix}"
            )
            if not p.exists() and p not in self.segments:
                return p
            t += 1.0

    def _start(self, now: float) -> None:
        import cv2

        self.path.parent.mkdir(parents=True, exist_ok=True)
        target = self._segment_name(now) if self.segment else self.path
        if self.in_place:
            tmp = target
        else:
            fd, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".partial{target.suffix}",
                                        dir=target.parent)  # fmt: skip
            os.close(fd)
            tmp = Path(name)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the video is an ordinary file
        assert self.size is not None
        fourcc = cv2.VideoWriter_fourcc(*VIDEO_FOURCC[self.path.suffix.lower()])
        existed = self.in_place and tmp.exists()  # an earlier run's out.mkv: replaced only by a video
        writer = cv2.VideoWriter(str(tmp), fourcc, self.fps, self.size)
        if not writer.isOpened():
            if not existed:
                tmp.unlink(missing_ok=True)
            if not self.segments:  # the first file: this OpenCV cannot write it at all
                raise SinkError(
                    f"{self.path}: this OpenCV cannot encode {self.path.suffix} video; try .avi (MJPG)"
                )
            raise OSError(errno.EIO, f"cannot start {target.name}")
        self.writer, self.tmp, self.target, self.started = writer, tmp, target, now
        self.segments.append(target)

    def _finish(self) -> None:
        """Finish the open file: trailer, fsync, its final name; then the oldest segments beyond ``keep``."""
        writer, self.writer = self.writer, None
        writer.release()
        assert self.tmp is not None and self.target is not None
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if self.tmp != self.target:
            os.replace(self.tmp, self.target)
        if self.segment and self.keep is not None:
            for old in self.segment_files()[: max(0, len(self.segment_files()) - self.keep)]:
                if old != self.target:
                    old.unlink(missing_ok=True)

    def _space_problem(self) -> str | None:
        try:
            free = self.free_space(self.path.parent)
        except OSError as e:
            return f"cannot check its disk ({_why(e)})"
        return (
            f"only {_mib(free)} free on its disk (< {_mib(self.min_free)})" if free < self.min_free else None
        )

    def write(self, frame: Frame | None, records: Any, annotated: np.ndarray | None) -> None:
        import cv2
        import numpy as np

        if annotated is None:
            raise SinkError(f"{self.path}: a video output needs the annotated frame")
        if not self.state.due():
            self.dropped += 1
            return
        now = self.clock()
        if self.state.error is not None or now >= self.check_at:
            self.check_at = now + self.state.retry_every
            why = self._space_problem()
            if why is not None:
                self.state.pause(why, "frames are dropped", self.dropped)
                self.dropped += 1
                return
        bgr = annotated
        if self.size is None:
            self.size = (bgr.shape[1], bgr.shape[0])
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        try:
            if self.writer is not None and self.segment and now - self.started >= self.segment:
                self._finish()
            if self.writer is None:
                self._start(now)
            self.writer.write(np.ascontiguousarray(bgr))
        except (OSError, cv2.error) as e:
            self.state.pause(f"cannot write ({_why(e)})", "frames are dropped", self.dropped)
            self.dropped += 1
            return
        self.frames += 1
        self.state.resume("recording", self.dropped)

    def close(self) -> SinkReport:
        """Finish the open file (nothing is written when no frame came)."""
        if self.writer is not None:
            try:
                self._finish()
            except OSError as e:
                raise SinkError(f"{self.target}: cannot finish the video ({_why(e)})") from None
        counts = {"dropped": self.dropped, "pauses": self.state.count}
        if not self.segments:
            return SinkReport(self.path, "video", 0, "frames", written=False, **counts)
        note = (
            f"{len(self.segments)} segments, last {self.segments[-1].name}" if len(self.segments) > 1 else ""
        )
        return SinkReport(self.segments[0], "video", self.frames, "frames", note=note, **counts)


def open_sink(
    uri: str | SinkURI,
    *,
    camera: str = "",
    fps: float | None = None,
    log: Log | None = None,
    clock: Callable[[], float] = time.time,
) -> Sink:
    """Open the output at ``uri`` (a :class:`SinkURI` from :func:`parse_sink`, or its text): ``camera`` fills
    ``{camera}``, ``fps`` is a video's rate (:data:`DEFAULT_FPS` when None); ``log`` gets the pause/resume
    messages (stderr by default); ``clock`` times retries, daily files and segments."""
    u = check_sink(uri if isinstance(uri, SinkURI) else parse_sink(uri))
    if u.kind in NETWORK_KINDS:
        from mocha_edge.deploy.notify import open_network

        return open_network(u, log=log)
    path = sink_path(u, camera)
    if u.kind == "jsonl":
        return JsonlSink(path, rotate=u.options.get("rotate"), keep=u.options.get("keep", DEFAULT_KEEP),
                         kind=u.options.get("kind", "detections"), log=log, clock=clock)  # fmt: skip
    return VideoSink(path, fps or DEFAULT_FPS, segment=u.options.get("segment"), keep=u.options.get("keep"),
                     log=log, clock=clock)  # fmt: skip


def crash_note(uri: SinkURI, live: bool) -> str | None:
    """A note for an output that a crash would lose whole: an .mp4/.mov/.m4v video of a ``live`` source
    (it plays only once finished); None otherwise."""
    suffix = Path(uri.path).suffix.lower()
    if not live or uri.kind != "video" or suffix in KILL_SAFE:
        return None
    alt = Path(uri.path).with_suffix(".mkv")
    return (
        f"note: {uri.shown} plays only once the run ends cleanly (a kill or a power cut loses it); for a "
        f"camera left running use {alt}, or '{alt}?segment=10m&keep=144' (10-minute files, a day kept)"
    )


def sink_paths(uris: list[SinkURI], camera: str = "") -> list[Path]:
    """The files ``uris`` write to (placeholders filled, refusals checked; network outputs write none); the
    same file twice, or the same broker and prefix or webhook URL twice, is refused."""
    from mocha_edge.deploy.notify import network_key

    seen: dict[Path | str, str] = {}
    files = []
    for u in uris:
        u = check_sink(u)
        if u.kind in NETWORK_KINDS:
            key: Path | str = network_key(u)
            what = "the same broker and prefix" if u.kind == "mqtt" else "the same URL"
        else:
            path = sink_path(u, camera)
            key, what = path.resolve(), "the same file"
            files.append(path)
        if key in seen:
            raise SinkError(f"{u.shown}: {what} as {seen[key]} (an output given twice)")
        seen[key] = u.shown
    return files


def open_sinks(
    uris: list[SinkURI],
    *,
    camera: str = "",
    fps: float | None = None,
    log: Log | None = None,
    clock: Callable[[], float] = time.time,
) -> list[Sink]:
    """Open every output (checked first by :func:`sink_paths`); on a failure the ones open are closed.
    ``log`` / ``clock``: as :func:`open_sink`."""
    sink_paths(uris, camera)
    sinks: list[Sink] = []
    try:
        for u in uris:
            sinks.append(open_sink(u, camera=camera, fps=fps, log=log, clock=clock))
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return sinks


__all__ = [
    "BUFFER_LIMIT",
    "DEFAULT_FPS",
    "KILL_SAFE",
    "MIN_FREE",
    "NETWORK_KINDS",
    "NETWORK_SCHEMES",
    "RETRY_EVERY",
    "VIDEO_FOURCC",
    "JsonlSink",
    "Sink",
    "SinkError",
    "SinkReport",
    "SinkURI",
    "VideoSink",
    "camera_slug",
    "check_sink",
    "crash_note",
    "detection_records",
    "free_bytes",
    "local_day",
    "log_stderr",
    "open_sink",
    "open_sinks",
    "parse_sink",
    "sink_path",
    "sink_paths",
]
