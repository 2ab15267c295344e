"""``mocha-edge run``: the live loop. Source -> pipeline -> outputs, with live enrolment and fault handling.

One frame at a time: read (``mocha_edge.sources``), detect + embed + match (the injected pipeline), then
the outputs: JSON lines (one per detection, flushed every frame), an annotated video (written under a
temporary name and renamed when the run ends, however it ends), a window when a display exists, and an
FPS line with per-stage milliseconds.

Live enrolment: ``enroll NAME`` on standard input (read by a background thread, never blocking the loop)
enrols the top-scoring detection of the next frame as a new shot of NAME; key ``e`` in the window does
the same for the frame shown (the name is asked on the terminal, or ``obj-N``). The bank is saved
atomically and the pipeline matches against it from the next frame.

Stopping: end of a file source, ``--max-frames``, key ``q``/Esc, a ``quit`` line, or Ctrl-C / SIGINT /
SIGTERM. A signal during frame processing is noted and the loop stops after that frame; a signal while
waiting for a frame stops the wait. Either way the video is finalised, the JSON lines closed, a summary
printed, and the exit code is 0: for a camera, Ctrl-C is the normal way to stop.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import copy
import json
import math
import os
import queue
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import click

from mocha_edge.errors import MochaError

if TYPE_CHECKING:  # numpy, the bank and the sources load with the command, not with the CLI
    import numpy as np

    from mocha_edge.prototypes import PrototypeBank
    from mocha_edge.sources import Frame, Source

VIDEO_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
DEFAULT_FPS = 10.0  # video --save rate when the source has none (folders, images)
STAGES = ("pre", "infer", "post", "pool", "match")
WINDOW = "mocha-edge"
COMMANDS_HELP = "commands: `enroll NAME` (top detection of the next frame), `quit`, `help`"


class RunError(MochaError):
    """The live loop cannot start (bad output path, no display for --show, ...)."""


class LivePipeline(Protocol):
    """What the loop needs of :class:`mocha_edge.pipeline.Pipeline` (tests inject fakes)."""

    names: list[str]  # coarse class names
    dim: int  # vector size
    facts: dict[str, Any]  # the export's deployment facts (model_fingerprint; "engine" for engines)
    timings: dict[str, float]  # ms of the last frame: pre, infer, post, pool, match
    identity_names: list[str]  # what Detections.identity indexes (the bank's prototypes() order)

    def set_bank(self, bank: PrototypeBank) -> None: ...
    def __call__(self, bgr: np.ndarray) -> Any: ...


PipelineFactory = Callable[..., LivePipeline]


# ------------------------------------------------------------------------------------------ console
class Console:
    """Log lines and one self-updating status line (on a terminal; plain lines otherwise), on stderr."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self._status = False

    def log(self, msg: str) -> None:
        self.stream.write(("\r\033[K" if self._status else "") + msg + "\n")
        self._status = False
        self.stream.flush()

    def status(self, msg: str) -> None:
        if not self.tty:
            self.log(msg)
            return
        self.stream.write("\r\033[K" + msg)
        self._status = True
        self.stream.flush()

    def end(self) -> None:
        if self._status:
            self.stream.write("\n")
            self._status = False
            self.stream.flush()


