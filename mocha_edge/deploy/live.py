"""``mocha-edge run``: the live loop. Source -> pipeline -> outputs, with live enrolment and fault handling.

One frame at a time: read (``mocha_edge.deploy.sources``, on the source's own capture thread), detect + embed
+ match (the injected pipeline), track (``--tracker``: one identity per track, events), then the outputs, opened by URI (``--sink``, repeatable; ``mocha_edge.deploy.sinks``): JSON lines (one per
detection, appended, flushed every frame, rotated by size or day), annotated videos (``.mkv``/``.avi`` under
their own name, so a crash leaves them playable; ``.mp4``/``.mov``/``.m4v`` under a temporary name renamed
when the run ends; ``?segment=10m`` splits a recording into timestamped files); a window when a display
exists, and an FPS line with per-stage milliseconds and the latency (a frame's capture to its outputs
written). An output that cannot write (a full disk) pauses, holds its JSON lines in memory and retries, and
says so.

Sources are read by a thread each (:mod:`mocha_edge.deploy.cameras`). A live source (camera, stream) keeps
only its newest frame: frames that arrive while the loop is busy are dropped and counted (``N dropped`` in
the summary), so the loop never works through a backlog (OpenCV's FFmpeg backend ignores the buffer-size
setting; reading without pause is what drains an RTSP stream). A file keeps every frame, in order, read at
most two ahead, so results on files do not depend on timing. Reconnects happen on that thread.

Several cameras: ``--source`` repeated (``front=rtsp://...``: a name, ``[A-Za-z0-9_-]+``, before the first
``=`` when no ``://`` precedes it; an unnamed source is named after its URI; ``--camera N`` / ``--csi N``
repeat and combine with them). One pipeline and one bank serve every camera: the loop takes the cameras'
frames in turn (round-robin; a file or a fast camera never starves the others); each camera has its own
tracker and track identities. An output with ``{camera}`` in its URI is opened per camera (the camera's
name as a file-name fragment); one without is shared, its JSON lines and events carrying ``"camera"``
(records gain ``"camera"`` whenever a source is named or there are several). A video cannot be shared:
without ``{camera}`` it is a one-line error before anything opens. A camera that drops out reconnects on
its own thread while the others go on; a file that ends (or a camera whose source gives up) finishes alone
(its tracks leave); the run ends when every source has ended, or on ``--max-frames`` (frames of every
camera together), ``quit``, a key or a signal. The status line shows each camera's FPS and latency, then
the shared stages; the summary has a line for the totals (and the shared outputs) and one per camera
(frames, detections, dropped, reconnects, events, why it stopped, its outputs and faults).

Live enrolment: ``enroll NAME`` on standard input (read by a background thread, never blocking the loop)
enrols the top-scoring detection of the next frame as a new shot of NAME; with several cameras, the
top-scoring detection over the next frame of each camera that is delivering (those that handled a frame in
the last 2 s; at most 10 s are waited), and ``enroll CAMERA:NAME`` takes that camera's next frame. Key ``e``
in the window does the same for the frame shown (the name is asked on the terminal, or ``obj-N``). The bank
(one for every camera) is saved atomically and the pipeline matches against it from the next frame.

Stopping: end of a file source (or its read error: ``stopped: error: ...`` in the summary), ``--max-frames``,
key ``q``/Esc, a ``quit`` line, or Ctrl-C / SIGINT / SIGTERM / SIGHUP. SIGHUP is what a process gets when
its terminal goes away (an SSH session dropped): its default, ending the process, is made clean here, so a
recording is finalised rather than left as a hidden ``.partial`` file (run under ``nohup`` or ``setsid``
to keep going instead). A signal during frame processing is noted and the loop stops after that frame; a
signal while waiting for a frame stops the wait (within 0.1 s). Either way every output is finalised, a summary printed,
and the exit code is 0: for a camera, Ctrl-C is the normal way to stop. A terminal that went away only
ends the log lines (:class:`~mocha_edge.deploy.console.Console`).

Faults (safe to leave running): an exception while handling one frame does not end the run. Each step is
isolated: the pipeline, the detection records, the annotation, every sink's ``write``, the window, the
live enrolment. A fault is counted under its kind, ``STAGE: ExceptionType`` (``pipeline: RuntimeError``,
``sink events.jsonl: SinkError``), logged at once with its message the first time, then at most one line
per kind per minute with the count since; the summary lists the counts. What can still be written is: after
a pipeline fault the videos and the window get the frame without boxes (a recording keeps its timeline) and
the detection outputs skip it (an ``enroll`` waits for the next frame); a failing sink never stops the
others. A run that can no longer do any work ends instead, so a supervisor restarts it: when every frame
has been *lost* (its detections could not be made, or no output took it) for ``--fail-after`` seconds
(30) and at least 50 frames in a row, the outputs are finalised, the summary printed
(``stopped: failing: ...``) and the exit code is 3 (:data:`EXIT_FAILING`; 1 is kept for what cannot start,
so ``RestartPreventExitStatus=1`` can tell them apart). Occasional faults, however many, never end it:
one good frame starts the count again. The source's own end or error, and Ctrl-C, behave as above.
With several cameras a fault's kind starts with the camera (``front: pipeline: RuntimeError``) and is
counted in that camera's summary; the give-up rule is the process's: one good frame of any camera starts
the count again, so a camera whose frames all fault never ends a run where another works (a camera that
delivers nothing is reconnecting, not failing). A source that raises (a camera that gives up reconnecting,
an unreadable single image) ends its camera with ``stopped: error: ...``; only when every camera has, the
error is raised after the outputs are finalised.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mocha_edge.deploy.console import COMMANDS_HELP, Console, StdinCommands
from mocha_edge.deploy.display import Window, annotate, gui_available
from mocha_edge.deploy.engines import engine_for, list_engines
from mocha_edge.deploy.enroller import LiveEnroller, attach_bank
from mocha_edge.deploy.sinks import (
    JsonlSink,
    Sink,
    SinkReport,
    SinkURI,
    VideoSink,
    check_sink,
    crash_note,
    detection_records,
    open_sinks,
    parse_sink,
    sink_paths,
)
from mocha_edge.errors import MochaError

if TYPE_CHECKING:  # numpy, the bank and the sources load with the command, not with the CLI
    import numpy as np

    from mocha_edge.deploy.cameras import Capture
    from mocha_edge.deploy.pipeline import LivePipeline
    from mocha_edge.deploy.sources import Frame, Source
    from mocha_edge.deploy.tracking import Event, IdentityRule
    from mocha_edge.deploy.web import WebHub

STAGES = ("pre", "infer", "post", "pool", "match", "track")
TRACKER_CHOICES = ("bytetrack", "botsort", "none")  # = tracking.TRACKERS (kept here: the CLI loads no numpy)
FAULT_REPORT_EVERY = 60.0  # seconds: at most one summary line per fault kind in this time
FAIL_AFTER = 30.0  # seconds of nothing but lost frames before the run gives up (--fail-after)
FAIL_FRAMES = 50  # ... and at least this many lost frames in a row (a slow source is not judged on a few)
EXIT_FAILING = 3  # exit code of a run that gave up (persistent faults); 1: it could not start
WAIT_SLICE = 0.5  # seconds the loop waits for a frame before it reads stdin again (no camera delivering)
WEB_SLICE = 0.05  # ... with the web page on: its commands wait no longer than this for a frame-less loop
ENROL_RECENT = 2.0  # `enroll NAME`: cameras that handled a frame this recently are asked (else every one)
ENROL_WAIT = 10.0  # seconds an `enroll` waits for the cameras' next frames before taking what it has
MULTI_HELP = "; with several cameras `enroll NAME` takes the top detection over every camera's next frame, `enroll CAMERA:NAME` one camera's"


class RunError(MochaError):
    """The live loop cannot start (bad output path, no display for --show, ...)."""


class RunFailed(RunError):
    """Every frame faulted for too long (see the module doc): the outputs are finalised; ``summary`` says
    what the run did."""

    exit_code = EXIT_FAILING

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


PipelineFactory = Callable[..., "LivePipeline"]


# ------------------------------------------------------------------------------------------ loop
@dataclass
class RunOptions:
    """Outputs and limits of one run. ``sinks``: output URIs (``mocha_edge.deploy.sinks``); ``save`` and
    ``jsonl`` are aliases (``--save P`` = ``--sink P``, ``--jsonl P`` = ``--sink P?kind=detections``, both
    taken as plain paths)."""

    save: Path | None = None
    jsonl: Path | None = None
    sinks: list[str] = field(default_factory=list)
    show: bool | None = None  # None: a window when a display exists
    max_frames: int | None = None
    fps_every: float = 5.0  # seconds between FPS lines (0: none)
    handle_signals: bool = True  # SIGINT/SIGTERM/SIGHUP stop the loop cleanly (main thread only)
    fail_after: float = FAIL_AFTER  # give up after this many seconds of lost frames only (0: never)
    fail_frames: int = FAIL_FRAMES  # ... and at least this many of them in a row
    tracker: str = "bytetrack"  # bytetrack | botsort | none (per-frame identities)
    rule: IdentityRule | None = None  # how a track's identity is decided (None: the defaults)
    http: str | None = None  # --http [HOST:]PORT: the web page and REST API (mocha_edge.deploy.web)
    http_fps: float = 10.0  # views a second handed to the page at most (only while someone watches)
    http_token: str | None = None  # required from clients on a non-loopback address (None: generated)


@dataclass
class RunSummary:
    """What a run did. With several cameras, ``cameras`` holds one summary per camera (its frames,
    detections, dropped frames, reconnects, events, stop reason, its own outputs and faults) and the fields
    here are the totals (``outputs``: the shared outputs; ``faults``: every kind, camera first)."""

    source: str
    frames: int = 0
    detections: int = 0
    seconds: float = 0.0
    stopped: str = ""
    skipped: int = 0
    reconnects: int = 0
    enrolled: list[str] = field(default_factory=list)
    outputs: list[SinkReport] = field(default_factory=list)  # one per sink, in order
    faults: dict[str, int] = field(
        default_factory=dict
    )  # per kind ("STAGE: ExceptionType"), in first-seen order
    lost: int = 0  # frames whose detections could not be made or that no output took
    events: dict[str, int] = field(default_factory=dict)  # track events made, per kind
    dropped: int = 0  # live frames replaced by a newer one before the loop took them
    latency_ms: float = 0.0  # mean time from a frame's capture to its outputs written
    cameras: list[RunSummary] = field(default_factory=list)  # per camera (several cameras only)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def _details(self) -> list[str]:
        parts = []
        if self.dropped:
            parts.append(f"{self.dropped} dropped (the newest frame kept)")
        if self.skipped:
            parts.append(f"{self.skipped} unreadable skipped")
        if self.reconnects:
            parts.append(f"{self.reconnects} reconnect attempts")
        if self.events:
            parts.append("events: " + ", ".join(f"{k} {n}" for k, n in self.events.items()))
        return parts

    def _faults(self) -> list[str]:
        if not self.faults:
            return []
        kinds = ", ".join(f"{k} x{n}" for k, n in self.faults.items())
        return [f"faults: {kinds} ({self.lost} frame{'s' * (self.lost != 1)} lost)"]

    def lines(self) -> list[str]:
        """The summary as lines: one for one camera; with several, the totals, then one per camera."""
        if not self.cameras:
            parts = [
                f"{self.source}: {self.frames} frames in {self.seconds:.1f} s ({self.fps:.1f} FPS), "
                f"{self.detections} detections; stopped: {self.stopped}",
                *self._details(),
            ]
            if self.enrolled:
                parts.append("enrolled " + ", ".join(self.enrolled))
            parts += self._faults()
            parts.extend(r.line() for r in self.outputs)
            return ["; ".join(parts)]
        head = [
            f"{len(self.cameras)} cameras: {self.frames} frames in {self.seconds:.1f} s ({self.fps:.1f} FPS), "
            f"{self.detections} detections; stopped: {self.stopped}"
        ]
        if self.dropped:
            head.append(f"{self.dropped} dropped")
        if self.enrolled:
            head.append("enrolled " + ", ".join(self.enrolled))
        if self.faults:
            n = sum(self.faults.values())
            head.append(f"{n} fault{'s' * (n != 1)} ({self.lost} frame{'s' * (self.lost != 1)} lost)")
        head.extend(r.line() for r in self.outputs)
        out = ["; ".join(head)]
        for c in self.cameras:
            fps = c.frames / self.seconds if self.seconds > 0 else 0.0
            parts = [
                f"  {c.source}: {c.frames} frames ({fps:.1f} FPS, {c.latency_ms:.0f} ms latency), "
                f"{c.detections} detections; stopped: {c.stopped}",
                *c._details(),
                *c._faults(),
            ]
            parts.extend(r.line() for r in c.outputs)
            out.append("; ".join(parts))
        return out

    def line(self) -> str:
        """:meth:`lines` joined (one line for one camera)."""
        return "\n".join(self.lines())

    def _all_outputs(self) -> list[SinkReport]:
        return [*self.outputs, *(r for c in self.cameras for r in c.outputs)]

    def _first(self, kind: str) -> SinkReport | None:
        return next(
            (r for r in self._all_outputs() if r.kind == kind and (r.written or kind == "jsonl")), None
        )

    @property
    def video(self) -> Path | None:
        """The first video written (None: none)."""
        r = self._first("video")
        return r.path if r is not None else None

    @property
    def video_frames(self) -> int:
        r = self._first("video")
        return r.count if r is not None else 0

    @property
    def jsonl(self) -> Path | None:
        """The first JSON-lines output (None: none)."""
        r = self._first("jsonl")
        return r.path if r is not None else None

    @property
    def jsonl_lines(self) -> int:
        r = self._first("jsonl")
        return r.count if r is not None else 0


def sink_uris(opts: RunOptions) -> list[SinkURI]:
    """The outputs of ``opts``, parsed and checked (one-line :class:`~mocha_edge.deploy.sinks.SinkError`
    naming the URI otherwise): ``--save``, ``--jsonl``, then every ``--sink`` in order."""
    uris = [parse_sink(str(opts.save), alias="--save")] if opts.save is not None else []
    uris += [parse_sink(str(opts.jsonl), alias="--jsonl")] if opts.jsonl is not None else []
    uris += [parse_sink(s) for s in opts.sinks]
    return [check_sink(u) for u in uris]


def _stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that stop the loop cleanly: SIGINT, SIGTERM, and SIGHUP where it exists (POSIX)."""
    hup = getattr(signal, "SIGHUP", None)
    return (signal.SIGINT, signal.SIGTERM) + ((hup,) if hup is not None else ())


