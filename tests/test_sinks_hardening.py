"""Outputs left running for months (issue 14): daily JSON-lines files, video segments that survive
``kill -9``, failing writes (full disk) that pause and lose nothing, and no camera password in any record,
warning or summary."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from mocha_edge.deploy.sinks import (
    JsonlSink,
    SinkError,
    VideoSink,
    crash_note,
    local_day,
    open_sink,
    open_sinks,
    parse_sink,
)
from mocha_edge.deploy.sources import open_source, redact_uri

DAY = 86400.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def frame(i: int, name: str = "cam") -> SimpleNamespace:
    return SimpleNamespace(index=i, t=i / 10, source_name=name)


def records(i: int, n: int = 2) -> list[dict]:
    return [{"frame": i, "k": k} for k in range(n)]


def frames_in(path: Path) -> list[int]:
    return [json.loads(x)["frame"] for x in path.read_text().splitlines()]


def count_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.isOpened() and cap.read()[0]:
        n += 1
    cap.release()
    return n


def noon(days_from_now: int = 0) -> float:
    """Local noon of a day near today (never near midnight, whatever the time zone)."""
    t = time.localtime(time.time() + days_from_now * DAY)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 12, 0, 0, 0, 0, -1))


# ------------------------------------------------------------------------------------------ daily files
def test_daily_rotation_names_and_keep(tmp_path: Path) -> None:
    path = tmp_path / "det.jsonl"
    clock = Clock(noon(-5))
    sink = open_sink(f"{path}?rotate=daily&keep=2", clock=clock)
    for day in range(5):  # five days, two frames a day (morning and evening)
        clock.now = noon(-5 + day) - 3 * 3600
        sink.write(frame(10 * day), records(10 * day), None)
        clock.now += 8 * 3600
        sink.write(frame(10 * day + 1), records(10 * day + 1), None)
    report = sink.close()
    assert report.count == 20 and "rotated 4x" in report.line()
    days = [local_day(noon(-5 + d)) for d in range(5)]
    dated = sorted(tmp_path.glob("det.*.jsonl"))  # a glob finds them, in order
    assert [p.name for p in dated] == [f"det.{days[2]}.jsonl", f"det.{days[3]}.jsonl"]  # keep=2
    assert frames_in(dated[0]) == [20, 20, 21, 21] and frames_in(path) == [40, 40, 41, 41]


def test_daily_restart_appends_the_same_day_and_rotates_an_older_file(tmp_path: Path) -> None:
    path = tmp_path / "det.jsonl"
    clock = Clock(noon(-1))
    for i in range(2):  # a restart on the same day appends
        sink = open_sink(f"{path}?rotate=daily", clock=clock)
        sink.write(frame(i), records(i), None)
        sink.close()
    assert frames_in(path) == [0, 0, 1, 1] and list(tmp_path.iterdir()) == [path]
    os.utime(path, (noon(-1), noon(-1)))
    clock.now = noon(0)  # the next day: the file of yesterday (its modification day) moves aside
    sink = open_sink(f"{path}?rotate=daily", clock=clock)
    sink.write(frame(2), records(2), None)
    sink.close()
    assert frames_in(tmp_path / f"det.{local_day(noon(-1))}.jsonl") == [0, 0, 1, 1]
    assert frames_in(path) == [2, 2]
    clock.now = noon(-3)  # a clock going back does not rotate (nor overwrite)
    sink = open_sink(f"{path}?rotate=daily", clock=clock)
    sink.write(frame(3), records(3), None)
    sink.close()
    assert frames_in(path) == [2, 2, 3, 3] and len(list(tmp_path.iterdir())) == 2


# ------------------------------------------------------------------------------------------ failing writes
class FlakyFile:
    """Wraps a sink's file: while ``fail`` is set, writes raise OSError(ENOSPC) (``partial``: the first one
    writes that many bytes first, as a filling disk does)."""

    def __init__(self, fh, owner: FlakyDisk) -> None:
        self.fh, self.owner = fh, owner

    def write(self, data) -> int:
        if self.owner.fail:
            if self.owner.partial:
                k, self.owner.partial = self.fh.write(bytes(data[: self.owner.partial])), 0
                return k
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.fh.write(data)

    def fileno(self) -> int:
        return self.fh.fileno()

    def close(self) -> None:
        self.fh.close()


class FlakyDisk:
    def __init__(self, sink: JsonlSink) -> None:
        self.fail, self.partial, self.sink = False, 0, sink
        real_open = sink._open

        def flaky_open() -> None:
            if self.fail:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_open()
            sink.fh = FlakyFile(sink.fh, self)

        sink._open = flaky_open  # type: ignore[method-assign]
        sink.fh = FlakyFile(sink.fh, self)


def test_a_full_disk_pauses_holds_the_lines_and_resumes_in_order(tmp_path: Path) -> None:
    path, clock, messages = tmp_path / "e.jsonl", Clock(1000.0), []
    sink = JsonlSink(path, log=messages.append, clock=clock)
    disk = FlakyDisk(sink)
    sink.write(frame(0), records(0), None)
    disk.fail, disk.partial = True, 7  # the disk fills in the middle of frame 1's first line
    for i in range(1, 6):
        sink.write(frame(i), records(i), None)  # never raises
        clock.now += 1.0
    assert messages == [
        f"{path}: cannot write (No space left on device); paused: holding the lines in memory "
        "(up to 4 MiB, 2 now), retrying every 5 s"
    ]  # one message, naming the file and the error
    assert path.read_bytes().count(b"\n") == 2 and len(path.read_bytes().split(b"\n")[-1]) == 7  # cut short
    disk.fail = False  # space is back; nothing is written before the retry is due
    sink.write(frame(6), records(6), None)
    assert messages[-1] == f"{path}: writing again after 5 s (12 held lines written)"
    sink.write(frame(7), [], None)
    report = sink.close()
    assert frames_in(path) == [i for i in range(7) for _ in range(2)]  # every line, in order, none twice
    assert (report.count, report.buffered, report.dropped, report.pauses) == (14, 0, 0, 1)
    assert report.line() == f"wrote {path} (14 lines, paused 1x)"


def test_the_memory_buffer_is_bounded_and_the_loss_counted(tmp_path: Path) -> None:
    path, clock, messages = tmp_path / "e.jsonl", Clock(0.0), []
    sink = JsonlSink(path, log=messages.append, clock=clock, buffer_limit=200)
    disk = FlakyDisk(sink)
    disk.fail = True
    for i in range(10):  # ~20 bytes a line, 2 lines a frame: 5 frames fit in 200 bytes
        sink.write(frame(i), records(i), None)
    assert sum("memory buffer full" in m for m in messages) == 1
    disk.fail = False
    clock.now = 10.0
    sink.write(frame(10), [], None)  # the retry comes with the next frame, detections or not
    report = sink.close()
    assert frames_in(path) == [i for i in range(5, 10) for _ in range(2)]  # the oldest went
    assert report.dropped == 10 and report.count == 10 and report.count + report.dropped == 20
    assert "10 lines dropped" in report.line() and "10 dropped" in messages[-1]


def test_lines_still_held_at_the_end_are_reported(tmp_path: Path) -> None:
    path, messages = tmp_path / "e.jsonl", []
    sink = JsonlSink(path, log=messages.append, clock=Clock(0.0))
    disk = FlakyDisk(sink)
    disk.fail = True
    sink.write(frame(0), records(0, 3), None)
    report = sink.close()
    assert (report.count, report.buffered) == (0, 3) and "3 lines NOT written" in report.line()
    assert messages[-1] == f"{path}: cannot write (No space left on device) at the end; 3 held lines are lost"


def test_a_failing_rotation_retries_and_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    path, clock = tmp_path / "e.jsonl", Clock(0.0)
    sink = JsonlSink(path, rotate=80, keep=5, log=lambda m: None, clock=clock)  # 2 frames a file
    real = os.replace
    broken = [True]

    def replace(a, b):
        if broken[0]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    for i in range(4):
        sink.write(frame(i), records(i), None)
    broken[0] = False
    clock.now = 6.0
    sink.write(frame(4), records(4), None)
    report = sink.close()
    assert report.count == 10 and report.pauses == 1
    files = [Path(f"{path}.2"), Path(f"{path}.1"), path]
    assert [frames_in(p) for p in files] == [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4]]


def test_the_soak_invariant_with_a_sink_that_fails_now_and_then(tmp_path: Path) -> None:
    """Detections emitted = lines written, when failures are transient (shorter than the buffer)."""
    path, clock = tmp_path / "e.jsonl", Clock(0.0)
    sink = JsonlSink(path, log=lambda m: None, clock=clock)
    disk = FlakyDisk(sink)
    rng = np.random.default_rng(1)
    emitted = 0
    for i in range(400):
        disk.fail = bool(rng.random() < 0.2)
        disk.partial = int(rng.integers(0, 30)) if disk.fail else 0
        n = int(rng.integers(0, 4))
        sink.write(frame(i), records(i, n), None)
        emitted += n
        clock.now += 1.0
    disk.fail = False
    report = sink.close()
    assert report.pauses > 5 and report.count == emitted == len(frames_in(path))


def test_a_video_pauses_while_its_disk_is_full(tmp_path: Path) -> None:
    free, clock, messages = [10**9], Clock(0.0), []
    sink = VideoSink(tmp_path / "v.avi", 10, log=messages.append, clock=clock, free_space=lambda p: free[0])
    img = np.zeros((24, 32, 3), np.uint8)
    for i in range(30):
        free[0] = 10 * 2**20 if 10 <= i < 20 else 10**9  # 10 MiB free: below the 64 MiB floor
        sink.write(frame(i), [], img)
        clock.now += 1.0
    report = sink.close()
    assert messages[0] == (
        f"{tmp_path / 'v.avi'}: only 10 MiB free on its disk (< 64 MiB); paused: frames are dropped, "
        "retrying every 5 s"
    )
    assert messages[1] == f"{tmp_path / 'v.avi'}: writing again after 10 s (recording, 10 dropped)"
    assert (report.count, report.dropped, report.pauses) == (20, 10, 1)
    assert count_frames(tmp_path / "v.avi") == 20 and "10 frames dropped" in report.line()


def test_a_segment_that_cannot_start_pauses_the_video(tmp_path: Path, monkeypatch) -> None:
    clock, messages = Clock(noon()), []
    sink = VideoSink(tmp_path / "v.mkv", 10, segment=5.0, log=messages.append, clock=clock)
    img = np.zeros((24, 32, 3), np.uint8)
    real = sink._start
    fail = [False]

    def start(now: float) -> None:
        if fail[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(now)

    monkeypatch.setattr(sink, "_start", start)
    for i in range(20):
        fail[0] = 5 <= i < 12
        sink.write(frame(i), [], img)
        clock.now += 1.0
    report = sink.close()
    assert "cannot write (No space left on device); paused" in messages[0] and len(messages) == 2
    assert report.dropped == 10 and report.count == 10  # 5..14: paused until the retry at 15
    assert sum(count_frames(p) for p in sink.segments) == 10


# ------------------------------------------------------------------------------------------ segments
def test_segments_are_named_by_start_time_and_bounded_by_keep(tmp_path: Path) -> None:
    clock = Clock(noon())
    old = tmp_path / f"v-{time.strftime('%Y%m%d-%H%M%S', time.localtime(noon(-9)))}.mkv"
    old.write_bytes(b"an earlier run's segment")
    sink = open_sink(f"{tmp_path}/v.mkv?segment=10s&keep=3", fps=5, clock=clock)
    assert isinstance(sink, VideoSink)
    for i in range(50):  # 50 frames at 5 fps over 50 s of clock: 5 segments of 10 frames
        sink.write(frame(i), [], np.full((24, 32, 3), 4 * i, np.uint8))
        clock.now += 1.0
    report = sink.close()
    names = [time.strftime("%Y%m%d-%H%M%S", time.localtime(noon() + 10 * k)) for k in range(5)]
    assert [p.name for p in sink.segments] == [f"v-{n}.mkv" for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"v-{n}.mkv" for n in names[2:]]  # keep=3
    assert [count_frames(tmp_path / f"v-{n}.mkv") for n in names[2:]] == [10, 10, 10]
    assert report.count == 50 and report.path == tmp_path / f"v-{names[0]}.mkv"
    assert f"5 segments, last v-{names[4]}.mkv" in report.line()
    # a restart within the same second does not overwrite: its name moves on a second
    clock.now = noon() + 40
    sink = open_sink(f"{tmp_path}/v.mkv?segment=10s", fps=5, clock=clock)
    sink.write(frame(0), [], np.zeros((24, 32, 3), np.uint8))
    sink.close()
    assert sink.segments[0].name == f"v-{time.strftime('%Y%m%d-%H%M%S', time.localtime(noon() + 41))}.mkv"


def test_kill_safe_containers_are_written_in_place(tmp_path: Path) -> None:
    sink = open_sink(str(tmp_path / "v.mkv"))
    sink.write(frame(0), [], np.zeros((24, 32, 3), np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == ["v.mkv"]  # visible while recording, no .partial
    sink.close()
    sink = open_sink(str(tmp_path / "w.mp4"))  # an .mp4 plays only once finished: a temporary name
    sink.write(frame(0), [], np.zeros((24, 32, 3), np.uint8))
    assert any(p.name.startswith(".w.") and ".partial" in p.name for p in tmp_path.iterdir())
    assert sink.close().line() == f"wrote {tmp_path / 'w.mp4'} (1 frames)"
    with pytest.raises(SinkError, match=r"segment= needs one of \.mkv, \.avi"):
        VideoSink(tmp_path / "x.mp4", 10, segment=60)
    note = crash_note(parse_sink("out.mp4", alias="--save"), live=True)
    assert note is not None and "use out.mkv, or 'out.mkv?segment=10m&keep=144'" in note
    assert crash_note(parse_sink("out.mkv"), live=True) is None
    assert crash_note(parse_sink("out.mp4"), live=False) is None  # a clip: the file is whole or absent


CHILD = """
import sys, time
import numpy as np
from mocha_edge.deploy.sinks import open_sink
uri, n = sys.argv[1], int(sys.argv[2])
sink = open_sink(uri, fps=10)
rng = np.random.default_rng(0)
for i in range(n):
    sink.write(None, [], rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    print(i + 1, flush=True)
time.sleep(60)  # killed here, the open segment never finished
"""


def kill_mid_write(uri: str, n: int) -> None:
    """Run a sink writing ``n`` frames in a child process, then ``kill -9`` it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.Popen([sys.executable, "-c", CHILD, uri, str(n)], stdout=subprocess.PIPE, text=True,
                         stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    try:
        assert p.stdout is not None
        for line in p.stdout:
            if int(line) >= n:
                break
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL


@pytest.mark.parametrize("suffix", [".mkv", ".avi"])
def test_the_open_segment_plays_after_kill_9(tmp_path: Path, suffix: str) -> None:
    """The measurement behind :data:`KILL_SAFE`: a recording killed with SIGKILL mid-segment (no release,
    no trailer) reads back up to what the writer had flushed; only its last few hundred KiB are lost.
    (Measured with this OpenCV: mkv/mp4v 26 of 40 such frames, avi/MJPG 37 of 40, mp4/mov/m4v 0.)"""
    kill_mid_write(f"{tmp_path}/rec{suffix}?segment=10m", 40)
    (seg,) = tmp_path.iterdir()  # the open segment, under its own visible name
    assert seg.name.startswith("rec-") and seg.suffix == suffix
    assert count_frames(seg) >= 20  # most of the 40 frames written before the kill


# ------------------------------------------------------------------------------------------ credentials
SECRET_URI = "rtsp://admin:s3cret@cam1.local:554/live?token=t0ken&channel=1"


def test_redact_uri() -> None:
    assert redact_uri(SECRET_URI) == "rtsp://admin:***@cam1.local:554/live?token=***&channel=1"
    assert redact_uri("rtsp://admin:p@ss/w?rd@cam/x") == "rtsp://admin:***@cam/x"  # unescaped specials
    assert redact_uri("http://h/x?api_key=1&monkey=2&PWD=3#f") == "http://h/x?api_key=***&monkey=2&PWD=***#f"
    for plain in ("rtsp://cam/live", "rtsp://admin@cam/live", "/data/a:b@c.mp4", "csi://0?fps=30", "0"):
        assert redact_uri(plain) == plain


def test_no_password_in_names_records_warnings_or_summary(tmp_path: Path) -> None:
    from test_run import Quiet, in_step_camera, loop

    from mocha_edge.deploy.sources import Backoff

    seen: list[str] = []
    factory, pipe, stopper = in_step_camera([2, 0, 2])

    def capture(uri):
        seen.append(uri.location)  # the capture connects with the real address
        return factory(uri)

    console = Quiet()
    src = open_source(SECRET_URI, warn=lambda m: console.log(f"warning: {m}"), capture_factory=capture,
                      sleep=stopper.sleep, backoff=Backoff(initial=0.001, maximum=0.002))  # fmt: skip
    assert src.name == "rtsp://admin:***@cam1.local:554/live?token=***&channel=1"
    summary, _, _ = loop(src, pipe, console=console, jsonl=tmp_path / "e.jsonl", max_frames=4,
                         sinks=[f"{tmp_path}/{{camera}}.jsonl"])  # fmt: skip
    # (a 3rd reconnect may start before the loop ends: the script has no frames left after the 4th)
    assert seen[0] == SECRET_URI and summary.frames == 4 and summary.reconnects >= 2
    text = "\n".join([*console.lines, summary.line(), (tmp_path / "e.jsonl").read_text(),
                      *(p.name for p in tmp_path.iterdir())])  # fmt: skip
    assert "warning: camera rtsp://admin:***@cam1.local:554/live?token=***&channel=1 lost" in text
    assert "s3cret" not in text and "t0ken" not in text
    assert json.loads((tmp_path / "e.jsonl").read_text().splitlines()[0])["source"] == src.name
    assert (tmp_path / "cam1.local_554_live.jsonl").exists()


def test_a_stream_that_will_not_open_names_no_password() -> None:
    from test_run import camera_factory

    from mocha_edge.deploy.sources import SourceError

    with pytest.raises(SourceError) as e:
        open_source(SECRET_URI, capture_factory=camera_factory([0]))
    assert "s3cret" not in str(e.value) and "admin:***@cam1.local" in str(e.value)

    def boom(uri):
        raise RuntimeError(f"cv2.error: could not open {uri.location}")

    with pytest.raises(SourceError) as e:
        open_source(SECRET_URI, capture_factory=boom)
    assert "s3cret" not in str(e.value) and "t0ken" not in str(e.value)


def test_sink_messages_name_no_password(tmp_path: Path) -> None:
    with pytest.raises(SinkError) as e:
        open_sinks([parse_sink("mqtt://ids:s3cret@broker/t?qos=9")])
    assert "s3cret" not in str(e.value) and "mqtt://ids:***@broker/t" in str(e.value)
    u = parse_sink(f"{tmp_path}/{{camera}}.jsonl")
    sink = open_sinks([u], camera=SECRET_URI)[0]
    assert sink.path.name == "cam1.local_554_live.jsonl"
    sink.close()


def test_non_finite_outputs_never_make_a_line_that_is_not_json(tmp_path: Path) -> None:
    """NaN/inf in a box or score is written as null (strict JSON), not as NaN (which no JSON parser takes)."""
    from mocha_edge.deploy.sinks import detection_records

    dets = SimpleNamespace(
        boxes=np.array([[1.0, np.nan, 3.0, np.inf], [0.0, 0.0, 2.0, 2.0]], np.float32),
        scores=np.array([np.nan, 0.5], np.float32),
        cls=np.array([0, 0]),
        identity=np.array([-1, -1]),
        similarity=np.array([np.nan, np.nan], np.float32),
    )
    recs = detection_records(frame(0), dets, ["mug"], [])
    sink = open_sink(parse_sink(str(tmp_path / "d.jsonl")), camera="cam", fps=10.0)
    sink.write(frame(0), recs, None)
    sink.close()
    lines = (tmp_path / "d.jsonl").read_text().splitlines()
    parsed = [json.loads(ln, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for ln in lines]
    assert parsed[0]["box_xyxy"] == [1.0, None, 3.0, None] and parsed[0]["score"] is None
    assert parsed[1]["score"] == 0.5
