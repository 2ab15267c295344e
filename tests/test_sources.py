"""File sources by URI: ``?loop=1``, ``?realtime=1`` pacing (fake clock), end of stream vs read error.

Cameras, reconnection and the older URI forms are covered by tests/test_run.py.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from mocha_edge.deploy import live
from mocha_edge.deploy.sources import (
    MAX_BAD_FRAMES,
    Pacer,
    SourceError,
    open_source,
    parse_uri,
)

N = 10  # frames of the test video


def write_avi(path: Path, n: int = N, fps: float = 10.0, noise: bool = False) -> Path:
    """An MJPG video whose frame i is a flat grey of value 20 * i (readable back to within a few levels);
    ``noise``: larger random frames instead (the frame data, not the header, is most of the file)."""
    size = (128, 96) if noise else (32, 24)
    rng = np.random.default_rng(0)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert vw.isOpened()
    for i in range(n):
        shape = (size[1], size[0], 3)
        vw.write(rng.integers(0, 256, shape, dtype=np.uint8) if noise else np.full(shape, 20 * i, np.uint8))
    vw.release()
    return path


def cut_avi(tmp_path: Path) -> Path:
    """A 30-frame video cut at 70% of its bytes (the container still says 30 frames)."""
    data = write_avi(tmp_path / "whole.avi", n=30, noise=True).read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    return cut


def grey(frame) -> int:
    return round(float(frame.image_bgr.mean()) / 20)


@pytest.fixture
def avi(tmp_path: Path) -> Path:
    return write_avi(tmp_path / "clip.avi")


class FakeClock:
    """``clock()`` and ``sleep(s)`` sharing one simulated time; ``sleeps`` records each sleep."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now, self.sleeps = now, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class FakeVideo:
    """A video file as OpenCV sees it: ``pattern`` of reads ('1' a frame, '0' a failed read, 'x' a read
    that raises), then failures; ``count`` is what the container claims (None: no ``get``)."""

    def __init__(self, pattern: str, count: int | None) -> None:
        self.pattern, self.count, self.i, self.open = pattern, count, 0, True

    def isOpened(self) -> bool:  # OpenCV's name
        return self.open

    def read(self):
        c = self.pattern[self.i] if self.i < len(self.pattern) else "0"
        self.i += 1
        if c == "x":
            raise RuntimeError("cv2.error: decoder exploded")
        return (True, np.full((4, 4, 3), self.i, np.uint8)) if c == "1" else (False, None)

    def get(self, prop: int) -> float:
        return {cv2.CAP_PROP_FRAME_COUNT: float(self.count or 0), cv2.CAP_PROP_FPS: 10.0}.get(prop, 0.0)

    def release(self) -> None:
        self.open = False


def fake_video(pattern: str, count: int | None, tmp_path: Path, query: str = ""):
    """``open_source`` on a real (empty) file whose captures are FakeVideo, plus the warnings."""
    path = tmp_path / "fake.mp4"
    path.write_bytes(b"")
    warnings: list[str] = []
    src = open_source(f"{path}{query}", warn=warnings.append,
                      capture_factory=lambda uri: FakeVideo(pattern, count))  # fmt: skip
    return src, warnings


# ------------------------------------------------------------------------------------------ URIs
def test_file_options_parse(avi: Path, tmp_path: Path) -> None:
    u = parse_uri(f"{avi}?loop=1&realtime=1")
    assert (u.kind, u.location, u.options, u.loop, u.realtime) == (
        "video", str(avi), {"loop": 1, "realtime": 1}, True, True,
    )  # fmt: skip
    assert parse_uri(str(avi)).options == {} and not parse_uri(str(avi)).loop
    assert parse_uri(f"file://{avi}?fps=2.5").options == {"fps": 2.5}
    assert parse_uri(f"{tmp_path}?realtime=1&fps=4").kind == "folder"
    cv2.imwrite(str(tmp_path / "one.png"), np.zeros((8, 8, 3), np.uint8))
    assert parse_uri(f"{tmp_path / 'one.png'}?loop=0").options == {"loop": 0}
    assert parse_uri("/dev/video0?width=640").options == {"width": 640}


def test_a_real_question_mark_in_a_file_name_wins(tmp_path: Path) -> None:
    odd = write_avi(tmp_path / "what?loop=1.avi", n=2)
    u = parse_uri(str(odd))  # the file exists under that very name: no options
    assert (u.location, u.options) == (str(odd), {})
    u = parse_uri(f"{odd}?realtime=1")  # its name, then a query
    assert (u.location, u.options) == (str(odd), {"realtime": 1})