class _Stop:
    """SIGINT/SIGTERM/SIGHUP handling: while ``interruptible`` (unused by the loop, which waits for frames in
    0.1 s slices and checks ``requested``) a signal raises
    KeyboardInterrupt; otherwise it is only noted and the loop stops after the current frame."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.interruptible = False
        self.finishing = False  # finalising outputs: signals are ignored
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        again = self.requested is not None
        self.requested = self.requested or signal.Signals(signum).name
        if self.finishing:
            return
        if self.interruptible or again:  # a second Ctrl-C also breaks a stuck frame
            self.interruptible = False
            raise KeyboardInterrupt

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in _stop_signals():
            self._old[s] = signal.signal(s, self._handler)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text[: limit - 3] + "..." if len(text) > limit else text


class FaultLog:
    """Per-frame faults: counted per kind (``STAGE: ExceptionType``); the first of a kind is logged at once
    with its message, later ones at most once per ``every`` seconds per kind, as one line with the count
    since the last line. Also tracks the streak of lost frames behind the give-up rule (module doc)."""

    def __init__(
        self,
        log: Callable[[str], None],
        every: float = FAULT_REPORT_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.every, self.clock = log, every, clock
        self.counts: dict[str, int] = {}
        self._since: dict[str, int] = {}  # faults of the kind not yet in a log line
        self._logged_at: dict[str, float] = {}
        self.last = ""  # the latest fault, as logged
        self.streak = 0  # lost frames in a row
        self.streak_t0 = 0.0  # clock when the streak began

    def record(self, stage: str, e: Exception, frame: int | None) -> None:
        """Count ``e``, raised by ``stage`` on frame number ``frame`` (None: between frames), and log it as
        the rate allows."""
        kind = f"{stage}: {type(e).__name__}"
        msg = _one_line(e) or "(no message)"
        self.last = f"{kind}: {msg}"
        now = self.clock()
        n = self.counts.get(kind, 0) + 1
        self.counts[kind] = n
        if n == 1:
            self._logged_at[kind], self._since[kind] = now, 0
            where = f"frame {frame}: " if frame is not None else ""
            self.log(
                f"warning: {where}{kind}: {msg} (the run goes on; this fault's repeats are "
                f"summarised at most every {self.every:g} s)"
            )
            return
        self._since[kind] += 1
        if now - self._logged_at[kind] >= self.every:
            since, ago = self._since[kind], now - self._logged_at[kind]
            self._logged_at[kind], self._since[kind] = now, 0
            last = f"frame {frame}: " if frame is not None else ""
            self.log(f"warning: {kind}: {since} more in the last {ago:.0f} s ({n} in all; last: {last}{msg})")

    def attempt(self, stage: str, frame: int | None, fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """``(True, fn(*args))``, or ``(False, None)`` with the exception recorded (only ``Exception``:
        KeyboardInterrupt and SystemExit go through)."""
        try:
            return True, fn(*args)
        except Exception as e:
            self.record(stage, e, frame)
            return False, None

    def frame_done(self, lost: bool) -> float:
        """Note whether the frame just handled was lost; the seconds the streak of lost frames has lasted."""
        now = self.clock()
        if not lost:
            self.streak = 0
            return 0.0
        if self.streak == 0:
            self.streak_t0 = now
        self.streak += 1
        return now - self.streak_t0


class _Meter:
    """Frames, per-camera FPS and latency, and mean per-stage milliseconds since the last report."""

    def __init__(self, every: float, cameras: list[str]) -> None:
        self.every, self.cameras = every, cameras
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.t0, self.n, self.ms = now, 0, dict.fromkeys((*STAGES, "read", "out"), 0.0)
        self.per = {c: [0, 0.0] for c in self.cameras}  # camera -> [frames, latency ms summed]

    def add(self, timings: dict[str, float], read_ms: float, out_ms: float) -> None:
        self.n += 1
        for k in STAGES:
            self.ms[k] += float(timings.get(k, 0.0))
        self.ms["read"] += read_ms
        self.ms["out"] += out_ms

    def frame(self, camera: str, latency_ms: float) -> None:
        """A frame of ``camera`` whose outputs were written ``latency_ms`` after its capture."""
        c = self.per[camera]
        c[0] += 1
        c[1] += latency_ms

    def report(self, frame: int) -> str | None:
        now = time.perf_counter()
        frames = sum(c[0] for c in self.per.values())
        if self.every <= 0 or now - self.t0 < self.every or frames == 0:
            return None
        dt = now - self.t0
        n = max(self.n, 1)
        stages = " ".join(f"{k} {self.ms[k] / n:.1f}" for k in (*STAGES, "read", "out"))
        if len(self.per) == 1:
            ((_, (k, lat)),) = self.per.items()
            line = f"{k / dt:.1f} FPS | ms: {stages} | latency {lat / k:.0f} ms | frame {frame}"
        else:
            cams = " | ".join(
                f"{c} {k / dt:.1f} FPS {lat / k:.0f} ms" if k else f"{c} 0.0 FPS"
                for c, (k, lat) in self.per.items()
            )
            line = f"{cams} | stages ms: {stages}"
        self.reset(now)
        return line


@dataclass
class _Camera:
    """One camera of the loop: its source and capture, tracker, identities, outputs and summary."""

    name: str  # records' "camera", events, the summary
    label: str  # {camera}, the status line
    source: Source
    capture: Capture
    summary: RunSummary
    stage: str  # prefix of its fault kinds ("" with one camera)
    tracker: Any = None
    idents: Any = None
    sinks: list[Sink] = field(default_factory=list)  # its own and the shared ones, in --sink order
    own: list[Sink] = field(default_factory=list)
    last_frame: Frame | None = None
    last_at: float = -math.inf  # perf_counter when its last frame was handled
    latency: float = 0.0  # ms, summed
    finished: bool = False  # its source ended or it was stopped (--max-frames)

    @property
    def event_sinks(self) -> list[Sink]:
        return [s for s in self.sinks if s.needs_events]

    def where(self, index: int, several: bool) -> str:
        return f"{self.name} frame {index}" if several else f"frame {index}"


@dataclass
class _EnrolRequest:
    """``enroll NAME``: the top detection over the next frame of each camera in ``waiting``."""

    name: str
    waiting: set[int]
    deadline: float
    best: tuple[np.ndarray, int, float, str] | None = None  # vector, class, score, where
    seen: list[str] = field(default_factory=list)  # the frames looked at
    cameras: list[str] = field(default_factory=list)


def _as_cameras(source: Source | Mapping[str, Source]) -> list[tuple[str, Source]]:
    if isinstance(source, Mapping):
        return list(source.items())
    return [(source.name, source)]


def run_loop(
    source: Source | Mapping[str, Source],
    pipe: LivePipeline,
    opts: RunOptions,
    enroller: LiveEnroller,
    *,
    commands: StdinCommands | Any | None = None,
    console: Console | None = None,
    window: Window | Any | None = None,
    web: WebHub | None = None,
) -> RunSummary:
    """Run ``pipe`` on the frames of ``source`` (one :class:`Source`, or ``{name: Source}`` for several
    cameras) and write the outputs; see the module doc.

    Each source is read by its own thread (:class:`~mocha_edge.deploy.cameras.Capture`: live sources keep
    their newest frame, files every frame); this thread takes the cameras' frames in turn. ``commands``
    has ``poll() -> list[str]`` (and ``interactive``); ``window`` has ``show(img) -> key`` (with several
    cameras ``show(img, camera=NAME)``) and ``close()``.  A source
    opened with ``sleep=Stopper().sleep`` (:class:`~mocha_edge.deploy.cameras.Stopper`, as :func:`run`
    does) is stopped even while its camera stays lost. ``web`` (:class:`~mocha_edge.deploy.web.WebHub`,
    keyed by camera name): views for the page while it watches, events, stage times, and the page's
    commands, carried out between frames.
    The sources are closed when the loop ends. Outputs are finalised whatever stops the loop;
    errors propagate after that. A fault while handling a frame is counted and the loop goes on (module
    doc); :class:`RunFailed` (after the outputs are finalised) when every frame of every camera has been
    lost for ``opts.fail_after`` seconds and ``opts.fail_frames`` frames.
    """
    from mocha_edge.deploy.cameras import CameraError, Capture, Captures, split_sinks
    from mocha_edge.deploy.sinks import camera_slug
    from mocha_edge.deploy.tracking import TrackIdentities, make_tracker, track_frame

    console = console or Console()
    given = _as_cameras(source)
    if not given:
        raise RunError("no source")
    several = len(given) > 1
    labels: dict[str, str] = {}
    for name, _ in given:
        label = camera_slug(name)
        if label in labels:
            raise CameraError(
                f"camera {name}: the same label {label!r} as camera {labels[label]}; name them apart"
            )
        labels[label] = name
    named = several or any(name != src.name for name, src in given)  # records then carry "camera"
    uris = sink_uris(opts)
    per_uris, shared_uris = split_sinks(uris, [n for n, _ in given]) if several else (uris, [])
    faults = FaultLog(console.log)
    failing = ""  # why the run gives up (persistent faults)
    cond = threading.Condition()
    cams: list[_Camera] = []
    shared: list[Sink] = []
    summary = RunSummary(given[0][0] if not several else ", ".join(n for n, _ in given))
    stop = _Stop()
    t_start = time.perf_counter()
    try:
        shared = open_sinks(shared_uris, fps=None, log=console.log)
        for name, src in given:
            own = open_sinks(per_uris, camera=name, fps=src.fps, log=console.log)
            by_uri = dict(zip(map(id, per_uris), own, strict=True)) | dict(
                zip(map(id, shared_uris), shared, strict=True)
            )
            cam = _Camera(name, camera_slug(name), src, Capture(name, src, cond), RunSummary(name),
                          f"{name}: " if several else "", sinks=[by_uri[id(u)] for u in uris], own=own)  # fmt: skip
            cams.append(cam)
            cam.tracker = make_tracker(opts.tracker, src.fps, conf=getattr(pipe, "conf", None))
            if cam.tracker is not None:
                cam.idents = TrackIdentities(
                    name, list(pipe.names), opts.rule, name_conf=float(getattr(pipe, "name_conf", 0.5)),
                    snapshots=bool(cam.event_sinks) or web is not None,
                )  # fmt: skip
    except BaseException:  # nothing started: close what opened
        for sink in [*shared, *(s for c in cams for s in c.own)]:
            with contextlib.suppress(Exception):
                sink.close()
        for _, src in given:
            src.close()
        raise
    if web is not None:  # the page names cameras by their labels (URL-safe)
        for c in cams:
            web.add_camera(c.label)
        enroller.on_change = lambda e: web.set_bank(e.bank, e.path, e.problem)
        web.set_bank(enroller.bank, enroller.path, enroller.problem)
    all_sinks = [*shared, *(s for c in cams for s in c.own)]
    need_records = any(s.needs_records for s in all_sinks)
    need_image = window is not None or any(s.needs_image for s in all_sinks)
    if opts.handle_signals:
        stop.install()
    meter = _Meter(opts.fps_every, [c.label for c in cams])
    requests: list[_EnrolRequest] = []  # `enroll NAME` waiting for the cameras' next frames
    awaiting: tuple[np.ndarray, int, str] | None = None  # key `e`: detection waiting for its name
    captures = Captures([c.capture for c in cams], cond)
    source_error: BaseException | None = None

    def count_events(cam: _Camera, events: list[Event]) -> None:
        for e in events:
            cam.summary.events[e.kind] = cam.summary.events.get(e.kind, 0) + 1
        if web is not None and events:
            web.add_events([{**e.record(), "camera": cam.label} for e in events])  # the API's camera names

    def web_turn() -> None:
        """The page's commands, between frames (the bank state it shows follows enroller.on_change)."""
        assert web is not None
        from mocha_edge.deploy.web import run_command

        cmds = web.take_commands()
        idents = {c.label: c.idents for c in cams} if cmds else {}
        for cmd in cmds:
            faults.attempt("web", None, run_command, cmd, enroller, idents)

    def finish(cam: _Camera, why: str) -> None:
        """``cam`` is done: its tracks leave (their events written), its capture stops."""
        cam.finished = True
        cam.summary.stopped = cam.summary.stopped or why
        cam.capture.stop()
        if cam.idents is not None and cam.last_frame is not None:
            last = cam.last_frame
            events = cam.idents.close(last.t, last.index)
            count_events(cam, events)
            for sink in cam.event_sinks:
                faults.attempt(f"{cam.stage}sink {sink.path}", last.index, sink.write_events, last, events)

    def request(name: str) -> None:
        """Queue ``enroll NAME`` (``CAMERA:NAME`` picks one camera)."""
        head, colon, rest = name.partition(":")
        chosen = [i for i, c in enumerate(cams) if colon and head.strip() in (c.name, c.label)]
        if chosen and rest.strip():
            name, waiting = rest.strip(), set(chosen)
        else:
            running = [i for i, c in enumerate(cams) if not c.finished]
            now = time.perf_counter()
            recent = [i for i in running if now - cams[i].last_at <= ENROL_RECENT]
            waiting = set(recent or running)
        if not waiting:
            console.log(f"warning: enroll {name}: no camera is running; nothing enrolled")
            return
        requests.append(_EnrolRequest(name, waiting, time.perf_counter() + ENROL_WAIT,
                                      cameras=[cams[i].name for i in sorted(waiting)]))  # fmt: skip

    def resolve(force: bool = False) -> None:
        """Enrol the requests whose cameras all answered (or that waited too long)."""
        now = time.perf_counter()
        for r in list(requests):
            r.waiting = {i for i in r.waiting if not cams[i].finished}
            if r.waiting and not force and now < r.deadline:
                continue
            requests.remove(r)
            if r.best is not None:
                vec, coarse, _, where = r.best
                faults.attempt("enrol", None, enroller.enrol, r.name, vec, coarse, where)
            elif r.seen:
                console.log(
                    f"warning: enroll {r.name}: no detection in {', '.join(r.seen)}; nothing enrolled"
                )
            else:
                console.log(
                    f"warning: enroll {r.name}: no frame from {', '.join(r.cameras)}; nothing enrolled"
                )

    def offer(i: int, dets: Any, where: str) -> None:
        """Frame ``where`` of camera ``i`` processed: its top detection for the requests waiting for it."""
        asking = [r for r in requests if i in r.waiting]
        top = enroller.top(dets) if asking else None
        for r in asking:
            r.waiting.discard(i)
            r.seen.append(where)
            if top is not None and (r.best is None or top[2] > r.best[2]):
                r.best = (top[0], top[1], top[2], where)

    try:
        for c in cams:
            c.capture.start()
        while True:
            for line in commands.poll() if commands is not None else ():
                if awaiting is not None:
                    vec, coarse, where = awaiting
                    awaiting = None
                    faults.attempt(
                        "enrol", None, enroller.enrol, line or enroller.auto_name(), vec, coarse, where
                    )
                    continue
                words = line.split(maxsplit=1)
                if not words:
                    continue
                cmd = words[0].lower()
                if cmd == "enroll":
                    name = words[1].strip() if len(words) > 1 else ""
                    if name:
                        request(name)
                    else:
                        console.log("warning: usage: enroll NAME" + (" (or CAMERA:NAME)" if several else ""))
                elif cmd in ("quit", "exit", "q"):
                    stop.requested = stop.requested or "quit"
                elif cmd == "help":
                    console.log(COMMANDS_HELP + (MULTI_HELP if several else ""))
                else:
                    console.log(f"warning: unknown command {line!r}; {COMMANDS_HELP}")
            resolve()
            if web is not None:
                web_turn()
            if stop.requested:
                break
            for c in cams:  # sources that ended, their frames all handled
                if not c.finished and c.capture.done:
                    ended = c.capture.ended or "end"
                    if c.capture.error is not None and source_error is None:
                        source_error = c.capture.error
                    finish(c, "end of source" if ended == "end" else ended)
            if all(c.finished for c in cams):
                summary.stopped = cams[0].summary.stopped if not several else "every source ended"
                break
            t0 = time.perf_counter()
            got = captures.next(WEB_SLICE if web is not None else WAIT_SLICE,
                                stop=lambda: stop.requested is not None)  # fmt: skip
            if got is None:
                if web is not None:
                    faults.attempt("enrol", None, enroller.poll)  # the page waits for its edits' answers
                continue
            i, frame, t_read = got
            cam = cams[i]
            st = cam.stage
            # banks the worker finished since the last frame
            faults.attempt("enrol", frame.index, enroller.poll)
            t1 = time.perf_counter()
            ok, dets = faults.attempt(f"{st}pipeline", frame.index, pipe, frame.image_bgr)
            events: list[Event] = []
            if ok and cam.tracker is not None:
                t_tr = time.perf_counter()
                ok, out = faults.attempt(
                    f"{st}track", frame.index, track_frame, cam.tracker, cam.idents, pipe, frame, dets
                )
                if ok:
                    dets, events = out
                    pipe.timings = {**pipe.timings, "track": (time.perf_counter() - t_tr) * 1e3}
            t2 = time.perf_counter()
            cam.summary.frames += 1
            cam.last_frame = frame
            count_events(cam, events)
            where = cam.where(frame.index, several)
            records: list[dict[str, Any]] | None = None  # None: the detection outputs skip this frame
            shown: np.ndarray | None = None
            if ok:
                names = pipe.identity_names  # those this frame was matched against (before any enrolment)
                faults.attempt("enrol", frame.index, offer, i, dets, where)
                resolve()
                cam.summary.detections += len(dets.scores)
                ok, records = (
                    faults.attempt(
                        f"{st}records", frame.index, _records, frame, dets, list(pipe.names), names,
                        cam.name if named else None,
                    )
                    if need_records
                    else (True, [])
                )  # fmt: skip
                if need_image:
                    done, shown = faults.attempt(
                        f"{st}annotate", frame.index, annotate, frame.image_bgr, dets, list(pipe.names), names
                    )
                    ok = ok and done
            if shown is None and need_image:
                shown = frame.image_bgr  # no boxes: the pipeline or the drawing failed (counted above)
            if web is not None and web.wants(cam.label):
                faults.attempt(f"{st}web", frame.index, web.offer, cam.label, frame, dets if ok else None,
                               list(pipe.names), list(pipe.identity_names))  # fmt: skip
            delivered = 0
            for sink in cam.sinks:  # each one isolated: a full disk under one never stops the others
                if records is None and sink.needs_records:
                    continue
                if sink.needs_events:
                    done, _ = faults.attempt(
                        f"{st}sink {sink.path}", frame.index, sink.write_events, frame, events
                    )
                else:
                    done, _ = faults.attempt(
                        f"{st}sink {sink.path}", frame.index, sink.write, frame, records or [], shown
                    )
                delivered += done
            if window is not None and shown is not None:
                show = (lambda img, c=cam.name: window.show(img, camera=c)) if several else window.show
                shown_ok, key = faults.attempt(f"{st}window", frame.index, show, shown)
                delivered += shown_ok
                if key == "closed" or key in (27, ord("q")):
                    stop.requested = stop.requested or ("window closed" if key == "closed" else "key q")
                elif key == ord("e"):
                    _, named_det = faults.attempt("enrol", frame.index, _key_e, enroller, dets, where, pipe,
                                                  commands, console)  # fmt: skip
                    awaiting = named_det or awaiting
            now = time.perf_counter()
            cam.last_at = now
            latency = (now - t_read) * 1e3
            cam.latency += latency
            meter.frame(cam.label, latency)
            if web is not None:
                web.frame_done(cam.label, latency, pipe.timings if ok else {}, frame)
            lost = not ok or ((bool(cam.sinks) or window is not None) and delivered == 0)
            cam.summary.lost += lost
            streak_s = faults.frame_done(lost)
            if 0 < opts.fail_after <= streak_s and faults.streak >= max(1, opts.fail_frames):
                failing = (
                    f"every frame lost for {streak_s:.0f} s ({faults.streak} in a row); last: {faults.last}"
                )
                summary.stopped = f"failing: {failing}"
                break
            if ok:
                meter.add(pipe.timings, (t1 - t0) * 1e3, (now - t2) * 1e3)
            if opts.max_frames is not None and sum(c.summary.frames for c in cams) >= opts.max_frames:
                summary.stopped = f"--max-frames {opts.max_frames}"  # over all cameras
                break
            report = meter.report(frame.index)
            if report is not None:
                console.status(report)
        if stop.requested and not summary.stopped:
            summary.stopped = stop.requested
    except KeyboardInterrupt:
        summary.stopped = stop.requested or "SIGINT"
    finally:
        stop.interruptible, stop.finishing = False, True  # from here on signals are ignored: finish the files
        try:
            summary.seconds = time.perf_counter() - t_start
            captures.close(console.log)
            resolve(force=True)
            enroller.close()
            summary.enrolled = list(enroller.enrolled)
            if window is not None:
                window.close()
            for c in cams:  # every track of a camera still running leaves
                if not c.finished:
                    finish(c, summary.stopped)
            failed: BaseException | None = None
            for c in cams:
                cs = c.summary
                cs.skipped, cs.reconnects = c.source.skipped, c.source.reconnects
                cs.dropped, cs.seconds = c.capture.dropped, summary.seconds
                cs.latency_ms = c.latency / cs.frames if cs.frames else 0.0
                cs.faults = {k[len(c.stage) :]: n for k, n in faults.counts.items() if k.startswith(c.stage)}
                for sink in c.own:  # each one finalised even when another fails
                    try:
                        cs.outputs.append(sink.close())
                    except Exception as e:
                        failed = failed or e
            for sink in shared:
                try:
                    summary.outputs.append(sink.close())
                except Exception as e:
                    failed = failed or e
            for k in ("frames", "detections", "skipped", "reconnects", "lost", "dropped"):
                setattr(summary, k, sum(getattr(c.summary, k) for c in cams))
            for c in cams:
                for k, n in c.summary.events.items():
                    summary.events[k] = summary.events.get(k, 0) + n
            total = sum(c.latency for c in cams)
            summary.latency_ms = total / summary.frames if summary.frames else 0.0
            summary.faults = dict(faults.counts)
            if several:
                summary.cameras = [c.summary for c in cams]
            else:
                summary.outputs = cams[0].summary.outputs
                summary.stopped = summary.stopped or cams[0].summary.stopped
            console.end()
            if failed is not None:
                raise failed
        finally:
            stop.restore()
    if failing:
        raise RunFailed(f"{summary.source}: giving up: {failing}", summary)
    if source_error is not None and all(c.capture.error is not None for c in cams):
        summary.stopped = summary.stopped or f"error: {source_error}"
        raise source_error
    return summary