class StdinCommands:
    """Lines of standard input, read by a daemon thread; :meth:`poll` never blocks.

    Reads the file descriptor with ``os.read`` (not ``sys.stdin``): a daemon thread blocked inside
    ``sys.stdin``'s buffered reader can abort the interpreter at exit.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.interactive = os.isatty(fd)
        self._q: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, name="mocha-edge-stdin", daemon=True).start()

    @classmethod
    def start(cls) -> StdinCommands | None:
        """A reader of this process's stdin, or None when there is none or we run in the background."""
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return None
        if os.isatty(fd):
            try:  # a background job reading its terminal would be stopped (SIGTTIN)
                if os.tcgetpgrp(fd) != os.getpgrp():
                    return None
            except OSError:
                return None
        return cls(fd)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                return
            if not chunk:
                if buf.strip():
                    self._q.put(buf.decode(errors="replace").strip())
                return
            *lines, buf = (buf + chunk).split(b"\n")
            for line in lines:
                self._q.put(line.decode(errors="replace").strip())

    def poll(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out


# ------------------------------------------------------------------------------------------ outputs
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


class JsonlSink:
    """Detections as JSON lines, written straight to ``path`` (so ``tail -f`` follows it), flushed per frame."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fh: TextIO | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise RunError(f"{self.path}: cannot write ({e.strerror or e})") from None
        self.lines = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.fh is None or not records:
            return
        self.fh.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self.fh.flush()
        self.lines += len(records)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


class VideoSink:
    """An annotated video: written to a temporary file beside ``path``, renamed onto it by :meth:`close`.

    Frames of another size than the first are resized to it (a folder of mixed images).
    """

    def __init__(self, path: Path, fps: float) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in VIDEO_FOURCC:
            raise RunError(f"{self.path}: --save needs one of {', '.join(VIDEO_FOURCC)}")
        self.fps = float(fps)
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self.tmp: Path | None = None
        self.writer: Any = None

    def write(self, bgr: np.ndarray) -> None:
        import cv2
        import numpy as np

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
                raise RunError(
                    f"{self.path}: this OpenCV cannot encode {self.path.suffix} video; try .avi (MJPG)"
                )
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(np.ascontiguousarray(bgr))
        self.frames += 1

    def close(self) -> bool:
        """Finish the file and move it to ``path``; True when a video was written."""
        if self.writer is None:
            return False
        self.writer.release()
        self.writer = None
        assert self.tmp is not None
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        return True


def gui_available(build_info: str | None = None, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """``(can open a window, why not)``: a display (``DISPLAY``/``WAYLAND_DISPLAY``) and an OpenCV GUI backend."""
    from mocha_edge.sources import opencv_build_value

    env = dict(os.environ) if env is None else env
    if not (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    gui = opencv_build_value("GUI", build_info)
    if not gui or gui.upper().startswith("NONE"):
        return False, "this OpenCV has no GUI backend (a -headless build?)"
    return True, ""


def _colour(key: str) -> tuple[int, int, int]:
    import cv2
    import numpy as np

    h = sum((i + 1) * ord(ch) for i, ch in enumerate(key)) % 180
    hsv = np.uint8([[[h, 200, 255]]])

    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def annotate(bgr: np.ndarray, dets: Any, class_names: list[str], identity_names: list[str]) -> np.ndarray:
    """A copy of ``bgr`` with boxes and labels: the identity and its similarity when matched, else the
    coarse class and score."""
    import cv2

    out = bgr.copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 360))
    scale = max(0.35, min(h, w) / 900)
    for i in range(len(dets.scores)):
        x1, y1, x2, y2 = (round(float(v)) for v in dets.boxes[i])
        ident, c = int(dets.identity[i]), int(dets.cls[i])
        cname = class_names[c] if 0 <= c < len(class_names) else str(c)
        if 0 <= ident < len(identity_names):
            label = f"{identity_names[ident]} {float(dets.similarity[i]):.2f}"
            key = identity_names[ident]
        else:
            label, key = f"{cname} {float(dets.scores[i]):.2f}", cname
        col = _colour(key)
        cv2.rectangle(out, (x1, y1), (x2, y2), col, thick)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(y1, th + base + 2)
        cv2.rectangle(out, (x1, ty - th - base - 2), (x1 + tw + 2, ty), col, -1)
        cv2.putText(
            out, label, (x1 + 1, ty - base - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA
        )
    return out


class Window:
    """An OpenCV window; :meth:`show` returns the key pressed (-1 none) or ``"closed"``."""

    def __init__(self) -> None:
        import cv2

        cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)

    def show(self, bgr: np.ndarray) -> int | str:
        import cv2

        cv2.imshow(WINDOW, bgr)
        key = cv2.waitKey(1)
        if cv2.getWindowProperty(WINDOW, cv2.WND_PROP_VISIBLE) < 1:
            return "closed"
        return key & 0xFF if key >= 0 else -1

    def close(self) -> None:
        import cv2

        with contextlib.suppress(cv2.error):
            cv2.destroyWindow(WINDOW)
            cv2.waitKey(1)


# ------------------------------------------------------------------------------------------ enrolment
def attach_bank(
    pipe: LivePipeline, bank: PrototypeBank, path: Path | str, log: Callable[[str], None]
) -> None:
    """Give ``bank`` to the pipeline, which refuses one of another model, vector size or space (the error
    names ``path``); precision warnings become log lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pipe.set_bank(bank)
        except MochaError as e:
            raise type(e)(f"{path}: {e}") from None
    for w in caught:
        log(f"warning: {path}: {w.message}")


def _precision(pipe: LivePipeline) -> str:
    """The precision the deployed model computes vectors at (an engine's build facts; ONNX: fp32)."""
    return str((pipe.facts.get("engine") or {}).get("precision", "fp32"))


class LiveEnroller:
    """Adds shots to the bank while the loop runs: copy the bank, add the shot, recalibrate, save atomically,
    hand the new bank to the pipe.

    With ``background`` (what ``run`` uses) the copy / recalibration / save run on one worker thread, in
    submission order, so the frame loop never waits for them; :meth:`poll` (called by the loop before each
    frame) hands finished banks to the pipe on the frame thread, and :meth:`close` waits for the rest."""

    def __init__(
        self,
        pipe: LivePipeline,
        bank: PrototypeBank | None,
        path: Path | None,
        log: Callable[[str], None],
        background: bool = False,
    ) -> None:
        self.pipe, self.bank, self.path, self.log = pipe, bank, path, log
        self.enrolled: list[str] = []
        self.background = background
        self._latest = bank  # the bank after every submitted edit (the worker's view)
        self._jobs: collections.deque[concurrent.futures.Future] = collections.deque()
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None

    def auto_name(self) -> str:
        have = self.bank.identities if self.bank is not None else {}
        n = 1
        while f"obj-{n}" in have:
            n += 1
        return f"obj-{n}"

    @staticmethod
    def top(dets: Any) -> tuple[np.ndarray, int, float] | None:
        """``(vector, class, score)`` of the top-scoring detection, or None."""
        import numpy as np

        if len(dets.scores) == 0:
            return None
        i = int(np.argmax(dets.scores))
        return np.asarray(dets.vectors[i], np.float32), int(dets.cls[i]), float(dets.scores[i])

    def enrol(self, name: str, vector: np.ndarray, coarse: int, where: str) -> bool:
        """Enrol one shot of ``name`` (at once, or queued on the worker with ``background``); a one-line
        confirmation or warning when it is done. True when the edit was made or queued."""
        import numpy as np

        if self.path is None:
            self.log("warning: live enrolment needs a bank file: start with --prototypes FILE")
            return False
        vec = np.array(vector, np.float32, copy=True)  # the frame's buffers move on
        if not self.background:
            self._apply(*self._edit(name, vec, coarse, where))
            return True
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mocha-enrol")
        self._jobs.append(self._worker.submit(self._edit, name, vec, coarse, where))
        return True

    def _edit(self, name: str, vector: np.ndarray, coarse: int, where: str) -> tuple[Any, str, str]:
        """Copy the latest bank, add the shot (recalibrates), save it: ``(bank or None, name, message)``."""
        from mocha_edge.prototypes import BankError, PrototypeBank
        from mocha_edge.space import match_dim, space_id, to_space

        names = list(self.pipe.names)
        fingerprint = str(self.pipe.facts["model_fingerprint"])
        space = getattr(self.pipe, "space", None)  # the model's matching space (centring + projection)
        bank = (
            copy.deepcopy(self._latest)
            if self._latest is not None
            else PrototypeBank(match_dim(space, self.pipe.dim), fingerprint, names, _precision(self.pipe),
                               space=space_id(space))
        )  # fmt: skip
        shot = to_space(space, vector[None], coarse)
        try:
            bank.add(name, coarse, shot, append=name in bank.identities,
                     negatives=space.negatives if space is not None else None)  # fmt: skip
        except BankError as e:
            return None, name, f"warning: enroll {name}: {e}"
        assert self.path is not None
        try:
            bank.save(self.path)
        except OSError as e:
            return (
                None,
                name,
                f"warning: enroll {name}: cannot save {self.path} ({e.strerror or e}); not enrolled",
            )
        self._latest = bank
        k = len(bank.identities[name].shots)
        msg = (
            f"enrolled {name!r} ({names[coarse]}) from {where}: {k} shot{'s' * (k > 1)}, "
            f"{len(bank.identities)} identities, saved {self.path}"
            + f" (threshold {bank.identities[name].threshold:.3f})"
            * (space is not None)
        )
        return bank, name, msg

    def _apply(self, bank: Any, name: str, msg: str) -> None:
        """On the frame thread: hand a new bank to the pipe, or say why not."""
        if bank is not None:
            assert self.path is not None
            attach_bank(self.pipe, bank, self.path, self.log)
            self.bank = bank
            self.enrolled.append(name)
        self.log(msg)

    def poll(self, wait: bool = False) -> None:
        """Apply the finished background edits, in order (all of them with ``wait``)."""
        while self._jobs and (wait or self._jobs[0].done()):
            self._apply(*self._jobs.popleft().result())

    def close(self) -> None:
        """Wait for queued edits (the bank file is final afterwards) and stop the worker."""
        self.poll(wait=True)
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None


# ------------------------------------------------------------------------------------------ loop
@dataclass
class RunOptions:
    """Outputs and limits of one run."""

    save: Path | None = None
    jsonl: Path | None = None
    show: bool | None = None  # None: a window when a display exists
    max_frames: int | None = None
    fps_every: float = 5.0  # seconds between FPS lines (0: none)
    handle_signals: bool = True  # SIGINT/SIGTERM stop the loop cleanly (main thread only)


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
    video: Path | None = None
    video_frames: int = 0
    jsonl: Path | None = None
    jsonl_lines: int = 0

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
        if self.video is not None:
            parts.append(f"wrote {self.video} ({self.video_frames} frames)")
        if self.jsonl is not None:
            parts.append(f"wrote {self.jsonl} ({self.jsonl_lines} lines)")
        return "; ".join(parts)


class _Stop:
    """SIGINT/SIGTERM handling: while ``interruptible`` (waiting for a frame) a signal raises
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
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handler)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


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
    and ``close()``. Outputs are finalised whatever stops the loop; errors propagate after that.
    """
    from mocha_edge.sources import SourceError

    console = console or Console()
    summary = RunSummary(source.name)
    video = VideoSink(opts.save, source.fps or DEFAULT_FPS) if opts.save is not None else None
    jsonl = JsonlSink(opts.jsonl) if opts.jsonl is not None else None
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
                    enroller.enrol(line or enroller.auto_name(), vec, coarse, where)
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
                summary.stopped = "end of source"
                break
            enroller.poll()  # banks the worker finished since the last frame
            t1 = time.perf_counter()
            dets = pipe(frame.image_bgr)
            t2 = time.perf_counter()
            names = pipe.identity_names  # those this frame was matched against (before any enrolment)
            for name in pending:
                top = enroller.top(dets)
                if top is None:
                    console.log(
                        f"warning: enroll {name}: no detection in frame {frame.index}; nothing enrolled"
                    )
                else:
                    enroller.enrol(name, top[0], top[1], f"frame {frame.index}")
            pending.clear()
            summary.frames += 1
            summary.detections += len(dets.scores)
            if jsonl is not None:
                jsonl.write(detection_records(frame, dets, list(pipe.names), names))
            if video is not None or window is not None:
                shown = annotate(frame.image_bgr, dets, list(pipe.names), names)
                if video is not None:
                    video.write(shown)
                if window is not None:
                    key = window.show(shown)
                    if key == "closed" or key in (27, ord("q")):
                        stop.requested = stop.requested or ("window closed" if key == "closed" else "key q")
                    elif key == ord("e"):
                        top = enroller.top(dets)
                        if top is None:
                            console.log(f"key e: no detection in frame {frame.index} to enrol")
                        elif commands is not None and getattr(commands, "interactive", False):
                            awaiting = (top[0], top[1], f"frame {frame.index}")
                            console.log(
                                f"key e: {pipe.names[top[1]]} ({top[2]:.2f}) from frame {frame.index}: "
                                f"type its name and Enter (empty: {enroller.auto_name()})"
                            )
                        else:
                            enroller.enrol(enroller.auto_name(), top[0], top[1], f"frame {frame.index}")
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
            if jsonl is not None:
                jsonl.close()
                summary.jsonl, summary.jsonl_lines = jsonl.path, jsonl.lines
            if video is not None and video.close():
                summary.video, summary.video_frames = video.path, video.frames
            console.end()
        finally:
            stop.restore()
    return summary


def make_pipeline(model: str | Path, **kwargs: Any) -> LivePipeline:
    """The real pipeline (:class:`mocha_edge.pipeline.Pipeline`); the CLI calls this through the module,
    so a test can replace it."""
    from mocha_edge.pipeline import Pipeline

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

    A missing ``bank_path`` starts an empty bank: live enrolments create the file. ``backend`` defaults to
    ``trt`` for a ``.engine`` and ``ort`` otherwise; ``gpu_stages`` (auto | on | off): pre/post-processing
    with the CUDA kernels on a GPU engine's buffers (auto: when the engine and the CUDA build allow).
    """
    if backend is None:
        backend = "trt" if Path(model).suffix == ".engine" else "ort"
    from mocha_edge.prototypes import PrototypeBank
    from mocha_edge.sources import open_source

    console = console or Console()
    show = opts.show
    ok, why = gui_available()
    if show and not ok:
        raise RunError(f"--show: {why}")
    if show is None:
        show = ok
    if opts.save is not None and Path(opts.save).suffix.lower() not in VIDEO_FOURCC:
        raise RunError(f"{opts.save}: --save needs one of {', '.join(VIDEO_FOURCC)}")
    if mode not in ("conditional", "global"):
        raise RunError(f"--mode must be conditional or global, not {mode!r}")
    src = open_source(source, warn=lambda m: console.log(f"warning: {m}"), **(source_options or {}))
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
@click.option("--source", help="Image, folder, video, rtsp://..., v4l2:///dev/videoN, csi://N (see above).")
@click.option("--camera", type=int, metavar="N", help="Shorthand for --source v4l2:///dev/videoN.")
@click.option("--csi", type=int, metavar="N", help="Shorthand for --source csi://N (Jetson CSI camera).")
@click.option("--save", type=click.Path(path_type=Path), help="Annotated video (.mp4/.avi/.mkv/.mov).")
@click.option(
    "--jsonl", type=click.Path(path_type=Path), help="One JSON line per detection, flushed per frame."
)
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
@click.option("--backend", type=click.Choice(["ort", "trt"]), default=None,
              help="ONNX Runtime or TensorRT [default: trt for a .engine, else ort].")  # fmt: skip
@click.option("--gpu-stages", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Letterbox, decode/NMS and pooling with the CUDA kernels on a GPU engine's buffers "
                   "(auto: when the engine and the CUDA build allow; the reason is printed when not).")  # fmt: skip
@click.option("--max-frames", type=int, help="Stop after N frames.")
@click.option("--fps-every", default=5.0, show_default=True, help="Seconds between FPS lines (0: none).")
def run_cmd(model: Path, bank: Path | None, source: str | None, camera: int | None, csi: int | None,
            save: Path | None, jsonl: Path | None, show: bool | None, conf: float, iou: float,
            threshold: float | None, name_conf: float | None, mode: str, backend: str | None, gpu_stages: str,
            max_frames: int | None, fps_every: float) -> None:  # fmt: skip
    """Run the exported MODEL (.onnx from `mocha-edge export`, or a TensorRT .engine) on a live source:
    detect, match against the prototype bank, write/show the results, enrol new objects on the fly.

    \b
    Sources: photo.jpg, a folder of images, clip.mp4, rtsp://..., v4l2:///dev/video0, csi://0
      (camera options: csi://0?width=1280&height=720&fps=60&flip=2).
    Live enrolment: type `enroll NAME` + Enter: the top detection of the next frame becomes a shot of
      NAME (bank saved at once, used from the next frame); key `e` in the window does the same; `quit` stops.
    Faults: a lost camera reconnects (backoff 0.5 s to 8 s); unreadable images are skipped with a warning.
    Ctrl-C / SIGTERM stop cleanly (video finalised, JSON lines closed, summary printed), exit code 0.

    \b
    Examples:
      mocha-edge run student.onnx --prototypes my.bank --source clip.mp4 --save out.mp4 --jsonl events.jsonl
      mocha-edge run student.engine --backend trt --prototypes my.bank --csi 0
      mocha-edge run student.onnx --camera 0 --no-show --jsonl events.jsonl --max-frames 100
    """
    from mocha_edge.sources import camera_uri, csi_uri

    given = [s for s in (source, camera_uri(camera) if camera is not None else None,
                         csi_uri(csi) if csi is not None else None) if s is not None]  # fmt: skip
    if len(given) != 1:
        raise click.UsageError("give exactly one of --source, --camera, --csi")
    if max_frames is not None and max_frames < 1:
        raise click.BadParameter("must be >= 1", param_hint="--max-frames")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise click.BadParameter("a cosine in [-1, 1]", param_hint="--threshold")
    opts = RunOptions(save=save, jsonl=jsonl, show=show, max_frames=max_frames, fps_every=fps_every)
    summary = run(
        model, given[0], opts, bank_path=bank, backend=backend, conf=conf, iou=iou, mode=mode,
        gpu_stages=gpu_stages, threshold=threshold, name_conf=name_conf, pipeline_factory=make_pipeline,
        commands=StdinCommands.start(), console=Console(),
    )  # fmt: skip
    click.echo(summary.line())


__all__ = [
    "Console",
    "JsonlSink",
    "LiveEnroller",
    "RunError",
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
]
