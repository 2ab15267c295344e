"""Outputs by URI (``open_sink``, ``run --sink``): parsing and its errors, appending, rotation, ``{camera}``,
the ``--save`` / ``--jsonl`` aliases, and a run writing to several sinks at once."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from mocha_edge.cli import cli
from mocha_edge.deploy import live
from mocha_edge.deploy.sinks import (
    JsonlSink,
    SinkError,
    VideoSink,
    camera_slug,
    open_sink,
    open_sinks,
    parse_sink,
    parse_size,
)


def frame(i: int) -> SimpleNamespace:
    return SimpleNamespace(index=i, t=i / 10, source_name="cam")


def records(i: int, n: int = 3) -> list[dict]:
    return [{"frame": i, "k": k, "pad": "x" * 40} for k in range(n)]


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ parsing
def test_parse_jsonl_and_video_uris() -> None:
    u = parse_sink("out/e.jsonl")
    assert (u.kind, u.path, u.options) == ("jsonl", "out/e.jsonl", {})
    u = parse_sink("e.jsonl?kind=detections&rotate=100MB&keep=3")
    assert (u.path, u.options) == ("e.jsonl", {"kind": "detections", "rotate": 100 * 2**20, "keep": 3})
    assert parse_sink("file:///data/e.jsonl").path == "/data/e.jsonl"
    for name in ("out.mp4", "out.avi", "out.MKV", "out.mov"):
        assert parse_sink(name).kind == "video"
    u = parse_sink("out.mkv?segment=10m&keep=144")
    assert u.options == {"segment": 600.0, "keep": 144}
    assert parse_sink("e.jsonl?rotate=Daily&keep=30").options == {"rotate": "daily", "keep": 30}
    assert parse_sink("odd?name.jsonl").path == "odd?name.jsonl"  # no known output before "?": its name


def test_sizes() -> None:
    assert [parse_size(s, "x") for s in ("2048", "1KB", "1k", "1.5M", "100MB", "1G", "2KiB")] == [
        2048, 1024, 1024, 3 * 2**19, 100 * 2**20, 2**30, 2048,
    ]  # fmt: skip
    for bad in ("", "0", "ten", "5T", "-1M"):
        with pytest.raises(SinkError, match=f"x: rotate={bad!r} is not a size"):
            parse_size(bad, "x")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("e.txt", r"^e.txt: unknown output type '.txt' \(valid: .jsonl, .mp4, .m4v, .mov, .mkv, .avi\)$"),
        ("events", r"^events: unknown output type '\(no suffix\)'"),
        (
            "ftp://h/e.jsonl",
            r"^ftp://h/e.jsonl: unknown output scheme 'ftp' \(valid: a path, file://, mqtt://, mqtts://, http://, "
            r"https://\)$",
        ),
        ("mqtt://", r"^mqtt://: no host"),
        (
            "e.jsonl?color=red",
            r"^e.jsonl\?color=red: unknown option 'color' \(valid for jsonl: kind, rotate, keep\)$",
        ),
        ("o.mp4?rotate=1M", r"unknown option 'rotate' \(valid for video: segment, keep\)$"),
        ("e.jsonl?kind=tracks", r"kind='tracks' must be one of detections, events$"),
        ("e.jsonl?rotate", r"rotate='' is not a size"),
        ("e.jsonl?rotate=1M&keep=-1", r"keep='-1' must be a whole number"),
        ("e.jsonl?keep=3", r"^e.jsonl\?keep=3: keep= needs rotate=SIZE or rotate=daily$"),
        ("e.jsonl?rotate=weekly", r"rotate='weekly' is not a size \(e.g. 100MB, 512K, 1G\) or daily$"),
        ("o.mkv?segment=soon", r"segment='soon' is not a duration"),
        ("o.mkv?keep=3", r"^o.mkv\?keep=3: keep= needs segment=DURATION$"),
        ("o.mp4?segment=10m", r"segment= needs a container that plays when cut short \(.mkv, .avi\)"),
        (
            "mqtt://cam:s3cret@broker/t?qos=3",
            r"^mqtt://cam:\*\*\*@broker/t\?qos=3: qos='3' must be 0, 1 or 2$",
        ),
        ("https://h/hook?token=abc#x=1", r"^https://h/hook\?token=\*\*\*#x=1: unknown option 'x'"),
    ],
)
def test_bad_sink_uris_are_one_line_errors(uri: str, message: str) -> None:
    with pytest.raises(SinkError, match=message) as e:
        parse_sink(uri)
    assert "\n" not in str(e.value)


def test_events_sink_writes_one_line_per_event(tmp_path: Path) -> None:
    """``?kind=events``: the tracks' events (Event.record()), not the detections."""
    from mocha_edge.deploy.tracking import Event

    u = parse_sink(f"{tmp_path}/e.jsonl?kind=events")
    assert u.options == {"kind": "events"}
    sink = open_sink(u)
    assert sink.needs_events and not sink.needs_records
    ev = Event("identified", "cam", 3, 1.5, 15, "mug", "my mug", 0.91234567, [1, 2, 3, 4], 0.8)
    sink.write_events(frame(15), [ev, Event("leave", "cam", 2, 1.5, 15, "toy", None, None, [0, 0, 1, 1], 0.5,
                                           first_seen=0.5, last_seen=1.5)])  # fmt: skip
    sink.write_events(frame(16), [])
    rep = sink.close()
    rows = lines_of(tmp_path / "e.jsonl")
    assert rep.count == 2 and [r["event"] for r in rows] == ["identified", "leave"]
    assert rows[0] == {"event": "identified", "camera": "cam", "track_id": 3, "t": 1.5, "frame": 15, "cls": "mug",
                       "identity": "my mug", "similarity": 0.91235, "box_xyxy": [1.0, 2.0, 3.0, 4.0],
                       "score": 0.8}  # fmt: skip
    assert rows[1]["duration"] == 1.0 and rows[1]["identity"] is None