def _records(
    frame: Frame, dets: Any, class_names: list[str], identity_names: list[str], camera: str | None
) -> list[dict[str, Any]]:
    """The frame's detection records; with several (or named) cameras each carries ``"camera"``."""
    records = detection_records(frame, dets, class_names, identity_names)
    if camera is not None:
        for r in records:
            r["camera"] = camera
    return records


def _key_e(
    enroller: LiveEnroller,
    dets: Any,
    where: str,
    pipe: LivePipeline,
    commands: Any,
    console: Console,
) -> tuple[np.ndarray, int, str] | None:
    """Key ``e``: enrol the top detection of the frame shown (``where``: ``frame N``, ``CAMERA frame N``) as
    ``obj-N``, or, on a terminal, return it: it waits for its name (the next stdin line)."""
    top = enroller.top(dets) if dets is not None else None
    if top is None:
        why = "" if dets is not None else " (its processing failed)"
        console.log(f"key e: no detection in {where} to enrol{why}")
    elif commands is not None and getattr(commands, "interactive", False):
        console.log(
            f"key e: {pipe.names[top[1]]} ({top[2]:.2f}) from {where}: "
            f"type its name and Enter (empty: {enroller.auto_name()})"
        )
        return top[0], top[1], where
    else:
        enroller.enrol(enroller.auto_name(), top[0], top[1], where)
    return None


