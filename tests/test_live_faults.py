"""`mocha-edge run` left running (issue 14, items 3, 4 and 10): a fault on one frame never ends the run,
a run that can do no work gives up with its own exit code, SIGHUP finalises the outputs, and the stdin
command reader is linear and bounded.

Faults are injected with fake pipelines and a sink wrapper; SIGHUP is sent to a real process.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from test_run import FakePipe, Quiet, frames_of, loop, read_jsonl, wait_for_output, write_video

from mocha_edge.cli import cli
from mocha_edge.deploy import live
from mocha_edge.deploy.console import Console, LineSplitter, StdinCommands
from mocha_edge.deploy.live import EXIT_FAILING, FaultLog, RunFailed
from mocha_edge.deploy.sources import open_source

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------ fakes
class FailingPipe(FakePipe):
    """Raises on the calls (0-based) in ``bad`` (a set, or a predicate)."""

    def __init__(self, bad, exc: type[Exception] = RuntimeError, delay: float = 0.0) -> None:
        super().__init__(delay=delay)
        self.bad, self.exc = bad, exc

    def __call__(self, bgr: np.ndarray) -> SimpleNamespace:
        n = self.calls
        out = super().__call__(bgr)
        if self.bad(n) if callable(self.bad) else n in self.bad:
            raise self.exc(f"native error on call {n}")
        return out


class NanPipe(FakePipe):
    """NaN boxes on the calls in ``bad`` (a broken engine's output)."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad = bad

    def __call__(self, bgr: np.ndarray) -> SimpleNamespace:
        n = self.calls
        out = super().__call__(bgr)
        if n in self.bad:
            out.boxes = np.full_like(out.boxes, np.nan)
        return out


class DiskFull:
    """Wraps a sink: ``write`` raises ENOSPC on the frames in ``bad`` (a full disk)."""

    def __init__(self, sink, bad: set[int]) -> None:
        self.sink, self.bad = sink, bad
        self.path, self.needs_records, self.needs_image = sink.path, sink.needs_records, sink.needs_image
        self.needs_events = sink.needs_events

    def write(self, frame, records, annotated) -> None:
        if frame.index in self.bad:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        self.sink.write(frame, records, annotated)

    def close(self):
        return self.sink.close()


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    """A 24-frame 64x48 video, each frame another grey."""
    return write_video(tmp_path / "clip.mp4", [np.full((48, 64, 3), 10 * i, np.uint8) for i in range(24)])


def warnings_of(console: Quiet, kind: str) -> list[str]:
    return [line for line in console.lines if line.startswith("warning:") and kind in line]


# ------------------------------------------------------------------------------------------ item 3: faults
def test_pipeline_fault_skips_detections_and_keeps_the_recording(clip: Path, tmp_path: Path) -> None:
    save, events = tmp_path / "v.mp4", tmp_path / "e.jsonl"
    with open_source(str(clip)) as src:
        summary, _, console = loop(src, FailingPipe({3, 4, 5}), save=save, jsonl=events)
    assert summary.frames == 24 and summary.stopped == "end of source"
    assert summary.faults == {"pipeline: RuntimeError": 3} and summary.lost == 3
    assert frames_of(save) == 24  # the faulted frames are recorded without boxes: the timeline holds
    assert {r["frame"] for r in read_jsonl(events)} == set(range(24)) - {3, 4, 5}
    (first,) = warnings_of(console, "pipeline: RuntimeError")  # once, with its message
    assert first.startswith(
        "warning: frame 3: pipeline: RuntimeError: native error on call 3 (the run goes on"
    )
    assert "faults: pipeline: RuntimeError x3 (3 frames lost)" in summary.line()


def test_a_full_disk_under_one_sink_does_not_stop_the_others(
    clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save, events = tmp_path / "v.mp4", tmp_path / "e.jsonl"
    real = live.open_sinks

    def open_sinks(uris, **kw):
        return [DiskFull(s, set(range(5, 10))) if s.path == events else s for s in real(uris, **kw)]

    monkeypatch.setattr(live, "open_sinks", open_sinks)
    with open_source(str(clip)) as src:
        summary, _, console = loop(src, save=save, jsonl=events)
    assert summary.frames == 24 and summary.stopped == "end of source"
    assert frames_of(save) == 24 and summary.video_frames == 24
    assert {r["frame"] for r in read_jsonl(events)} == set(range(24)) - set(range(5, 10))
    kind = f"sink {events}: OSError"
    assert summary.faults == {kind: 5} and summary.lost == 0  # the video took every frame
    (first,) = warnings_of(console, kind)
    assert "frame 5" in first and "No space left on device" in first


def test_nan_boxes_are_a_drawing_fault_not_the_end(clip: Path, tmp_path: Path) -> None:
    save = tmp_path / "v.mp4"
    with open_source(str(clip)) as src:
        summary, _, console = loop(src, NanPipe({2, 3}), save=save)
    assert summary.frames == 24 and summary.stopped == "end of source"
    assert summary.faults == {"annotate: ValueError": 2} and summary.lost == 2
    assert frames_of(save) == 24
    assert len(warnings_of(console, "annotate: ValueError")) == 1


def test_fault_lines_are_rate_limited_per_kind() -> None:
    lines: list[str] = []
    now = [0.0]
    log = FaultLog(lines.append, every=60.0, clock=lambda: now[0])
    for i in range(800):  # one fault every 0.125 s for 100 s
        now[0] = i * 0.125
        log.record("sink a.jsonl", OSError(28, "No space left on device"), i)
        if i == 400:
            log.record("pipeline", RuntimeError("boom\n  detail"), i)
    assert lines == [
        "warning: frame 0: sink a.jsonl: OSError: [Errno 28] No space left on device (the run goes on; "
        "this fault's repeats are summarised at most every 60 s)",
        "warning: frame 400: pipeline: RuntimeError: boom detail (the run goes on; this fault's repeats "
        "are summarised at most every 60 s)",
        "warning: sink a.jsonl: OSError: 480 more in the last 60 s (481 in all; last: frame 480: "
        "[Errno 28] No space left on device)",
    ]
    assert log.counts == {"sink a.jsonl: OSError": 800, "pipeline: RuntimeError": 1}


def test_every_frame_faulting_logs_one_line(clip: Path, tmp_path: Path) -> None:
    with open_source(str(clip)) as src:
        summary, _, console = loop(src, FailingPipe(lambda n: True), save=tmp_path / "v.mp4", fail_after=0)
    assert summary.stopped == "end of source" and summary.faults == {"pipeline: RuntimeError": 24}
    assert summary.lost == 24 and len([x for x in console.lines if x.startswith("warning:")]) == 1
    assert frames_of(tmp_path / "v.mp4") == 24


def test_occasional_faults_never_end_the_run(clip: Path) -> None:
    """Every other frame faults, with the give-up rule at its most eager (2 frames, no time): one good
    frame starts the count again."""
    with open_source(str(clip)) as src:
        summary, _, _ = loop(src, FailingPipe(lambda n: n % 2 == 0), fail_after=1e-9, fail_frames=2)
    assert summary.stopped == "end of source" and summary.faults == {"pipeline: RuntimeError": 12}


def test_persistent_faults_give_up_after_the_outputs_are_final(clip: Path, tmp_path: Path) -> None:
    """A pipeline that breaks for good (from its 10th frame) on an endless source: the run ends once
    every frame has been lost for fail_after seconds and fail_frames frames, with the video final."""
    save, events = tmp_path / "v.mp4", tmp_path / "e.jsonl"
    pipe = FailingPipe(lambda n: n >= 10, delay=0.005)
    with open_source(f"{clip}?loop=1") as src, pytest.raises(RunFailed) as e:
        loop(src, pipe, save=save, jsonl=events, fail_after=0.1, fail_frames=20)
    s = e.value.summary
    assert e.value.exit_code == EXIT_FAILING == 3
    assert (
        s.stopped.startswith("failing: every frame lost for ") and "last: pipeline: RuntimeError" in s.stopped
    )
    assert s.frames >= 30 and s.lost == s.frames - 10 and s.faults == {"pipeline: RuntimeError": s.lost}
    assert str(e.value).startswith(f"{clip}?loop=1: giving up: every frame lost")
    assert frames_of(save) == s.frames and {r["frame"] for r in read_jsonl(events)} == set(range(10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "e.jsonl", "v.mp4"]  # no .partial


def test_cli_exit_code_when_giving_up(clip: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "make_pipeline", lambda model, **kw: FailingPipe(lambda n: True))
    r = CliRunner().invoke(cli, ["run", "m.onnx", "--source", f"{clip}?loop=1", "--no-show", "--fps-every", "0",
                                 "--fail-after", "0.01"])  # fmt: skip
    assert r.exit_code == EXIT_FAILING, r.output
    assert "stopped: failing: every frame lost" in r.output and "faults: pipeline: RuntimeError x" in r.output
    assert r.output.strip().splitlines()[-1].startswith(f"error: {clip}?loop=1: giving up: every frame lost")
    r = CliRunner().invoke(cli, ["run", "m.onnx", "--source", str(clip), "--fail-after", "-1"])
    assert r.exit_code == 2 and "--fail-after" in r.output


def test_console_survives_a_hung_up_terminal() -> None:
    class HungUp:
        def write(self, text: str) -> int:
            raise OSError(errno.EIO, "Input/output error")

        def flush(self) -> None:
            pass

        def isatty(self) -> bool:
            return True

    c = Console(HungUp())  # type: ignore[arg-type]
    c.status("12 FPS")
    c.log("warning: something")
    c.end()
    assert c.lost


# ------------------------------------------------------------------------------------------ item 4: SIGHUP
DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import mocha_edge.deploy.live as live
    from test_run import FakePipe

    live.make_pipeline = lambda model, **kw: FakePipe()
    from mocha_edge.cli import main
    main(sys.argv[1:])
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="SIGHUP is POSIX")
def test_sighup_finalises_the_recording(clip: Path, tmp_path: Path) -> None:
    """A real `mocha-edge run` on an endless paced video, recording: a hang-up (SIGHUP, what an SSH drop
    sends) stops it like SIGTERM: exit 0, the mp4 renamed into place and playable, no .partial left."""
    out_dir = tmp_path / "out"
    save, events = out_dir / "out.mp4", out_dir / "e.jsonl"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(TESTS)))
    proc = subprocess.Popen(
        [sys.executable, str(driver), "run", "m.onnx", "--source", f"{clip}?loop=1&realtime=1",
         "--sink", str(save), "--sink", str(events), "--no-show", "--fps-every", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        wait_for_output(proc, events)
        time.sleep(0.5)  # a few more frames at the video's 10 FPS
        assert list(out_dir.glob(".out.*partial*")), "the recording should be under way"
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped: SIGHUP" in out and f"wrote {save}" in out, out
    n = frames_of(save)  # cv2 reads it: a finished file
    assert n > 0 and n == len({r["frame"] for r in read_jsonl(events)})
    assert sorted(p.name for p in out_dir.iterdir()) == ["e.jsonl", "out.mp4"]


# ------------------------------------------------------------------------------------------ item 10: stdin
def test_line_splitter_is_linear_and_bounded() -> None:
    """Input without a newline: every byte is searched once (the work is proportional to the input: 16 MB
    costs twice 8 MB) and the buffer never holds more than one line's limit."""
    chunk = b"x" * 4096
    work = {}
    for mb in (8, 16):
        s = LineSplitter(max_line=4096)
        most = 0
        for _ in range(mb * 256):
            assert s.feed(chunk) == []
            most = max(most, s.buffered)
        assert most <= 4096 and s.overlong == 1
        assert s.feed(b"tail\nquit\n") == [b"quit"] and s.finish() is None  # the long line dropped whole
        work[mb] = s.scanned
    assert work[8] == 8 * 2**20 + 10 and work[16] == 16 * 2**20 + 10


def test_line_splitter_splits_like_split() -> None:
    """Random lines (some over the limit, at it, empty) in random chunks: the same lines as bytes.split,
    minus the overlong ones, counted."""
    rng = np.random.default_rng(0)
    lengths = [*rng.integers(0, 6000, 300).tolist(), 4096, 4097, 0]
    lines = [bytes(rng.integers(32, 127, n, dtype=np.uint8)) for n in lengths]
    data = b"\n".join(lines) + b"\nlast-without-newline"
    s, got, i = LineSplitter(max_line=4096), [], 0
    while i < len(data):
        n = int(rng.integers(1, 9000))
        got += s.feed(data[i : i + n])
        i += n
    assert got == [x for x in lines if len(x) <= 4096]
    assert s.overlong == sum(len(x) > 4096 for x in lines)
    assert s.finish() == b"last-without-newline"


def _collect(cmds: StdinCommands, want: int, max_calls: int = 100_000) -> list[list[str]]:
    """Poll until ``want`` commands came (a guard against a hang, not a time limit on speed)."""
    polls: list[list[str]] = []
    deadline = time.monotonic() + 120
    while sum(map(len, polls)) < want:
        assert time.monotonic() < deadline, polls
        got = cmds.poll()
        if got:
            polls.append(got)
        else:
            time.sleep(0.01)
    return polls


def test_stdin_overlong_line_is_dropped_with_one_warning() -> None:
    """8 MB without a newline through a pipe, then commands: the long line is dropped (one warning),
    each byte examined once, and the commands after it still arrive."""
    r, w = os.pipe()
    warned: list[str] = []
    cmds = StdinCommands(r, warn=warned.append)
    big = b"y" * (8 * 2**20)
    tail = b"\nenroll a\nquit\n"

    def writer() -> None:
        with os.fdopen(w, "wb") as fh:
            fh.write(big + tail)

    t = threading.Thread(target=writer)
    t.start()
    polls = _collect(cmds, 2)
    t.join()
    assert [c for p in polls for c in p] == ["enroll a", "quit"]
    assert warned == ["warning: stdin: 1 line longer than 4096 bytes ignored"]
    assert cmds.done.wait(10) and cmds.splitter.scanned == len(big) + len(tail)
    os.close(r)


def test_stdin_pending_commands_are_bounded() -> None:
    """50 lines while nobody polls: at most max_pending wait; each poll returns at most that many, and
    every line arrives, in order."""
    r, w = os.pipe()
    cmds = StdinCommands(r, warn=lambda m: None, max_pending=4)
    with os.fdopen(w, "wb") as fh:
        fh.write(b"".join(f"enroll n{i}\n".encode() for i in range(50)))
    deadline = time.monotonic() + 30
    while cmds._q.qsize() < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    assert cmds._q.qsize() == 4  # the reader waits for the loop
    polls = _collect(cmds, 50)
    assert all(len(p) <= 4 for p in polls)
    assert [c for p in polls for c in p] == [f"enroll n{i}" for i in range(50)]
    os.close(r)