def test_aliases_take_plain_paths() -> None:
    u = parse_sink("weird?name.log", alias="--jsonl")  # --jsonl P = --sink P?kind=detections, P literal
    assert (u.kind, u.path, u.options) == ("jsonl", "weird?name.log", {"kind": "detections"})
    assert parse_sink("a.mp4", alias="--save").kind == "video"
    with pytest.raises(SinkError, match=r"^x.gif: --save needs one of .mp4, .m4v, .mov, .mkv, .avi$"):
        parse_sink("x.gif", alias="--save")
    opts = live.RunOptions(save=Path("v.mp4"), jsonl=Path("e.jsonl"), sinks=["b.jsonl?rotate=1K", "c.avi"])
    assert [(u.kind, u.path) for u in live.sink_uris(opts)] == [
        ("video", "v.mp4"), ("jsonl", "e.jsonl"), ("jsonl", "b.jsonl"), ("video", "c.avi"),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------ {camera}
@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("clip.mp4", "clip"),
        ("/data/videos/clip.mp4?loop=1&realtime=1", "clip"),
        ("file:///data/front door.mp4", "front_door"),
        ("frames/", "frames"),
        ("/dev/video0", "video0"),
        ("v4l2:///dev/video2?width=640", "video2"),
        ("0", "0"),
        ("csi://1?fps=60", "csi1"),
        ("rtsp://admin:s3cret@cam1.local:8554/live/main", "cam1.local_8554_live_main"),
        ("../..", "source"),
        ("", "source"),
    ],
)
def test_camera_slug(name: str, slug: str) -> None:
    assert camera_slug(name) == slug


def test_camera_placeholder(tmp_path: Path) -> None:
    sink = open_sink(f"{tmp_path}/{{camera}}/det-{{camera}}.jsonl", camera="rtsp://u:p@cam7/live")
    sink.write(frame(0), records(0), None)
    report = sink.close()
    assert report.path == tmp_path / "cam7_live" / "det-cam7_live.jsonl" and report.path.exists()
    with pytest.raises(SinkError, match=r"unknown placeholder \{host\} \(valid: \{camera\}\)"):
        open_sink(f"{tmp_path}/{{host}}.jsonl", camera="x")


def test_the_same_file_twice_is_refused(tmp_path: Path) -> None:
    a, b = parse_sink(f"{tmp_path}/{{camera}}.jsonl"), parse_sink(f"{tmp_path}/clip.jsonl?rotate=1M")
    with pytest.raises(SinkError, match="an output given twice"):
        open_sinks([a, b], camera="clip.mp4")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ JSON lines