def make_pipeline(model: str | Path, **kwargs: Any) -> LivePipeline:
    """The real pipeline (:class:`mocha_edge.deploy.pipeline.Pipeline`); the CLI calls this through the module,
    so a test can replace it."""
    from mocha_edge.deploy.pipeline import Pipeline

    return Pipeline(model, **kwargs)


def run(
    model: str | Path,
    source: str | Sequence[str],
    opts: RunOptions,
    *,
    bank_path: Path | None = None,
    backend: str | None = None,
    conf: float = 0.25,
    iou: float = 0.7,
    mode: str = "conditional",
    gpu_stages: str = "auto",
    threshold: float | None = None,
    name_conf: float | None = None,
    pipeline_factory: PipelineFactory = make_pipeline,
    commands: Any | None = None,
    console: Console | None = None,
    source_options: dict[str, Any] | None = None,
) -> RunSummary:
    """Open the sources, build the pipeline, attach the bank, run the loop (:func:`run_loop`).

    ``source``: one URI, or several (``NAME=URI`` or ``URI``, :func:`~mocha_edge.deploy.cameras.camera_specs`):
    one shared pipeline and bank, a tracker and outputs per camera. A missing ``bank_path`` starts an empty
    bank: live enrolments create the file. ``backend`` (a registry engine name) defaults to the engine for
    the model's suffix (:func:`~mocha_edge.deploy.engines.engine_for`); ``gpu_stages`` (auto | on | off):
    pre/post-processing with the CUDA kernels on a GPU engine's buffers (auto: when the engine and the CUDA
    build allow). ``source_options``: keyword arguments of every :func:`~mocha_edge.deploy.sources.open_source`.
    """
    if backend is None:
        backend = engine_for(model)
    from mocha_edge.deploy.cameras import CameraWindows, Stopper, camera_specs, split_sinks
    from mocha_edge.deploy.sources import open_source
    from mocha_edge.prototypes import PrototypeBank

    console = console or Console()
    specs = camera_specs([source] if isinstance(source, str) else list(source))
    if not specs:
        raise RunError("no source: give --source (or --camera / --csi)")
    show = opts.show
    ok, why = gui_available()
    if show and not ok:
        raise RunError(f"--show: {why}")
    if show is None:
        show = ok
    # bad outputs fail before the sources and the model open
    if len(specs) > 1:
        split_sinks(sink_uris(opts), [s.name for s in specs])
    else:
        sink_paths(sink_uris(opts), specs[0].name)
    if mode not in ("conditional", "global"):
        raise RunError(f"--mode must be conditional or global, not {mode!r}")
    opened: dict[str, Source] = {}
    server = None  # --http
    handed = False  # run_loop closes the sources once it has them
    try:
        for spec in specs:
            stopper = Stopper()  # the capture thread's: a stop ends a backoff or pacing wait
            src_opts = {"sleep": stopper.sleep, **(source_options or {})}
            src = open_source(spec.uri, warn=lambda m: console.log(f"warning: {m}"), **src_opts)
            opened[spec.name] = src
            for uri in sink_uris(opts):
                note = crash_note(uri, bool(getattr(src, "live", False)))
                if note is not None and (len(specs) == 1 or "{camera}" in uri.text):
                    console.log(note)
        bank, seen = None, None
        if bank_path is not None:
            if Path(bank_path).exists():
                from mocha_edge.utils import file_stamp

                seen = file_stamp(bank_path)  # before reading: a change meanwhile is read again
                bank = PrototypeBank.load(bank_path)
            else:
                console.log(f"{bank_path}: no bank yet; starting empty (live enrolments create it)")
        extra = {k: v for k, v in (("threshold", threshold), ("name_conf", name_conf)) if v is not None}
        pipe = pipeline_factory(model, backend=backend, conf=conf, iou=iou, mode=mode, gpu_stages=gpu_stages,
                                **extra)  # fmt: skip
        note = getattr(pipe, "gpu_stages_note", "")
        if note:
            console.log(note)
        if bank is not None:
            attach_bank(pipe, bank, bank_path or "", console.log)
        enroller = LiveEnroller(pipe, bank, Path(bank_path) if bank_path is not None else None, console.log,
                                background=True, seen=seen)  # fmt: skip
        window = (CameraWindows() if len(specs) > 1 else Window()) if show else None
        if opts.http:
            server = start_web(opts, console)
        handed = True
        return run_loop(opened if len(specs) > 1 or specs[0].named else next(iter(opened.values())), pipe, opts,
                        enroller, commands=commands, console=console, window=window,
                        web=server.hub if server is not None else None)  # fmt: skip
    finally:
        if server is not None:
            server.stop()
        if not handed:
            for src in opened.values():
                src.close()


