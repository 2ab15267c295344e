"""Several cameras in one ``mocha-edge run``: source names, capture threads, fair frame scheduling.

* ``--source NAME=URI`` (repeatable): ``NAME`` (``[A-Za-z0-9_-]+``) is what comes before the first ``=``,
  unless a ``://`` comes before that ``=`` (``rtsp://h/p?a=b`` and ``clip.mp4?fps=5`` are unnamed). An
  unnamed source is named after its URI (credentials redacted, :func:`~mocha_edge.deploy.sources.redact_uri`).
  Each camera's *label*, :func:`~mocha_edge.deploy.sinks.camera_slug` of its name (``front``, ``clip`` for
  ``a/clip.mp4``, ``csi0``), fills ``{camera}`` in output paths and names it in the status line; labels
  must differ (:func:`camera_specs`: a one-line error otherwise, before anything opens).
* :class:`Capture`: one thread per source reads it continuously. A live source (camera, stream) keeps only
  its newest frame: a frame the loop has not taken when the next one arrives is dropped and counted
  (OpenCV's FFmpeg backend ignores ``CAP_PROP_BUFFERSIZE``, so reading without pause is what keeps an
  RTSP stream from lagging behind). A file keeps every frame, in order: at most :data:`FILE_AHEAD` frames
  are read ahead and the thread waits for the loop (so results on files do not depend on timing).
  Reconnects happen inside the source, on its thread: a camera that drops out stalls no other.
* :class:`Captures`: the loop's side: :meth:`Captures.next` gives the next camera with a frame ready,
  round-robin (after camera *i* is served, the search starts at *i + 1*), so a fast camera or a file never
  starves the others.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mocha_edge.deploy.display import Window
from mocha_edge.errors import MochaError

if TYPE_CHECKING:
    import numpy as np

    from mocha_edge.deploy.sinks import SinkURI
    from mocha_edge.deploy.sources import Frame, Source

NAME = re.compile(r"[A-Za-z0-9_-]+")
FILE_AHEAD = 2  # frames a file's thread reads ahead of the loop (its memory bound)
JOIN_TIMEOUT = 2.0  # seconds to wait for a capture thread at the end (a stalled network read may not return)


class CameraError(MochaError):
    """Sources that cannot run together (a bad or repeated name, an output several cameras would share)."""


class CaptureStopped(Exception):
    """Raised by :meth:`Stopper.sleep` once the capture is stopped: it ends the source's iteration from
    inside a reconnect backoff or a pacing wait (a camera that stays lost never yields a frame)."""


class Stopper:
    """A capture thread's stop: give :meth:`sleep` to the source (``open_source(..., sleep=s.sleep)``) and
    :attr:`event` to its :class:`Capture`; once set, the source's next wait ends its iteration."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def sleep(self, seconds: float) -> None:
        """``time.sleep``, cut short by the stop (then :class:`CaptureStopped`)."""
        if self.event.wait(max(0.0, seconds)) or self.event.is_set():
            raise CaptureStopped


# ------------------------------------------------------------------------------------------ names
def parse_source_arg(text: str) -> tuple[str | None, str]:
    """``"front=rtsp://cam/live"`` -> ``("front", "rtsp://cam/live")``; ``"rtsp://h/p?a=b"`` -> ``(None, ...)``.

    The name is what precedes the first ``=`` when no ``://`` precedes it; it must match ``[A-Za-z0-9_-]+``
    (one-line :class:`CameraError` otherwise). Without such an ``=`` the whole text is the URI."""
    text = str(text).strip()
    eq = text.find("=")
    if eq < 0 or "://" in text[:eq]:
        return None, text
    name, uri = text[:eq].strip(), text[eq + 1 :].strip()
    if "?" in name or "/" in name or "\\" in name:  # clip.mp4?fps=5, ./a=b/clip.mp4: a path, not a name
        return None, text
    from mocha_edge.deploy.sources import redact_uri

    if not NAME.fullmatch(name):
        raise CameraError(
            f"--source {name}={redact_uri(uri)}: camera name {name!r} must be letters, digits, _ or - (NAME=URI)"
        )
    if not uri:
        raise CameraError(f"--source {name}=: no URI after the name (NAME=URI)")
    return name, uri


@dataclass(frozen=True)
class CameraSpec:
    """One source of a run: ``uri`` (as given), ``name`` (the given NAME, else the redacted URI), ``named``
    (a NAME was given) and ``label`` (the name as a file-name fragment: ``{camera}``, the status line)."""

    uri: str
    name: str
    named: bool
    label: str