def test_jsonl_appends_and_never_truncates(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "e.jsonl"
    for run in range(2):
        sink = open_sink(str(path))
        sink.write(frame(run), records(run, 2), None)
        sink.write(frame(run), [], None)  # a frame without detections writes nothing
        assert len(path.read_text().splitlines()) == 2 * (run + 1)  # flushed per frame, before close
        report = sink.close()
        assert (report.count, report.line()) == (2, f"wrote {path} (2 lines)")
    assert [r["frame"] for r in lines_of(path)] == [0, 0, 1, 1]


def test_rotation_at_a_small_size(tmp_path: Path) -> None:
    """rotate=1KB, keep=2: never more than 1 KiB a file, exactly 2 old files, no frame (so no line) split
    across files, and together the files hold the newest frames without a gap."""
    path = tmp_path / "e.jsonl"
    sink = open_sink(f"{path}?rotate=1KB&keep=2")
    assert isinstance(sink, JsonlSink)
    for i in range(40):
        sink.write(frame(i), records(i), None)
    report = sink.close()
    assert report.count == 120 and "rotated" in report.line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl", "e.jsonl.1", "e.jsonl.2"]
    frames: list[int] = []
    for p in (tmp_path / "e.jsonl.2", tmp_path / "e.jsonl.1", path):  # oldest first
        assert 0 < p.stat().st_size <= 1024
        rows = lines_of(p)  # every line parses: none was cut
        by_frame = [r["frame"] for r in rows]
        assert all(by_frame.count(f) == 3 for f in set(by_frame))  # whole frames only
        frames += by_frame[::3]
    assert frames == list(range(frames[0], 40))
    # a restart appends, then rotates on when full
    sink = open_sink(f"{path}?rotate=1KB&keep=2")
    sink.write(frame(40), records(40), None)
    sink.close()
    assert lines_of(path)[-1]["frame"] == 40 and len(list(tmp_path.iterdir())) == 3


def test_rotation_keep_zero_and_a_frame_larger_than_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    sink = JsonlSink(path, rotate=200, keep=0)
    for i in range(5):
        sink.write(frame(i), records(i, 4), None)  # ~4 x 60 bytes > 200: each frame alone in its file
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["e.jsonl"]
    assert {r["frame"] for r in lines_of(path)} == {4} and len(lines_of(path)) == 4


def test_jsonl_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(SinkError, match=f"^{tmp_path / 'd.jsonl'}: cannot write"):
        open_sink(str(tmp_path / "d.jsonl"))


# ------------------------------------------------------------------------------------------ video
def test_video_sink_by_uri(tmp_path: Path) -> None:
    sink = open_sink(str(tmp_path / "{camera}.avi"), camera="clip.mp4", fps=5)
    assert isinstance(sink, VideoSink) and sink.fps == 5.0
    for i in range(3):
        sink.write(frame(i), [], np.full((24, 32, 3), 50 * i, np.uint8))
    report = sink.close()
    assert report.line() == f"wrote {tmp_path / 'clip.avi'} (3 frames)"
    assert [p.name for p in tmp_path.iterdir()] == ["clip.avi"]  # the temporary name is gone
    empty = open_sink(str(tmp_path / "none.mp4")).close()
    assert not empty.written and "nothing written" in empty.line() and not (tmp_path / "none.mp4").exists()


# ------------------------------------------------------------------------------------------ run --sink
@pytest.fixture
def small_video(tmp_path: Path) -> Path:
    path = tmp_path / "in.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(12):
        vw.write(np.full((48, 64, 3), 15 * i, np.uint8))
    vw.release()
    return path


@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> list:
    from test_run import FakePipe

    made: list = []

    def factory(model, **kw):
        made.append(FakePipe())
        return made[-1]

    monkeypatch.setattr(live, "make_pipeline", factory)
    return made


def run_cli(*args: str):
    return CliRunner().invoke(cli, ["run", "m.onnx", "--no-show", "--fps-every", "0", *args])


def test_run_writes_to_several_sinks(small_video: Path, tmp_path: Path, fake_pipeline: list) -> None:
    from test_run import JSONL_KEYS, frames_of

    out = tmp_path / "out"
    a, b, c = out / "a.jsonl", out / "b.mp4", out / "in-c.jsonl"
    r = run_cli("--source", str(small_video), "--sink", str(a), "--sink", str(b),
                "--sink", f"{out}/{{camera}}-c.jsonl?rotate=1MB")  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = r.output.strip().splitlines()[-1]
    assert "12 frames" in summary and "stopped: end of source" in summary
    assert f"wrote {a} (24 lines)" in summary and f"wrote {b} (12 frames)" in summary
    assert f"wrote {c} (24 lines)" in summary
    assert frames_of(b) == 12 and a.read_text() == c.read_text()
    rows = lines_of(a)
    assert len(rows) == 24 and all(set(x) == JSONL_KEYS for x in rows) and rows[-1]["frame"] == 11
    # a second run appends; the --jsonl / --save aliases write the same as --sink
    r = run_cli("--source", str(small_video), "--jsonl", str(a), "--save", str(out / "s.avi"),
                "--max-frames", "5")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"wrote {a} (10 lines)" in r.output and f"wrote {out / 's.avi'} (5 frames)" in r.output
    assert [x["frame"] for x in lines_of(a)[::2]] == [*range(12), *range(5)]
    assert frames_of(out / "s.avi") == 5


def test_run_refuses_bad_sinks_before_opening_anything(
    small_video: Path, tmp_path: Path, fake_pipeline: list
) -> None:
    cases = {
        "x.txt": "x.txt: unknown output type '.txt'",
        "o.mp4?segment=10m": "segment= needs a container that plays when cut short",
        "e.jsonl?rotate=big": "rotate='big' is not a size",
    }
    for uri, message in cases.items():
        r = run_cli("--source", str(small_video), "--sink", str(tmp_path / uri) if "://" not in uri else uri)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and message in lines[0], (uri, r.output)
        assert lines[0].startswith("error: ")
    r = run_cli("--source", str(small_video), "--jsonl", str(tmp_path / "e.jsonl"),
                "--sink", str(tmp_path / "e.jsonl"))  # fmt: skip
    assert r.exit_code == 1 and "an output given twice" in r.output
    assert fake_pipeline == [] and list(tmp_path.iterdir()) == [small_video]  # no model, no file