def start_web(opts: RunOptions, console: Console) -> Any:
    """``--http``: the web server (:class:`~mocha_edge.deploy.web.WebServer`), started, its address printed
    (with the token once, when one is needed)."""
    from mocha_edge.deploy.web import WebHub, WebServer, is_loopback, new_token, parse_http

    assert opts.http is not None
    host, port = parse_http(opts.http)
    local = is_loopback(host)
    token = opts.http_token or (None if local else new_token())
    server = WebServer(WebHub(http_fps=opts.http_fps, token=token, loopback_only=local), host, port)
    server.start()
    if token is None:
        console.log(f"web page: {server.url} (this machine only; --http 0.0.0.0:{server.port} for others)")
    else:
        shown = token if not opts.http_token else "<your --http-token>"
        console.log(f"web page: {server.url}?token={shown} (open it once with the token; API: Authorization: "
                    "Bearer TOKEN)")  # fmt: skip
    return server


# ------------------------------------------------------------------------------------------ command
@click.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prototypes", "bank", type=click.Path(path_type=Path),
              help="Prototype bank (.safetensors) to match against; created by live enrolment when missing. "
              "Without it: detection only.")  # fmt: skip
@click.option("--source", "sources", multiple=True, metavar="[NAME=]URI",
              help="Image, folder, video (files: ?loop=1&realtime=1), rtsp://..., v4l2:///dev/videoN, csi://N; "
                   "repeatable: several cameras in one process, each optionally named (front=rtsp://...; "
                   "see above).")  # fmt: skip