def test_relative_file_uri(avi: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(avi.parent)
    u = parse_uri("file://clip.avi?loop=1")
    assert (u.kind, u.location, u.options) == ("video", "clip.avi", {"loop": 1})


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?zoom=2", r"clip.avi\?zoom=2: unknown option 'zoom' \(valid for video: loop, realtime, fps\)$"),
        ("?loop=yes", r"clip.avi\?loop=yes: option loop='yes' must be 0 or 1$"),
        ("?loop", r"option loop='' must be 0 or 1$"),
        ("?fps=0", r"option fps=0 out of range"),
        ("?fps=fast", r"option fps='fast' must be a number$"),
        ("?width=640", r"unknown option 'width' \(valid for video"),
    ],
)
def test_bad_file_options_are_one_line_errors(avi: Path, query: str, message: str) -> None:
    with pytest.raises(SourceError, match=message) as e:
        parse_uri(f"{avi}{query}")
    assert "\n" not in str(e.value)


def test_camera_options_stay_camera_options(tmp_path: Path) -> None:
    with pytest.raises(
        SourceError, match=r"unknown option 'loop' \(valid for csi: width, height, fps, flip\)"
    ):
        parse_uri("csi://0?loop=1")
    with pytest.raises(SourceError, match=f"{tmp_path / 'nope.mp4'}: no such file or folder"):
        parse_uri(f"{tmp_path / 'nope.mp4'}?loop=1")


# ------------------------------------------------------------------------------------------ loop
def test_video_loop_goes_round_with_increasing_indices(avi: Path) -> None:
    with open_source(f"{avi}?loop=1") as src:
        frames = [f for _, f in zip(range(25), src)]
        assert src.ended is None  # still going
    assert [f.index for f in frames] == list(range(25))
    assert [grey(f) for f in frames] == [i % N for i in range(25)]
    assert frames[13].t == pytest.approx(1.3)  # time goes on across passes
    with open_source(str(avi)) as src:
        assert len(list(src)) == N and src.ended == "end"


def test_folder_and_image_loop(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        cv2.imwrite(str(d / f"{i}.png"), np.full((8, 8, 3), 20 * i, np.uint8))
    (d / "3.png").write_bytes(b"broken")
    warnings: list[str] = []
    with open_source(f"{d}?loop=1", warn=warnings.append) as src:
        frames = [f for _, f in zip(range(8), src)]
    assert [f.index for f in frames] == list(range(8)) and [grey(f) for f in frames] == [0, 1, 2] * 2 + [0, 1]
    assert len(warnings) == 1 and src.skipped == 1  # the broken file is reported once, not every round
    with open_source(f"{d / '1.png'}?loop=1") as src:
        assert [grey(f) for _, f in zip(range(4), src)] == [1, 1, 1, 1]
    empty = tmp_path / "bad"
    empty.mkdir()
    (empty / "a.png").write_bytes(b"broken")
    with open_source(f"{empty}?loop=1", warn=lambda m: None) as src:  # nothing readable: no endless loop
        assert list(src) == [] and src.ended == "end"


def test_bench_takes_its_frames_from_a_looping_source(avi: Path) -> None:
    from mocha_edge.bench import load_frames

    frames, times = load_frames(f"{avi}?loop=1", 25, log=lambda m: None)
    assert len(frames) == len(times) == 25


# ------------------------------------------------------------------------------------------ realtime
def test_realtime_video_is_paced_at_its_rate(avi: Path) -> None:
    clock = FakeClock()
    delivered: list[float] = []
    with open_source(f"{avi}?realtime=1&loop=1", clock=clock, sleep=clock.sleep) as src:
        for _, f in zip(range(15), src):
            delivered.append(clock.now - 1000.0)
            assert f.index == len(delivered) - 1
    assert delivered == pytest.approx([i / 10 for i in range(15)])  # frame i at t0 + i/fps, never before
    assert len(clock.sleeps) == 14 and all(s == pytest.approx(0.1) for s in clock.sleeps)


def test_realtime_never_waits_for_a_late_consumer(avi: Path) -> None:
    """A consumer slower than the rate: frames come at once (no extra wait), and once it catches up the
    schedule t0 + i/fps holds again."""
    clock = FakeClock()
    delivered: list[float] = []
    with open_source(f"{avi}?realtime=1", clock=clock, sleep=clock.sleep) as src:
        for f in src:
            delivered.append(clock.now - 1000.0)
            clock.now += 0.25 if f.index < 3 else 0.0  # three slow frames
    assert delivered[:4] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert delivered[4:] == pytest.approx([0.75, 0.75, 0.75, 0.75, 0.8, 0.9])  # caught up at frame 8


def test_realtime_images_default_and_fps_option(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), 20 * i, np.uint8))
    clock = FakeClock()
    with open_source(f"{tmp_path}?realtime=1", clock=clock, sleep=clock.sleep) as src:
        assert src.fps == 10.0
        frames = list(src)
    assert clock.now - 1000.0 == pytest.approx(0.2) and [f.t for f in frames] == pytest.approx([0, 0.1, 0.2])
    clock = FakeClock()
    with open_source(f"{tmp_path}?realtime=1&fps=4&loop=1", clock=clock, sleep=clock.sleep) as src:
        frames = [f for _, f in zip(range(5), src)]
    assert clock.now - 1000.0 == pytest.approx(1.0) and frames[4].t == pytest.approx(1.0)
    with open_source(str(tmp_path)) as src:  # without a rate: no pacing, t = 0 as before
        assert src.fps is None and {f.t for f in src} == {0.0}