def camera_specs(sources: Sequence[str]) -> list[CameraSpec]:
    """The cameras of ``--source`` values (``NAME=URI`` or ``URI``), in order; a repeated name, or two
    sources whose labels collide (``a/clip.mp4`` and ``b/clip.mp4``), is a one-line :class:`CameraError`."""
    from mocha_edge.deploy.sinks import camera_slug
    from mocha_edge.deploy.sources import redact_uri

    specs: list[CameraSpec] = []
    seen: dict[str, str] = {}
    for text in sources:
        name, uri = parse_source_arg(text)
        shown = name if name is not None else redact_uri(uri)
        given = f"{name}={redact_uri(uri)}" if name is not None else shown  # never a password
        spec = CameraSpec(uri, shown, name is not None, camera_slug(shown))
        if spec.label in seen:
            why = "the same name" if spec.label == shown else f"the same label {spec.label!r}"
            raise CameraError(
                f"--source {given}: {why} as --source {seen[spec.label]}; give each camera a unique name "
                "(NAME=URI)"
            )
        seen[spec.label] = given
        specs.append(spec)
    return specs


def split_sinks(uris: Sequence[SinkURI], cameras: Sequence[str]) -> tuple[list[SinkURI], list[SinkURI]]:
    """``(per camera, shared)``: an output whose URI holds ``{camera}`` is opened once per camera; one
    without is opened once and shared (its records and events carry the camera). A video needs one file
    per camera: without ``{camera}`` and with several cameras it is a one-line :class:`CameraError`."""
    from mocha_edge.deploy.sinks import sink_paths

    per = [u for u in uris if "{camera}" in u.text]
    shared = [u for u in uris if "{camera}" not in u.text]
    if len(cameras) > 1:
        for u in shared:
            if u.kind == "video":
                p = u.path
                stem, dot, ext = p.rpartition(".")
                alt = f"{stem}-{{camera}}.{ext}" if dot else f"{p}-{{camera}}"
                raise CameraError(
                    f"{u.shown}: {len(cameras)} cameras cannot share one video; put {{camera}} in its "
                    f"path ({alt})"
                )
    for cam in cameras:  # the same file twice (also a shared one and a camera's) is refused
        sink_paths([*per, *shared], cam)
    return per, shared


# ------------------------------------------------------------------------------------------ capture
class Capture:
    """Reads one source on its own thread (module doc). ``live`` sources keep their newest frame (older
    ones are counted in ``dropped``); files keep every frame, at most :data:`FILE_AHEAD` ahead.

    ``cond`` is shared with the other captures of the run: it is notified whenever a frame arrives or a
    source ends. ``ended`` (None while frames may come): ``"end"``, or ``"error: ..."`` (``error`` holds the
    exception; the source's own ``ended`` text when it has one). ``stop_event``: set by :meth:`stop`; by default
    the :attr:`Stopper.event` of the source's ``sleep`` when that is a :meth:`Stopper.sleep` (give one to
    every live source: a stop then ends a camera that stays lost, which otherwise retries for ever)."""

    def __init__(
        self,
        name: str,
        source: Source,
        cond: threading.Condition,
        *,
        stop_event: threading.Event | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name, self.source, self.cond, self.clock = name, source, cond, clock
        self.live = bool(getattr(source, "live", False))
        if stop_event is None:  # the Stopper whose sleep the source was given, if it was
            stopper = getattr(getattr(source, "sleep", None), "__self__", None)
            stop_event = stopper.event if isinstance(stopper, Stopper) else threading.Event()
        self.stop_event = stop_event
        self.slot: deque[tuple[Frame, float]] = deque()  # (frame, clock when read), guarded by cond
        self.dropped = 0  # live: frames replaced before the loop took them
        self.read = 0  # frames read from the source
        self.ended: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"mocha-edge-capture-{name}", daemon=True)

    def start(self) -> Capture:
        self.thread.start()
        return self

    @property
    def done(self) -> bool:
        """The source ended, or was stopped, and every frame read was taken."""
        with self.cond:
            return (self.ended is not None or self.stop_event.is_set()) and not self.slot

    def _put(self, frame: Frame) -> bool:
        """Hand ``frame`` to the loop; False when stopped while waiting for room (files)."""
        item = (frame, self.clock())
        with self.cond:
            if self.stop_event.is_set():
                return False
            if self.live:
                if self.slot:
                    self.slot.popleft()
                    self.dropped += 1
            else:
                while len(self.slot) >= FILE_AHEAD:
                    if self.stop_event.is_set():
                        return False
                    self.cond.wait(0.1)
            self.slot.append(item)
            self.read += 1
            self.cond.notify_all()
        return True

    def _run(self) -> None:
        from mocha_edge.deploy.sources import SourceError

        ended = "end"
        frames = iter(self.source)
        try:
            for frame in frames:
                if self.stop_event.is_set() or not self._put(frame):
                    ended = "stopped"
                    break
            else:
                src_end = getattr(self.source, "ended", None)
                ended = src_end if src_end else "end"
        except CaptureStopped:
            ended = "stopped"
        except SourceError as e:
            self.error, ended = e, f"error: {e}"
        except Exception as e:  # a bug or an unexpected backend error: this camera ends, the others go on
            self.error, ended = e, f"error: {type(e).__name__}: {' '.join(str(e).split())}"
        finally:
            with contextlib.suppress(Exception):
                frames.close()  # type: ignore[attr-defined]
            with self.cond:
                self.ended = ended
                self.cond.notify_all()

    def take(self) -> tuple[Frame, float] | None:
        """The oldest frame waiting (a live source: the newest read) and the clock when it was read."""
        with self.cond:
            if not self.slot:
                return None
            item = self.slot.popleft()
            self.cond.notify_all()  # a file's thread may wait for room
            return item

    def stop(self) -> None:
        """Ask the thread to end (it does after its current read) and drop what waits."""
        self.stop_event.set()
        with self.cond:
            self.slot.clear()
            self.cond.notify_all()

    def join(self, timeout: float = JOIN_TIMEOUT) -> bool:
        """Stop and wait for the thread; False when it is still inside a read (the source is left open)."""
        self.stop()
        if self.thread.is_alive():
            self.thread.join(timeout)
        return not self.thread.is_alive()