@click.option("--camera", "cameras", type=int, multiple=True, metavar="N",
              help="Shorthand for --source v4l2:///dev/videoN (repeatable, with --source and --csi too).")  # fmt: skip
@click.option("--csi", "csis", type=int, multiple=True, metavar="N",
              help="Shorthand for --source csi://N, a Jetson CSI camera (repeatable).")  # fmt: skip
@click.option("--sink", "sinks", multiple=True, metavar="URI",
              help="An output, repeatable: x.jsonl[?rotate=100MB|daily&keep=N] (JSON lines, appended), out.mkv / "
                   ".avi / .mp4 (annotated video), out.mkv?segment=10m&keep=144 (10-minute files, a day kept); "
                   "{camera} in the path: the camera's name (one file per camera; see above).")  # fmt: skip
@click.option("--save", type=click.Path(path_type=Path), metavar="PATH",
              help="Annotated video (.mkv/.avi survive a crash; .mp4/.mov are written when the run ends); "
                   "= --sink PATH.")  # fmt: skip
@click.option("--jsonl", type=click.Path(path_type=Path), metavar="PATH",
              help="One JSON line per detection, appended, flushed per frame; = --sink PATH?kind=detections.")  # fmt: skip
@click.option("--show/--no-show", default=None, help="Window with the annotated frames [default: when a display "
              "exists].")  # fmt: skip
