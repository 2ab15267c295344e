"""``mocha-edge run``: the live loop. Source -> pipeline -> outputs, with live enrolment and fault handling.

One frame at a time: read (``mocha_edge.deploy.sources``), detect + embed + match (the injected pipeline), then
the outputs, opened by URI (``--sink``, repeatable; ``mocha_edge.deploy.sinks``): JSON lines (one per
detection, appended, flushed every frame, rotated by size or day), annotated videos (``.mkv``/``.avi`` under
their own name, so a crash leaves them playable; ``.mp4``/``.mov``/``.m4v`` under a temporary name renamed
when the run ends; ``?segment=10m`` splits a recording into timestamped files); a window when a display
exists, and an FPS line with per-stage milliseconds. An output that cannot write (a full disk) pauses, holds
its JSON lines in memory and retries, and says so.

Live enrolment: ``enroll NAME`` on standard input (read by a background thread, never blocking the loop)
enrols the top-scoring detection of the next frame as a new shot of NAME; key ``e`` in the window does
the same for the frame shown (the name is asked on the terminal, or ``obj-N``). The bank is saved
atomically and the pipeline matches against it from the next frame.

Stopping: end of a file source (or its read error: ``stopped: error: ...`` in the summary), ``--max-frames``,
key ``q``/Esc, a ``quit`` line, or Ctrl-C / SIGINT / SIGTERM / SIGHUP. SIGHUP is what a process gets when
its terminal goes away (an SSH session dropped): its default, ending the process, is made clean here, so a
recording is finalised rather than left as a hidden ``.partial`` file (run under ``nohup`` or ``setsid``
to keep going instead). A signal during frame processing is noted and the loop stops after that frame; a
signal while waiting for a frame stops the wait. Either way every output is finalised, a summary printed,
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
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
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

    from mocha_edge.deploy.pipeline import LivePipeline
    from mocha_edge.deploy.sources import Source
    from mocha_edge.deploy.tracking import Event, IdentityRule

STAGES = ("pre", "infer", "post", "pool", "match", "track")
TRACKER_CHOICES = ("bytetrack", "botsort", "none")  # = tracking.TRACKERS (kept here: the CLI loads no numpy)
FAULT_REPORT_EVERY = 60.0  # seconds: at most one summary line per fault kind in this time
FAIL_AFTER = 30.0  # seconds of nothing but lost frames before the run gives up (--fail-after)
FAIL_FRAMES = 50  # ... and at least this many lost frames in a row (a slow source is not judged on a few)
EXIT_FAILING = 3  # exit code of a run that gave up (persistent faults); 1: it could not start


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


@dataclass
class RunSummary:
    """What a run did."""

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

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        parts = [
            f"{self.source}: {self.frames} frames in {self.seconds:.1f} s ({self.fps:.1f} FPS), "
            f"{self.detections} detections; stopped: {self.stopped}"
        ]
        if self.skipped:
            parts.append(f"{self.skipped} unreadable skipped")
        if self.reconnects:
            parts.append(f"{self.reconnects} reconnect attempts")
        if self.enrolled:
            parts.append("enrolled " + ", ".join(self.enrolled))
        if self.faults:
            kinds = ", ".join(f"{k} x{n}" for k, n in self.faults.items())
            parts.append(f"faults: {kinds} ({self.lost} frame{'s' * (self.lost != 1)} lost)")
        parts.extend(r.line() for r in self.outputs)
        return "; ".join(parts)

    def _first(self, kind: str) -> SinkReport | None:
        return next((r for r in self.outputs if r.kind == kind and (r.written or kind == "jsonl")), None)

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
    """SIGINT/SIGTERM/SIGHUP handling: while ``interruptible`` (waiting for a frame) a signal raises
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
    """Frames and mean per-stage milliseconds since the last report."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.t0, self.n, self.ms = now, 0, dict.fromkeys((*STAGES, "read", "out"), 0.0)

    def add(self, timings: dict[str, float], read_ms: float, out_ms: float) -> None:
        self.n += 1
        for k in STAGES:
            self.ms[k] += float(timings.get(k, 0.0))
        self.ms["read"] += read_ms
        self.ms["out"] += out_ms

    def report(self, frame: int) -> str | None:
        now = time.perf_counter()
        if self.every <= 0 or now - self.t0 < self.every or self.n == 0:
            return None
        fps = self.n / (now - self.t0)
        stages = " ".join(f"{k} {self.ms[k] / self.n:.1f}" for k in (*STAGES, "read", "out"))
        line = f"{fps:.1f} FPS | ms: {stages} | frame {frame}"
        self.reset(now)
        return line


def run_loop(
    source: Source,
    pipe: LivePipeline,
    opts: RunOptions,
    enroller: LiveEnroller,
    *,
    commands: StdinCommands | Any | None = None,
    console: Console | None = None,
    window: Window | Any | None = None,
) -> RunSummary:
    """Run ``pipe`` on every frame of ``source`` and write the outputs; see the module doc.

    ``commands`` has ``poll() -> list[str]`` (and ``interactive``); ``window`` has ``show(img) -> key``
    and ``close()``. Outputs are finalised whatever stops the loop; errors propagate after that. A fault
    while handling a frame is counted and the loop goes on (module doc); :class:`RunFailed` (after the
    outputs are finalised) when every frame has been lost for ``opts.fail_after`` seconds and
    ``opts.fail_frames`` frames.
    """
    from mocha_edge.deploy.sources import SourceError

    console = console or Console()
    summary = RunSummary(source.name)
    faults = FaultLog(console.log)
    failing = ""  # why the run gives up (persistent faults)
    sinks: list[Sink] = open_sinks(sink_uris(opts), camera=source.name, fps=source.fps, log=console.log)
    need_records = any(s.needs_records for s in sinks)
    need_image = window is not None or any(s.needs_image for s in sinks)
    event_sinks = [s for s in sinks if getattr(s, "needs_events", False)]
    from mocha_edge.deploy.tracking import TrackIdentities, make_tracker, track_frame

    tracker = make_tracker(opts.tracker, source.fps)
    idents = (
        TrackIdentities(source.name, list(pipe.names), opts.rule, name_conf=float(getattr(pipe, "name_conf", 0.5)),
                        snapshots=bool(event_sinks))
        if tracker is not None else None
    )  # fmt: skip
    last_frame: Any = None
    stop = _Stop()
    if opts.handle_signals:
        stop.install()
    meter = _Meter(opts.fps_every)
    pending: list[str] = []  # `enroll NAME` lines waiting for the next frame
    awaiting: tuple[np.ndarray, int, str] | None = None  # key `e`: detection waiting for its name
    frames = iter(source)
    t_start = time.perf_counter()
    try:
        while True:
            if opts.max_frames is not None and summary.frames >= opts.max_frames:
                summary.stopped = f"--max-frames {opts.max_frames}"
                break
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
                        pending.append(name)
                    else:
                        console.log("warning: usage: enroll NAME")
                elif cmd in ("quit", "exit", "q"):
                    stop.requested = stop.requested or "quit"
                elif cmd == "help":
                    console.log(COMMANDS_HELP)
                else:
                    console.log(f"warning: unknown command {line!r}; {COMMANDS_HELP}")
            if stop.requested:
                break
            t0 = time.perf_counter()
            stop.interruptible = True
            try:
                if stop.requested:  # a signal between the check above and here
                    break
                frame = next(frames, None)
            finally:
                stop.interruptible = False
            if frame is None:
                ended = getattr(source, "ended", None)
                summary.stopped = ended if ended and ended != "end" else "end of source"
                break
            # banks the worker finished since the last frame
            faults.attempt("enrol", frame.index, enroller.poll)
            t1 = time.perf_counter()
            ok, dets = faults.attempt("pipeline", frame.index, pipe, frame.image_bgr)
            events: list[Event] = []
            if ok and tracker is not None:
                t_tr = time.perf_counter()
                ok, out = faults.attempt(
                    "track", frame.index, track_frame, tracker, idents, pipe, frame, dets
                )
                if ok:
                    dets, events = out
                    pipe.timings = {**pipe.timings, "track": (time.perf_counter() - t_tr) * 1e3}
            t2 = time.perf_counter()
            summary.frames += 1
            last_frame = frame
            for e in events:
                summary.events[e.kind] = summary.events.get(e.kind, 0) + 1
            records: list[dict[str, Any]] | None = None  # None: the detection outputs skip this frame
            shown: np.ndarray | None = None
            if ok:
                names = pipe.identity_names  # those this frame was matched against (before any enrolment)
                for name in pending:
                    faults.attempt(
                        "enrol", frame.index, _enrol_top, enroller, dets, name, frame.index, console
                    )
                pending.clear()
                summary.detections += len(dets.scores)
                ok, records = (
                    faults.attempt(
                        "records", frame.index, detection_records, frame, dets, list(pipe.names), names
                    )
                    if need_records
                    else (True, [])
                )
                if need_image:
                    done, shown = faults.attempt(
                        "annotate", frame.index, annotate, frame.image_bgr, dets, list(pipe.names), names
                    )
                    ok = ok and done
            if shown is None and need_image:
                shown = frame.image_bgr  # no boxes: the pipeline or the drawing failed (counted above)
            delivered = 0
            for sink in sinks:  # each one isolated: a full disk under one never stops the others
                if records is None and sink.needs_records:
                    continue
                if getattr(sink, "needs_events", False):
                    done, _ = faults.attempt(
                        f"sink {sink.path}", frame.index, sink.write_events, frame, events
                    )
                else:
                    done, _ = faults.attempt(
                        f"sink {sink.path}", frame.index, sink.write, frame, records or [], shown
                    )
                delivered += done
            if window is not None and shown is not None:
                shown_ok, key = faults.attempt("window", frame.index, window.show, shown)
                delivered += shown_ok
                if key == "closed" or key in (27, ord("q")):
                    stop.requested = stop.requested or ("window closed" if key == "closed" else "key q")
                elif key == ord("e"):
                    _, named = faults.attempt("enrol", frame.index, _key_e, enroller, dets, frame.index, pipe,
                                              commands, console)  # fmt: skip
                    awaiting = named or awaiting
            lost = not ok or ((bool(sinks) or window is not None) and delivered == 0)
            summary.lost += lost
            streak_s = faults.frame_done(lost)
            if 0 < opts.fail_after <= streak_s and faults.streak >= max(1, opts.fail_frames):
                failing = (
                    f"every frame lost for {streak_s:.0f} s ({faults.streak} in a row); last: {faults.last}"
                )
                summary.stopped = f"failing: {failing}"
                break
            if ok:
                meter.add(pipe.timings, (t1 - t0) * 1e3, (time.perf_counter() - t2) * 1e3)
            report = meter.report(frame.index)
            if report is not None:
                console.status(report)
        if stop.requested and not summary.stopped:
            summary.stopped = stop.requested
    except KeyboardInterrupt:
        summary.stopped = stop.requested or "SIGINT"
    except SourceError as e:
        summary.stopped = f"error: {e}"
        raise
    finally:
        stop.interruptible, stop.finishing = False, True  # from here on signals are ignored: finish the files
        try:
            summary.seconds = time.perf_counter() - t_start
            summary.skipped, summary.reconnects = source.skipped, source.reconnects
            enroller.close()
            summary.enrolled = list(enroller.enrolled)
            if window is not None:
                window.close()
            if idents is not None and last_frame is not None:  # the source ended: every track leaves
                t_end = last_frame.t
                for e in idents.close(t_end, last_frame.index):
                    summary.events[e.kind] = summary.events.get(e.kind, 0) + 1
                    for sink in event_sinks:
                        faults.attempt(
                            f"sink {sink.path}", last_frame.index, sink.write_events, last_frame, [e]
                        )
            failed: BaseException | None = None
            for sink in sinks:  # each one finalised even when another fails
                try:
                    summary.outputs.append(sink.close())
                except Exception as e:
                    failed = failed or e
            summary.faults = dict(faults.counts)
            console.end()
            if failed is not None:
                raise failed
        finally:
            stop.restore()
    if failing:
        raise RunFailed(f"{source.name}: giving up: {failing}", summary)
    return summary


def _enrol_top(enroller: LiveEnroller, dets: Any, name: str, index: int, console: Console) -> None:
    """``enroll NAME``: the top detection of frame ``index`` becomes a shot of ``name``."""
    top = enroller.top(dets)
    if top is None:
        console.log(f"warning: enroll {name}: no detection in frame {index}; nothing enrolled")
    else:
        enroller.enrol(name, top[0], top[1], f"frame {index}")


def _key_e(
    enroller: LiveEnroller,
    dets: Any,
    index: int,
    pipe: LivePipeline,
    commands: Any,
    console: Console,
) -> tuple[np.ndarray, int, str] | None:
    """Key ``e``: enrol the top detection of the frame shown as ``obj-N``, or, on a terminal, return it:
    it waits for its name (the next stdin line)."""
    top = enroller.top(dets) if dets is not None else None
    if top is None:
        why = "" if dets is not None else " (its processing failed)"
        console.log(f"key e: no detection in frame {index} to enrol{why}")
    elif commands is not None and getattr(commands, "interactive", False):
        console.log(
            f"key e: {pipe.names[top[1]]} ({top[2]:.2f}) from frame {index}: "
            f"type its name and Enter (empty: {enroller.auto_name()})"
        )
        return top[0], top[1], f"frame {index}"
    else:
        enroller.enrol(enroller.auto_name(), top[0], top[1], f"frame {index}")
    return None


def make_pipeline(model: str | Path, **kwargs: Any) -> LivePipeline:
    """The real pipeline (:class:`mocha_edge.deploy.pipeline.Pipeline`); the CLI calls this through the module,
    so a test can replace it."""
    from mocha_edge.deploy.pipeline import Pipeline

    return Pipeline(model, **kwargs)


def run(
    model: str | Path,
    source: str,
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
    """Open ``source``, build the pipeline, attach the bank, run the loop (:func:`run_loop`).

    A missing ``bank_path`` starts an empty bank: live enrolments create the file. ``backend`` (a registry engine name) defaults to
    the engine for the model's suffix (:func:`~mocha_edge.deploy.engines.engine_for`); ``gpu_stages`` (auto | on | off): pre/post-processing
    with the CUDA kernels on a GPU engine's buffers (auto: when the engine and the CUDA build allow).
    """
    if backend is None:
        backend = engine_for(model)
    from mocha_edge.deploy.sources import open_source
    from mocha_edge.prototypes import PrototypeBank

    console = console or Console()
    show = opts.show
    ok, why = gui_available()
    if show and not ok:
        raise RunError(f"--show: {why}")
    if show is None:
        show = ok
    sink_paths(sink_uris(opts), str(source).strip())  # bad outputs fail before the source and the model open
    if mode not in ("conditional", "global"):
        raise RunError(f"--mode must be conditional or global, not {mode!r}")
    src = open_source(source, warn=lambda m: console.log(f"warning: {m}"), **(source_options or {}))
    for uri in sink_uris(opts):
        note = crash_note(uri, bool(getattr(src, "live", False)))
        if note is not None:
            console.log(note)
    try:
        bank = None
        if bank_path is not None:
            if Path(bank_path).exists():
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
                                background=True)  # fmt: skip
        window = Window() if show else None
        return run_loop(src, pipe, opts, enroller, commands=commands, console=console, window=window)
    finally:
        src.close()


# ------------------------------------------------------------------------------------------ command
@click.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--prototypes", "bank", type=click.Path(path_type=Path),
              help="Prototype bank (.safetensors) to match against; created by live enrolment when missing. "
              "Without it: detection only.")  # fmt: skip
@click.option("--source", help="Image, folder, video (files: ?loop=1&realtime=1), rtsp://..., v4l2:///dev/videoN, "
              "csi://N (see above).")  # fmt: skip
@click.option("--camera", type=int, metavar="N", help="Shorthand for --source v4l2:///dev/videoN.")
@click.option("--csi", type=int, metavar="N", help="Shorthand for --source csi://N (Jetson CSI camera).")
@click.option("--sink", "sinks", multiple=True, metavar="URI",
              help="An output, repeatable: x.jsonl[?rotate=100MB|daily&keep=N] (JSON lines, appended), out.mkv / "
                   ".avi / .mp4 (annotated video), out.mkv?segment=10m&keep=144 (10-minute files, a day kept); "
                   "{camera} in the path: the source's name (see above).")  # fmt: skip
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
@click.option("--max-frames", type=int, help="Stop after N frames.")
@click.option("--fps-every", default=5.0, show_default=True, help="Seconds between FPS lines (0: none).")
@click.option("--fail-after", default=FAIL_AFTER, show_default=True, metavar="SECONDS",
              help=f"Give up (exit code {EXIT_FAILING}) when every frame has faulted for this long and at least "
                   f"{FAIL_FRAMES} frames in a row, so a supervisor restarts the process (0: never).")  # fmt: skip
@click.option("--tracker", type=click.Choice(TRACKER_CHOICES), default="bytetrack", show_default=True,
              help="Multi-object tracker (ultralytics' ByteTrack / BoT-SORT): one identity per track, events "
                   "(enter, identified, changed, leave); none: identities decided per frame.")  # fmt: skip
@click.option("--leave-after", type=float, default=None, metavar="SECONDS",
              help="A track unseen this long has left (its leave event) [default: 2].")  # fmt: skip
def run_cmd(model: Path, bank: Path | None, source: str | None, camera: int | None, csi: int | None,
            sinks: tuple[str, ...], save: Path | None, jsonl: Path | None, show: bool | None, conf: float, iou: float,
            threshold: float | None, name_conf: float | None, mode: str, backend: str | None, gpu_stages: str,
            max_frames: int | None, fps_every: float, fail_after: float, tracker: str,
            leave_after: float | None) -> None:  # fmt: skip
    """Run the exported MODEL (.onnx from `mocha-edge export`, or a TensorRT .engine) on a live source:
    detect, match against the prototype bank, write/show the results, enrol new objects on the fly.

    \b
    Sources: photo.jpg, a folder of images, clip.mp4, rtsp://..., v4l2:///dev/video0, csi://0
      (camera options: csi://0?width=1280&height=720&fps=60&flip=2; files: clip.mp4?loop=1&realtime=1
      to go round and be paced at the file's rate, fps=N for images and folders [default: 10]).
    Outputs (--sink URI, repeatable): events.jsonl (one line per detection, appended; ?rotate=100MB
      or ?rotate=daily rotates, keeping 5 old files, ?keep=N), out.mkv / out.avi / out.mp4 (annotated
      video; .mkv/.avi stay playable after a crash), out.mkv?segment=10m&keep=144 (timestamped 10-minute
      files, the oldest removed); cam-{camera}.jsonl: {camera} is the source's name. A file's read error ends the run with
      "stopped: error: ..." in the summary, not as an ordinary end.
    Live enrolment: type `enroll NAME` + Enter: the top detection of the next frame becomes a shot of
      NAME (bank saved at once, used from the next frame); key `e` in the window does the same; `quit` stops.
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
    """
    from mocha_edge.deploy.sources import camera_uri, csi_uri

    given = [s for s in (source, camera_uri(camera) if camera is not None else None,
                         csi_uri(csi) if csi is not None else None) if s is not None]  # fmt: skip
    if len(given) != 1:
        raise click.UsageError("give exactly one of --source, --camera, --csi")
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
    opts = RunOptions(save=save, jsonl=jsonl, sinks=list(sinks), show=show, max_frames=max_frames,
                      fps_every=fps_every, fail_after=fail_after, tracker=tracker, rule=rule)  # fmt: skip
    console = Console()
    try:
        summary = run(
            model, given[0], opts, bank_path=bank, backend=backend, conf=conf, iou=iou, mode=mode,
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