class Captures:
    """The captures of a run, served round-robin (module doc)."""

    def __init__(self, captures: Sequence[Capture], cond: threading.Condition) -> None:
        self.captures, self.cond = list(captures), cond
        self._next = 0  # where the next search starts

    def _ready(self) -> tuple[int, Frame, float] | None:
        n = len(self.captures)
        for k in range(n):
            i = (self._next + k) % n
            item = self.captures[i].take()
            if item is not None:
                self._next = (i + 1) % n
                return i, item[0], item[1]
        return None

    @property
    def all_done(self) -> bool:
        return all(c.done for c in self.captures)

    def next(
        self, timeout: float, stop: Callable[[], bool] = lambda: False, poll: float = 0.1
    ) -> tuple[int, Frame, float] | None:
        """``(camera index, frame, clock when read)`` of the next camera with a frame, waiting at most
        ``timeout`` s; None on timeout, when ``stop()`` turns true (checked every ``poll`` s) or when every
        source has ended."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._ready()
            if got is not None:
                return got
            if self.all_done or stop():
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self.cond:
                if not any(c.slot for c in self.captures):
                    self.cond.wait(min(left, poll))

    def close(self, warn: Callable[[str], None]) -> None:
        """Stop every thread, then close the sources whose thread ended (a thread stuck in a read keeps its
        source: closing a capture under a read is not safe; the process exit ends both)."""
        for c in self.captures:
            c.stop()
        for c in self.captures:
            if c.join():
                c.source.close()
            else:
                warn(
                    f"warning: camera {c.name}: its read did not return within {JOIN_TIMEOUT:g} s; left open"
                )


# ------------------------------------------------------------------------------------------ windows
class CameraWindows:
    """One :class:`~mocha_edge.deploy.display.Window` per camera (``mocha-edge: NAME``); :meth:`show` returns
    the key pressed (-1 none) or ``"closed"`` when that window was closed."""

    def __init__(self) -> None:
        self.open: dict[str, Window] = {}

    def show(self, bgr: np.ndarray, camera: str = "") -> int | str:
        title = f"mocha-edge: {camera}" if camera else "mocha-edge"
        if title not in self.open:
            self.open[title] = Window(title)
        return self.open[title].show(bgr)

    def close(self) -> None:
        for w in self.open.values():
            w.close()
        self.open.clear()


__all__ = [
    "FILE_AHEAD",
    "CameraError",
    "CameraSpec",
    "CameraWindows",
    "Capture",
    "CaptureStopped",
    "Captures",
    "Stopper",
    "camera_specs",
    "parse_source_arg",
    "split_sinks",
]