@click.option("--conf", default=0.25, show_default=True, help="Detection confidence threshold.")
@click.option("--iou", default=0.7, show_default=True, help="NMS IoU threshold.")
@click.option("--threshold", type=float, default=None, metavar="T",
              help="One cosine threshold for every identity instead of the bank's own per-identity ones.")  # fmt: skip
@click.option("--name-conf", type=float, default=None, metavar="C",
              help="Detection confidence a detection needs to be named [default: 0.5].")  # fmt: skip
@click.option("--mode", type=click.Choice(["conditional", "global"]), default="conditional", show_default=True,
              help="Match within the detected class, or against every prototype.")  # fmt: skip
@click.option("--backend", type=click.Choice(list_engines()), default=None,
              help="Engine from the registry (`mocha-edge info` says which run here) [default: trt for a "
                   ".engine, ort for an .onnx, torch for a checkpoint].")  # fmt: skip
@click.option("--gpu-stages", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Letterbox, decode/NMS and pooling with the CUDA kernels on a GPU engine's buffers "
                   "(auto: when the engine and the CUDA build allow; the reason is printed when not).")  # fmt: skip
@click.option("--max-frames", type=int, help="Stop after N frames (of every camera together).")
@click.option("--fps-every", default=5.0, show_default=True, help="Seconds between FPS lines (0: none).")
@click.option("--fail-after", default=FAIL_AFTER, show_default=True, metavar="SECONDS",
              help=f"Give up (exit code {EXIT_FAILING}) when every frame has faulted for this long and at least "
                   f"{FAIL_FRAMES} frames in a row, so a supervisor restarts the process (0: never).")  # fmt: skip
@click.option("--tracker", type=click.Choice(TRACKER_CHOICES), default="bytetrack", show_default=True,
              help="Multi-object tracker (ultralytics' ByteTrack / BoT-SORT): one identity per track, events "
                   "(enter, identified, changed, leave); none: identities decided per frame.")  # fmt: skip
@click.option("--leave-after", type=float, default=None, metavar="SECONDS",
              help="A track unseen this long has left (its leave event) [default: 2].")  # fmt: skip
@click.option("--http", metavar="[HOST:]PORT",
              help="Serve the web page and REST API (live view, enrolment, corrections) on PORT of 127.0.0.1, or "
                   "of HOST (0.0.0.0: every interface; then a token is required, printed once).")  # fmt: skip
