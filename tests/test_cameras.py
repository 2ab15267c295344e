"""Several cameras in one `mocha-edge run` (issue 15, item 4): `--source NAME=URI`, a capture thread per
source (live: newest frame only, drops counted; files: every frame, in order), one shared pipeline taking
the cameras in turn, per-camera trackers and outputs, a camera that drops out while the others go on, the
per-camera status line and summary.

Fakes only (FakePipe, simulated cameras): fast, no model.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from test_run import Commands, FakeCamera, FakePipe, Quiet, frames_of, read_jsonl, write_video

from mocha_edge.cli import cli
from mocha_edge.deploy import live
from mocha_edge.deploy.cameras import (
    FILE_AHEAD,
    CameraError,
    Capture,
    Captures,
    Stopper,
    camera_specs,
    parse_source_arg,
    split_sinks,
)
from mocha_edge.deploy.live import LiveEnroller, RunOptions, run_loop
from mocha_edge.deploy.sinks import parse_sink
from mocha_edge.deploy.sources import Backoff, Frame, open_source

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------------------ helpers
def clip(path: Path, n: int, base: int) -> Path:
    """An ``n``-frame 64x48 video, frame i of grey ``base + 4 i``."""
    return write_video(path, [np.full((48, 64, 3), base + 4 * i, np.uint8) for i in range(n)])


class Endless(FakeCamera):
    """A camera that delivers a frame every ``period`` s (after ``n`` frames it fails: unplugged)."""

    def __init__(self, n: int, start: int, period: float = 0.001) -> None:
        super().__init__(n, start)
        self.period = period

    def read(self):
        if self.n and self.period:
            time.sleep(self.period)
        return super().read()


def camera(n: int | list[int], period: float = 0.001, name: str = "v4l2:///dev/video0", **kw):
    """A simulated live source: each open serves the next count of frames (0: the open fails); its sleep
    is a Stopper's, so the loop's end stops it even while it stays lost."""
    script = n if isinstance(n, list) else [n]
    opened: list[int] = []

    def factory(uri):
        k = script[len(opened)] if len(opened) < len(script) else 0
        opened.append(k)
        return Endless(k, start=10 * len(opened), period=period)

    stopper = Stopper()
    src = open_source(name, capture_factory=factory, sleep=stopper.sleep, **kw)
    return src


def run_cams(sources, pipe=None, console=None, commands=None, bank_path=None, **opts):
    pipe = pipe or FakePipe()
    console = console or Quiet()
    enroller = LiveEnroller(pipe, None, bank_path, console.log)
    o = RunOptions(handle_signals=False, fps_every=opts.pop("fps_every", 0), **opts)
    summary = run_loop(sources, pipe, o, enroller, commands=commands, console=console)
    return summary, pipe, console


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("front=rtsp://user:pw@cam1/live", ("front", "rtsp://user:pw@cam1/live")),
        ("rtsp://h/p?a=b", (None, "rtsp://h/p?a=b")),  # "://" before the "=": no name
        ("clip.mp4?fps=5", (None, "clip.mp4?fps=5")),  # a query, not a name
        ("back=clip.mp4?fps=5&loop=1", ("back", "clip.mp4?fps=5&loop=1")),
        ("cam_2-b=csi://0", ("cam_2-b", "csi://0")),
        ("door=0", ("door", "0")),
        ("data/a=b.mp4", (None, "data/a=b.mp4")),  # a path with "=" in a file name
        ("  yard = v4l2:///dev/video1 ", ("yard", "v4l2:///dev/video1")),
        ("clip.mp4", (None, "clip.mp4")),
    ],
)
def test_source_names_parse(text: str, expected: tuple[str | None, str]) -> None:
    assert parse_source_arg(text) == expected


def test_bad_and_repeated_names_are_one_line_errors() -> None:
    with pytest.raises(CameraError, match=r"camera name 'my cam' must be letters, digits, _ or -") as e:
        parse_source_arg("my cam=rtsp://admin:hunter2@cam/live")
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CameraError, match="no URI after the name"):
        parse_source_arg("front=")
    with pytest.raises(CameraError, match=r"camera name 'gate\.1'"):
        parse_source_arg("gate.1=csi://0")
    with pytest.raises(
        CameraError, match=r"--source front=rtsp://u:\*\*\*@b/x: the same name as --source front=a"
    ):
        camera_specs(["front=a.mp4", "front=rtsp://u:secret@b/x"])
    with pytest.raises(
        CameraError, match=r"the same label 'clip' as --source x/clip.mp4; give each camera a"
    ):
        camera_specs(["x/clip.mp4", "y/clip.mp4"])
    specs = camera_specs(
        ["front=rtsp://u:pw@h/live?token=abc", "csi://0", "v4l2:///dev/video2", "y/clip.mp4"]
    )
    assert [(s.name, s.label, s.named) for s in specs] == [
        ("front", "front", True),
        ("csi://0", "csi0", False),
        ("v4l2:///dev/video2", "video2", False),
        ("y/clip.mp4", "clip", False),
    ]
    assert specs[0].uri == "rtsp://u:pw@h/live?token=abc"  # only the capture gets the real URI


def test_outputs_shared_or_per_camera(tmp_path: Path) -> None:
    uris = [parse_sink(str(tmp_path / "all.jsonl")), parse_sink(str(tmp_path / "v-{camera}.mkv"))]
    per, shared = split_sinks(uris, ["a", "b"])
    assert per == uris[1:] and shared == uris[:1]
    with pytest.raises(CameraError, match=r"out.mkv: 2 cameras cannot share one video; put \{camera\} in its "
                       r"path \(.*out-\{camera\}.mkv\)"):  # fmt: skip
        split_sinks([parse_sink(str(tmp_path / "out.mkv"))], ["a", "b"])
    assert split_sinks([parse_sink(str(tmp_path / "out.mkv"))], ["a"])[1]  # one camera: fine
    with pytest.raises(Exception, match="the same file"):  # a camera's file = the shared one
        split_sinks(
            [parse_sink(str(tmp_path / "a.jsonl")), parse_sink(str(tmp_path / "{camera}.jsonl"))], ["a", "b"]
        )


# ------------------------------------------------------------------------------------------ capture
def test_live_capture_keeps_only_the_newest_frame() -> None:
    """A camera faster than its reader: the slot never holds more than one frame (no backlog), every
    replaced frame is counted, and what the loop takes is the newest."""
    cond = threading.Condition()
    src = camera(10**9, period=0.0005)
    cap = Capture("fast", src, cond).start()
    try:
        deadline = time.monotonic() + 10
        while cap.read < 200:
            assert time.monotonic() < deadline and cap.ended is None
            with cond:
                assert len(cap.slot) <= 1
            time.sleep(0.01)
        with cond:
            assert len(cap.slot) == 1 and cap.dropped == cap.read - 1
            newest = cap.read - 1
        frame, _ = cap.take()
        assert frame.index >= newest  # nothing older than what was newest a moment ago
    finally:
        assert cap.join()
    assert cap.ended == "stopped"


def test_file_capture_keeps_every_frame_in_order(tmp_path: Path) -> None:
    cond = threading.Condition()
    with open_source(str(clip(tmp_path / "c.mp4", 15, 20))) as src:
        cap = Capture("c", src, cond).start()
        time.sleep(0.2)  # the loop is busy: the thread reads ahead a little, then waits
        with cond:
            assert len(cap.slot) == FILE_AHEAD and cap.dropped == 0
        got = []
        while not cap.done:
            item = cap.take()
            if item is None:
                with cond:
                    cond.wait(0.05)
                continue
            got.append(item[0].index)
        assert got == list(range(15)) and cap.ended == "end"


def test_captures_take_the_cameras_in_turn() -> None:
    """Round-robin: with frames waiting everywhere, camera i is followed by i + 1."""
    cond = threading.Condition()
    caps = [Capture(n, SimpleNamespace(live=False, name=n), cond) for n in "abc"]
    img = np.zeros((2, 2, 3), np.uint8)
    for c in caps:
        c.slot.extend((Frame(img, i, 0.0, c.name), 0.0) for i in range(FILE_AHEAD))
    caps[1].slot.extend((Frame(img, i, 0.0, "b"), 0.0) for i in range(FILE_AHEAD, 5))
    group = Captures(caps, cond)
    order = []
    while (got := group._ready()) is not None:
        order.append(got[0])
    assert order == [0, 1, 2, 0, 1, 2, 1, 1, 1]


# ------------------------------------------------------------------------------------------ the loop
def test_two_files_processed_fully_in_order_with_per_camera_outputs(tmp_path: Path) -> None:
    a, b = clip(tmp_path / "a.mp4", 12, 20), clip(tmp_path / "b.mp4", 20, 120)
    sinks = [str(tmp_path / "d-{camera}.jsonl"), str(tmp_path / "v-{camera}.mkv"), str(tmp_path / "all.jsonl"),
             str(tmp_path / "ev-{camera}.jsonl?kind=events")]  # fmt: skip
    with open_source(str(a)) as sa, open_source(str(b)) as sb:
        summary, pipe, _ = run_cams({"front": sa, "back": sb}, sinks=sinks)
    assert pipe.calls == 32 and summary.frames == 32 and summary.stopped == "every source ended"
    for name, n in (("front", 12), ("back", 20)):
        rows = read_jsonl(tmp_path / f"d-{name}.jsonl")
        assert [r["frame"] for r in rows[::2]] == list(range(n))  # every frame, in order
        assert {r["camera"] for r in rows} == {name}
        assert frames_of(tmp_path / f"v-{name}.mkv") == n
    shared = read_jsonl(tmp_path / "all.jsonl")
    assert len(shared) == 64 and {r["camera"] for r in shared} == {"front", "back"}
    for name in ("front", "back"):  # each camera's lines in its own order
        frames = [r["frame"] for r in shared if r["camera"] == name][::2]
        assert frames == sorted(frames)
    front, back = summary.cameras
    assert (front.source, front.frames, front.detections, front.dropped, front.stopped) == (
        "front", 12, 24, 0, "end of source")  # fmt: skip
    assert (back.source, back.frames, back.stopped) == ("back", 20, "end of source")
    assert (
        front.events["enter"] >= 2 and front.events["leave"] == front.events["enter"]
    )  # all left at its end
    events = read_jsonl(tmp_path / "ev-front.jsonl")
    assert {e["camera"] for e in events} == {"front"}
    assert [e["event"] for e in events].count("enter") == front.events["enter"]
    assert summary.events["enter"] == front.events["enter"] + back.events["enter"]
    lines = summary.line().splitlines()
    assert lines[0].startswith("2 cameras: 32 frames in ") and "stopped: every source ended" in lines[0]
    assert f"wrote {tmp_path / 'all.jsonl'} (64 lines)" in lines[0]
    assert (
        lines[1].startswith("  front: 12 frames (")
        and "ms latency), 24 detections; stopped: end of source" in lines[1]
    )
    assert (
        f"wrote {tmp_path / 'v-front.mkv'} (12 frames)" in lines[1]
        and f"events: enter {front.events['enter']}" in lines[1]
    )
    assert lines[2].startswith("  back: 20 frames (")


def test_per_camera_trackers_are_independent(tmp_path: Path) -> None:
    """Two cameras whose objects sit in different places (other frame sizes): each camera keeps one track
    per object all along (one tracker fed both cameras' frames in turn would lose them every frame)."""
    small = clip(tmp_path / "small.mp4", 12, 60)
    big = write_video(tmp_path / "big.mp4", [np.full((192, 256, 3), 60 + 4 * i, np.uint8) for i in range(12)])
    with open_source(str(small)) as s1, open_source(str(big)) as s2:
        summary, _, _ = run_cams({"a": s1, "b": s2}, sinks=[str(tmp_path / "{camera}.jsonl")])
    for name in "ab":
        rows = read_jsonl(tmp_path / f"{name}.jsonl")
        assert all(r["track_id"] is not None for r in rows)
        ids: dict[str, set[int]] = {}
        for r in rows:
            ids.setdefault(r["cls"], set()).add(r["track_id"])
        assert sorted(ids) == ["mug", "toy"] and all(len(t) == 1 for t in ids.values()), ids
    assert [c.events for c in summary.cameras] == [{"enter": 2, "leave": 2}] * 2


def test_fast_live_camera_only_newest_frames_are_processed(tmp_path: Path) -> None:
    """A camera at ~1000 FPS and a loop at ~50 FPS: frames are skipped, not queued (latency stays small),
    the drops are counted and reported."""
    src = camera(10**9, period=0.001)
    summary, _, _ = run_cams(src, FakePipe(delay=0.02), max_frames=15, jsonl=tmp_path / "e.jsonl")
    frames = [r["frame"] for r in read_jsonl(tmp_path / "e.jsonl")][::2]
    assert len(frames) == 15 and frames == sorted(set(frames)) and frames[-1] - frames[0] > 30
    assert summary.dropped > 30 and not summary.cameras  # one camera: the single-camera summary
    assert summary.latency_ms < 1000
    assert f"{summary.dropped} dropped (the newest frame kept)" in summary.line()
    assert summary.stopped == "--max-frames 15"


def test_a_camera_that_drops_out_does_not_stop_the_others(tmp_path: Path) -> None:
    """`gate` delivers 3 frames, is unplugged and never comes back (its source gives up after 3 attempts);
    `yard` goes on. The run ends at --max-frames with yard's frames, gate's error in its own summary."""
    console = Quiet()
    warn = lambda m: console.log(f"warning: {m}")  # noqa: E731
    gate = camera([3], period=0.01, name="csi://0", warn=warn, backoff=Backoff(0.05, 0.1, retries=3))
    yard = camera(10**9, period=0.005, name="csi://1", warn=warn)
    summary, _, _ = run_cams({"gate": gate, "yard": yard}, FakePipe(delay=0.005), console=console, max_frames=60,
                             sinks=[str(tmp_path / "{camera}.jsonl")])  # fmt: skip
    g, y = summary.cameras
    assert g.stopped == "error: camera csi://0 lost: no frame after 3 reconnection attempts"
    assert 1 <= g.frames <= 3 and g.reconnects == 3
    assert y.frames == 60 - g.frames and y.stopped == "--max-frames 60" == summary.stopped
    yard_frames = [r["frame"] for r in read_jsonl(tmp_path / "yard.jsonl")][::2]
    assert yard_frames == sorted(set(yard_frames)) and len(yard_frames) == y.frames
    assert any("camera csi://0 lost, reconnecting" in line for line in console.lines)
    assert "  gate: " in summary.line() and "stopped: error: camera csi://0 lost" in summary.line()


def test_every_camera_failing_raises_after_the_outputs(tmp_path: Path) -> None:
    from mocha_edge.deploy.sources import SourceError

    srcs = {n: camera([2], name=f"csi://{i}", warn=lambda m: None, backoff=Backoff(0.01, 0.01, retries=1))
            for i, n in enumerate("ab")}  # fmt: skip
    with pytest.raises(SourceError, match="lost: no frame after 1 reconnection attempts"):
        run_cams(srcs, jsonl=tmp_path / "e.jsonl")
    assert {r["camera"] for r in read_jsonl(tmp_path / "e.jsonl")} <= {"a", "b"}


def test_status_line_per_camera(tmp_path: Path) -> None:
    a, b = clip(tmp_path / "a.mp4", 20, 20), clip(tmp_path / "b.mp4", 20, 120)
    console = Quiet()
    with open_source(str(a)) as sa, open_source(str(b)) as sb:
        run_cams({"front": sa, "back": sb}, FakePipe(delay=0.01), console=console, fps_every=0.1)
    lines = [line for line in console.lines if "FPS" in line]
    assert lines, console.lines
    pattern = (r"front \d+\.\d FPS \d+ ms \| back \d+\.\d FPS \d+ ms \| stages ms: pre 0\.1 infer 1\.0 post 0\.2 "
               r"pool 0\.1 match 0\.3 track [\d.]+ read [\d.]+ out [\d.]+")  # fmt: skip
    assert re.fullmatch(pattern, lines[0]), lines[0]


def test_single_camera_status_line_has_latency(tmp_path: Path) -> None:
    console = Quiet()
    with open_source(str(clip(tmp_path / "a.mp4", 20, 20))) as src:
        run_cams(src, FakePipe(delay=0.01), console=console, fps_every=0.1)
    line = next(line for line in console.lines if "FPS" in line)
    assert re.fullmatch(r"\d+\.\d FPS \| ms: pre .* out [\d.]+ \| latency \d+ ms \| frame \d+", line), line


# ------------------------------------------------------------------------------------------ enrolment
class Brightness(FakePipe):
    """FakePipe whose top score grows with the frame's brightness (the brighter camera wins `enroll`)."""

    def __call__(self, bgr):
        d = super().__call__(bgr)
        d.scores = np.array([0.5 + float(bgr.mean()) / 1000.0, 0.4], np.float32)
        return d


def test_enroll_over_every_camera_or_one(tmp_path: Path) -> None:
    a, b = clip(tmp_path / "dim.mp4", 24, 10), clip(tmp_path / "bright.mp4", 24, 150)
    bank, console = tmp_path / "m.bank", Quiet()
    cmds = Commands({4: ["enroll thing"], 12: ["enroll dim:other"], 20: ["help"]})
    with open_source(str(a)) as sa, open_source(str(b)) as sb:
        summary, _, _ = run_cams({"dim": sa, "bright": sb}, Brightness(), console=console, commands=cmds,
                                 bank_path=bank)  # fmt: skip
    assert summary.enrolled == ["thing", "other"]
    done = [line for line in console.lines if line.startswith("enrolled")]
    assert re.match(r"enrolled 'thing' \(mug\) from bright frame \d+:", done[0]), done
    assert re.match(r"enrolled 'other' \(mug\) from dim frame \d+:", done[1]), done
    assert any("`enroll CAMERA:NAME`" in line for line in console.lines)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_several_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live, "make_pipeline", lambda model, **kw: FakePipe())
    a, b = clip(tmp_path / "a.mp4", 6, 20), clip(tmp_path / "b.mp4", 8, 120)
    base = [
        "run",
        "m.onnx",
        "--no-show",
        "--fps-every",
        "0",
        "--source",
        f"front={a}",
        "--source",
        f"back={b}",
    ]
    r = CliRunner().invoke(cli, [*base, "--save", str(tmp_path / "out.mkv")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "2 cameras cannot share one video" in r.output
    r = CliRunner().invoke(cli, ["run", "m.onnx", "--source", f"x={a}", "--source", f"x={b}"])
    assert r.exit_code == 1 and r.output.strip().endswith("give each camera a unique name (NAME=URI)")
    r = CliRunner().invoke(
        cli, [*base, "--sink", str(tmp_path / "{camera}.mkv"), "--jsonl", str(tmp_path / "e.jsonl")]
    )
    assert r.exit_code == 0, r.output
    assert (
        "2 cameras: 14 frames" in r.output
        and "  front: 6 frames" in r.output
        and "  back: 8 frames" in r.output
    )
    assert frames_of(tmp_path / "front.mkv") == 6 and frames_of(tmp_path / "back.mkv") == 8
    assert len(read_jsonl(tmp_path / "e.jsonl")) == 28


# ------------------------------------------------------------------------------------------ faults
class DarkFails(FakePipe):
    """Raises on dark frames (one camera's), works on bright ones."""

    def __call__(self, bgr):
        if float(bgr.mean()) < 100:
            self.calls += 1
            time.sleep(0.01)
            raise RuntimeError("cannot see in the dark")
        return super().__call__(bgr)


def test_one_camera_always_faulting_never_ends_a_run_where_another_works(tmp_path: Path) -> None:
    """The give-up rule is the process's: a good frame of any camera starts the count again."""
    a, b = clip(tmp_path / "dark.mp4", 20, 10), clip(tmp_path / "bright.mp4", 30, 120)
    with open_source(str(a)) as sa, open_source(str(b)) as sb:
        summary, _, console = run_cams({"dark": sa, "bright": sb}, DarkFails(), fail_after=0.3, fail_frames=3,
                                       jsonl=tmp_path / "e.jsonl")  # fmt: skip
    assert summary.stopped == "every source ended" and summary.frames == 50
    dark, bright = summary.cameras
    assert dark.faults == {"pipeline: RuntimeError": 20} and dark.lost == 20 and not bright.faults
    assert summary.faults == {"dark: pipeline: RuntimeError": 20}
    assert "faults: pipeline: RuntimeError x20 (20 frames lost)" in summary.line().splitlines()[1]
    assert any(line.startswith("warning: frame 0: dark: pipeline: RuntimeError") for line in console.lines)
    with (
        open_source(str(a)) as s1,
        open_source(str(a)) as s2,
        pytest.raises(live.RunFailed, match="giving up"),
    ):
        run_cams({"d1": s1, "d2": s2}, DarkFails(), fail_after=0.3, fail_frames=5)