def test_pacer_survives_a_clock_going_back() -> None:
    clock = FakeClock()
    pacer = Pacer(10.0, clock, clock.sleep)
    pacer.wait(0)
    clock.now -= 3600  # NTP stepped the clock back an hour
    pacer.wait(1)
    assert clock.sleeps == []  # no hour-long stall: the schedule restarts from now
    pacer.wait(2)
    assert clock.sleeps == [pytest.approx(0.1)]


# ------------------------------------------------------------------------------------------ end vs error
def test_end_of_file_is_an_end(tmp_path: Path) -> None:
    src, warnings = fake_video("1111", 4, tmp_path)
    assert len(list(src)) == 4 and src.ended == "end" and warnings == []
    src, _ = fake_video("111", 4, tmp_path)  # one frame short: an estimated count's rounding
    assert len(list(src)) == 3 and src.ended == "end"
    src, _ = fake_video("111", None, tmp_path)  # no count known: the end
    assert len(list(src)) == 3 and src.ended == "end"


def test_a_file_cut_short_is_a_read_error(tmp_path: Path) -> None:
    src, warnings = fake_video("111", 10, tmp_path)
    assert len(list(src)) == 3
    assert src.ended == "error: read failed at frame 3 of 10 (cut short or damaged)"
    assert warnings == [f"{src.name}: read failed at frame 3 of 10 (cut short or damaged); stopping"]
    src, _ = fake_video("11x", None, tmp_path)  # a read that raises is an error even without a count
    assert len(list(src)) == 2 and src.ended.startswith("error: read failed at frame 2 (")
    assert "decoder exploded" in src.ended
    src, _ = fake_video("1" + "0" * (MAX_BAD_FRAMES + 5) + "1", 10_000, tmp_path)
    assert (
        len(list(src)) == 1 and src.ended == "error: read failed at frame 1 of 10000 (cut short or damaged)"
    )


def test_unreadable_frames_mid_file_are_skipped_with_a_warning(tmp_path: Path) -> None:
    src, warnings = fake_video("1100111x11", 10, tmp_path)
    frames = list(src)
    assert [f.index for f in frames] == list(range(7)) and src.ended == "end" and src.skipped == 3
    assert [f.t for f in frames] == pytest.approx([0.0, 0.1, 0.4, 0.5, 0.6, 0.8, 0.9])  # the file's time
    assert warnings == [
        f"{src.name}: frames 2-3 unreadable (skipped)",
        f"{src.name}: frame 7 unreadable (skipped)",
    ]


def test_a_read_error_stops_a_looping_file(tmp_path: Path) -> None:
    src, _ = fake_video("11", 5, tmp_path, "?loop=1")
    assert len(list(src)) == 2 and src.ended.startswith("error: read failed at frame 2 of 5")
    opened: list[int] = []

    def vanishing(uri):  # the file goes away between two rounds
        opened.append(1)
        if len(opened) > 1:
            raise RuntimeError("no such file")
        return FakeVideo("11", 2)

    uri = f"{tmp_path / 'fake.mp4'}?loop=1"
    warnings: list[str] = []
    src = open_source(uri, warn=warnings.append, capture_factory=vanishing)
    assert len(list(src)) == 2 and src.ended == f"error: cannot open {uri}: no such file"
    assert warnings == [f"{uri}: cannot open {uri}: no such file; stopping"]


def test_a_truncated_video_on_disk(tmp_path: Path) -> None:
    warnings: list[str] = []
    with open_source(str(cut_avi(tmp_path)), warn=warnings.append) as src:
        n = len(list(src))
    assert 0 < n < 30 and src.ended == f"error: read failed at frame {n} of 30 (cut short or damaged)"
    assert len(warnings) == 1


def test_run_summary_says_how_the_source_stopped(
    avi: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_run import FakePipe

    monkeypatch.setattr(live, "make_pipeline", lambda model, **kw: FakePipe())
    cut = cut_avi(tmp_path)
    args = ["m.onnx", "--no-show", "--fps-every", "0", "--source"]
    r = CliRunner().invoke(live.run_cmd, [*args, str(cut)])
    assert r.exit_code == 0, r.output
    assert "stopped: error: read failed at frame" in r.output and "of 30 (cut short or damaged)" in r.output
    r = CliRunner().invoke(live.run_cmd, [*args, str(avi)])
    assert r.exit_code == 0 and f"{N} frames" in r.output and "stopped: end of source" in r.output
    r = CliRunner().invoke(live.run_cmd, [*args, f"{avi}?loop=1", "--max-frames", "25"])
    assert r.exit_code == 0 and "25 frames" in r.output and "stopped: --max-frames 25" in r.output