@click.option("--http-fps", type=float, default=10.0, show_default=True,
              help="Frames a second the page gets at most (encoded only while someone watches).")  # fmt: skip
@click.option("--http-token", envvar="MOCHA_EDGE_HTTP_TOKEN", metavar="TOKEN",
              help="The token web clients must give [default: generated on a non-loopback address; env "
                   "MOCHA_EDGE_HTTP_TOKEN].")  # fmt: skip
def run_cmd(model: Path, bank: Path | None, sources: tuple[str, ...], cameras: tuple[int, ...], csis: tuple[int, ...],
            sinks: tuple[str, ...], save: Path | None, jsonl: Path | None, show: bool | None, conf: float, iou: float,
            threshold: float | None, name_conf: float | None, mode: str, backend: str | None, gpu_stages: str,
            max_frames: int | None, fps_every: float, fail_after: float, tracker: str,
            leave_after: float | None, http: str | None, http_fps: float, http_token: str | None) -> None:  # fmt: skip
    """Run the exported MODEL (.onnx from `mocha-edge export`, or a TensorRT .engine) on a live source:
    detect, match against the prototype bank, write/show the results, enrol new objects on the fly.

    \b
    Sources: photo.jpg, a folder of images, clip.mp4, rtsp://..., v4l2:///dev/video0, csi://0
      (camera options: csi://0?width=1280&height=720&fps=60&flip=2; files: clip.mp4?loop=1&realtime=1
      to go round and be paced at the file's rate, fps=N for images and folders [default: 10]).
    Outputs (--sink URI, repeatable): events.jsonl (one line per detection, appended; ?rotate=100MB
      or ?rotate=daily rotates, keeping 5 old files, ?keep=N), out.mkv / out.avi / out.mp4 (annotated
      video; .mkv/.avi stay playable after a crash), out.mkv?segment=10m&keep=144 (timestamped 10-minute
      files, the oldest removed); cam-{camera}.jsonl: {camera} is the camera's name. A file's read error
      ends it with "stopped: error: ..." in the summary, not as an ordinary end.
    Several cameras: repeat --source (front=rtsp://..., back=csi://0: NAME=URI, NAME of letters, digits,
      _ and -; unnamed sources are named after their URI), --camera and --csi. One model and one bank for
      all, a tracker per camera, frames taken from the cameras in turn; a live camera's frames that arrive
      while the model is busy are skipped (newest frame only, counted as dropped), files keep every frame.
      Outputs with {camera} are one per camera; others are shared (lines carry "camera"), but a video must
      have {camera}. A camera that drops out reconnects while the others go on; the run ends when every
      source has ended. The FPS line shows each camera's FPS and latency; the summary a line per camera.
    Live enrolment: type `enroll NAME` + Enter: the top detection of the next frame becomes a shot of
      NAME (bank saved at once, used from the next frame); with several cameras the top detection over
      every camera's next frame, `enroll CAMERA:NAME` one camera's; key `e` in the window does the same
      for the frame shown; `quit` stops.
    Faults: a lost camera reconnects (backoff 0.5 s to 8 s); unreadable images are skipped with a warning;
      a fault on one frame (pipeline, an output, the window) is counted and logged (then at most once a
      minute per kind) and the run goes on, other outputs unaffected; the summary lists the counts. When
      every frame has faulted for --fail-after seconds the run ends with exit code 3 (outputs finalised).
    Ctrl-C / SIGTERM / SIGHUP (a dropped SSH session) stop cleanly (outputs finalised, summary printed),
      exit code 0.

    \b
    Examples:
      mocha-edge run student.onnx --prototypes my.bank --source clip.mp4 --save out.mp4 --jsonl events.jsonl
      mocha-edge run student.onnx --source 'clip.mp4?loop=1&realtime=1' --sink 'd-{camera}.jsonl?rotate=10MB'
      mocha-edge run student.engine --backend trt --prototypes my.bank --csi 0
      mocha-edge run student.onnx --camera 0 --no-show --jsonl events.jsonl --max-frames 100
      mocha-edge run student.engine --prototypes my.bank --source front=rtsp://cam1/live --csi 0
        --sink 'rec-{camera}.mkv?segment=10m&keep=144' --sink 'events.jsonl?kind=events'
    """
    from mocha_edge.deploy.sources import camera_uri, csi_uri

    given = [*sources, *map(camera_uri, cameras), *map(csi_uri, csis)]
    if not given:
        raise click.UsageError("give a source: --source [NAME=]URI, --camera N or --csi N (each repeatable)")
    if max_frames is not None and max_frames < 1:
        raise click.BadParameter("must be >= 1", param_hint="--max-frames")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise click.BadParameter("a cosine in [-1, 1]", param_hint="--threshold")
    if fail_after < 0:
        raise click.BadParameter("must be >= 0 (0: never give up)", param_hint="--fail-after")
    rule = None
    if leave_after is not None:
        if leave_after <= 0:
            raise click.BadParameter("must be > 0", param_hint="--leave-after")
        import dataclasses

        from mocha_edge.deploy.tracking import IdentityRule

        rule = dataclasses.replace(IdentityRule(), leave_after=leave_after)
    if http is not None:
        from mocha_edge.deploy.web import WebError, parse_http

        try:
            parse_http(http)
        except WebError as e:
            raise click.BadParameter(str(e).removeprefix(f"--http {http}: "), param_hint="--http") from None
        if not http_fps > 0:
            raise click.BadParameter("must be > 0", param_hint="--http-fps")
        http_token = http_token or None  # empty (an unset service variable): generated
        if http_token is not None and len(http_token) < 16:
            raise click.BadParameter("at least 16 characters", param_hint="--http-token")
    opts = RunOptions(save=save, jsonl=jsonl, sinks=list(sinks), show=show, max_frames=max_frames,
                      fps_every=fps_every, fail_after=fail_after, tracker=tracker, rule=rule, http=http,
                      http_fps=http_fps, http_token=http_token)  # fmt: skip
    console = Console()
    try:
        summary = run(
            model, given if len(given) > 1 else given[0], opts, bank_path=bank, backend=backend, conf=conf, iou=iou, mode=mode,
            gpu_stages=gpu_stages, threshold=threshold, name_conf=name_conf, pipeline_factory=make_pipeline,
            commands=StdinCommands.start(warn=console.log), console=console,
        )  # fmt: skip
    except RunFailed as e:
        _echo(e.summary.line())
        raise
    _echo(summary.line())


def _echo(line: str) -> None:
    """The summary on stdout; a stdout gone with its terminal (EIO after a hang-up, EPIPE) loses only it:
    the outputs are final by now."""
    with contextlib.suppress(OSError):
        click.echo(line)


__all__ = [
    "Console",
    "FaultLog",
    "JsonlSink",
    "LiveEnroller",
    "RunError",
    "RunFailed",
    "RunOptions",
    "RunSummary",
    "StdinCommands",
    "VideoSink",
    "annotate",
    "detection_records",
    "gui_available",
    "make_pipeline",
    "run",
    "run_cmd",
    "run_loop",
    "sink_uris",
]
