"""`mocha-edge run`: sources, outputs, live enrolment and every fault path of the live loop.

Most tests drive the loop with a fake pipeline (deterministic detections, injectable delay) and simulated
cameras; one test runs the real Pipeline end to end on an exported student, and one sends SIGINT/SIGTERM
to a real `python -m mocha_edge run` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from mocha_edge.cli import cli
from mocha_edge.deploy import live
from mocha_edge.deploy.live import (
    Console,
    LiveEnroller,
    RunOptions,
    detection_records,
    gui_available,
    run_loop,
)
from mocha_edge.deploy.sources import (
    Backoff,
    SourceError,
    camera_uri,
    csi_pipeline,
    csi_uri,
    has_gstreamer,
    open_source,
    parse_uri,
)
from mocha_edge.prototypes import BankError, PrototypeBank, l2n

REPO = Path(__file__).resolve().parents[1]
JSONL_KEYS = {"source", "frame", "t", "box_xyxy", "cls", "score", "identity", "similarity", "track_id"}


# ------------------------------------------------------------------------------------------ fakes
class FakePipe:
    """Two detections per frame: class 0 (score 0.9) and class 1 (0.5), vectors from the frame's colour;
    identities from its bank, as the real Pipeline (same attributes: names, dim, facts, identity_names,
    set_bank, which refuses a bank of another model)."""

    dim = 4

    def __init__(self, delay: float = 0.0) -> None:
        self.names = ["mug", "toy"]
        self.facts = SimpleNamespace(
            model_fingerprint="fake-model", precision="fp32"
        )  # a DeployConfig's fields
        self.bank: PrototypeBank | None = None
        self.identity_names: list[str] = []
        self.delay = delay
        self.timings = {"pre": 0.1, "infer": 1.0, "post": 0.2, "pool": 0.1, "match": 0.3}
        self.calls = 0

    def set_bank(self, bank: PrototypeBank) -> None:
        bank.check(self.facts.model_fingerprint, self.dim)
        self.bank, self.identity_names = bank, bank.prototypes()[1]

    def match_vectors(self, vectors: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.bank is not None and self.bank.identities:
            return self.bank.match(vectors, cls)
        return np.full(len(cls), -1, np.int64), np.full(len(cls), -np.inf, np.float32)

    def identity_similarity(self, vectors: np.ndarray, identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.bank is not None
        p = self.bank.prototypes()[0][identity]
        return (l2n(vectors) * p).sum(1), self.bank.thresholds()[identity]

    def __call__(self, bgr: np.ndarray) -> SimpleNamespace:
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        h, w = bgr.shape[:2]
        m = float(bgr.mean()) / 255.0
        boxes = np.array([[1, 1, w / 2, h / 2], [w / 2, h / 2, w - 1, h - 1]], np.float32)
        cls = np.array([0, 1], np.int64)
        vec = np.array([[1.0, m, 0.0, 0.0], [0.0, 0.0, 1.0, m]], np.float32)
        if self.bank is not None and self.bank.identities:
            ident, sim = self.bank.match(vec, cls)
        else:
            ident, sim = np.full(2, -1, np.int64), np.full(2, -np.inf, np.float32)
        return SimpleNamespace(boxes=boxes, scores=np.array([0.9, 0.5], np.float32), cls=cls, vectors=vec,
                               identity=ident, similarity=sim)  # fmt: skip


class FakeCamera:
    """A capture that delivers ``n`` frames then fails (the cable was pulled); ``n = 0``: never opens."""

    def __init__(self, n: int, start: int) -> None:
        self.n, self.value, self.open = n, start, n > 0

    def isOpened(self) -> bool:  # OpenCV's name
        return self.open

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.n == 0:
            return False, None
        self.n -= 1
        self.value += 1
        return True, np.full((24, 32, 3), self.value % 256, np.uint8)

    def release(self) -> None:
        self.open = False


def camera_factory(script: list[int]):
    """Each open consumes the next entry of ``script`` (frames before dropping out; 0: fails to open)."""
    opened: list[int] = []

    def factory(uri):
        n = script[len(opened)] if len(opened) < len(script) else 0
        opened.append(n)
        return FakeCamera(n, start=10 * len(opened))

    factory.opened = opened  # type: ignore[attr-defined]
    return factory


class Commands:
    """Scripted stdin: ``{poll number: [lines]}``."""

    def __init__(self, script: dict[int, list[str]], interactive: bool = False) -> None:
        self.script, self.n, self.interactive = script, 0, interactive

    def poll(self) -> list[str]:
        out = self.script.get(self.n, [])
        self.n += 1
        return out


class Quiet(Console):
    def __init__(self) -> None:
        super().__init__(stream=open(os.devnull, "w"))  # noqa: SIM115
        self.lines: list[str] = []

    def log(self, msg: str) -> None:
        self.lines.append(msg)

    def status(self, msg: str) -> None:
        self.lines.append(msg)


def frames_of(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), path
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_video(path: Path, images: list[np.ndarray], fps: float = 10.0) -> Path:
    h, w = images[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert vw.isOpened()
    for im in images:
        vw.write(cv2.resize(im, (w, h)))
    vw.release()
    return path


@pytest.fixture(scope="module")
def synth_images(synth_small: Path) -> list[Path]:
    return sorted((synth_small.parent / "novel" / "images").glob("novel_query_*.jpg"))[:8]


@pytest.fixture(scope="module")
def synth_video(synth_images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-frame mp4v video made from the synthetic benchmark's query images (3 passes)."""
    imgs = [cv2.imread(str(p)) for p in synth_images] * 3
    return write_video(tmp_path_factory.mktemp("video") / "synth.mp4", imgs)


def loop(source, pipe=None, console=None, bank_path=None, **opts):
    pipe = pipe or FakePipe()
    console = console or Quiet()
    if bank_path is not None and bank_path.exists():
        pipe.set_bank(PrototypeBank.load(bank_path))
    enroller = LiveEnroller(pipe, pipe.bank, bank_path, console.log)
    commands = opts.pop("commands", None)
    window = opts.pop("window", None)
    o = RunOptions(handle_signals=False, fps_every=0, **opts)
    return (
        run_loop(source, pipe, o, enroller, commands=commands, console=console, window=window),
        pipe,
        console,
    )


# ------------------------------------------------------------------------------------------ URIs
def test_camera_and_csi_uri_mapping() -> None:
    assert camera_uri(0) == "v4l2:///dev/video0" and camera_uri(3) == "v4l2:///dev/video3"
    assert csi_uri(1) == "csi://1"
    u = parse_uri(camera_uri(2))
    assert (u.kind, u.location, u.live) == ("v4l2", "/dev/video2", True)
    u = parse_uri("csi://1?width=1280&height=720&fps=60&flip=2")
    assert (u.kind, u.location, u.options) == (
        "csi",
        "1",
        {"width": 1280, "height": 720, "fps": 60, "flip": 2},
    )
    assert parse_uri("/dev/video1").location == "/dev/video1" and parse_uri("0").location == "/dev/video0"
    u = parse_uri("rtsp://cam.local:8554/live")
    assert (u.kind, u.location, u.live) == ("stream", "rtsp://cam.local:8554/live", True)


def test_bad_uris_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"unknown source scheme 'ftp'.*file, v4l2, csi, rtsp"):
        parse_uri("ftp://x/y.mp4")
    with pytest.raises(
        SourceError, match=r"unknown option 'zoom' \(valid for csi: width, height, fps, flip\)"
    ):
        parse_uri("csi://0?zoom=2")
    with pytest.raises(SourceError, match="must be an integer"):
        parse_uri("v4l2:///dev/video0?width=wide")
    with pytest.raises(SourceError, match=r"flip must be 0\.\.7"):
        parse_uri("csi://0?flip=9")
    with pytest.raises(SourceError, match="csi://N"):
        parse_uri("csi://front")
    with pytest.raises(SourceError, match="three slashes"):
        parse_uri("v4l2://video0")
    with pytest.raises(SourceError, match=f"{tmp_path / 'nope.mp4'}: no such file or folder"):
        parse_uri(str(tmp_path / "nope.mp4"))


def test_csi_gstreamer_pipeline_string() -> None:
    p = csi_pipeline(1, 1280, 720, 60, 2)
    assert p == (
        "nvarguscamerasrc sensor-id=1 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=60/1 ! "
        "nvvidconv flip-method=2 ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=1 max-buffers=1"
    )
    assert "sensor-id=0" in csi_pipeline() and "width=1920,height=1080,framerate=30/1" in csi_pipeline()


def test_csi_without_gstreamer_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    assert has_gstreamer("  Video I/O:\n    GStreamer:                   YES (1.20.3)\n")
    assert not has_gstreamer("  Video I/O:\n    GStreamer:                   NO\n")
    monkeypatch.setattr(cv2, "getBuildInformation", lambda: "Video I/O:\n  GStreamer:  NO\n")
    with pytest.raises(SourceError) as e:
        open_source("csi://0")
    msg = str(e.value)
    assert "without GStreamer" in msg and "JetPack's OpenCV" in msg and "docs/jetson.md" in msg
    assert "\n" not in msg


def test_csi_open_failure_tells_to_restart_nvargus() -> None:
    with pytest.raises(SourceError) as e:
        open_source("csi://0", capture_factory=camera_factory([0]))
    assert "sudo systemctl restart nvargus-daemon" in str(e.value) and "nvarguscamerasrc sensor-id=0" in str(
        e.value
    )

    def raising(uri):
        raise RuntimeError("GStreamer: Error generated. Failed to create CaptureSession")

    with pytest.raises(
        SourceError, match=r"Failed to create CaptureSession \(Argus: run `sudo systemctl restart"
    ):
        open_source("csi://0", capture_factory=raising)
    # a CSI camera lost mid-run: the reconnect warning carries the fix too
    warnings: list[str] = []
    src = open_source(
        "csi://0", warn=warnings.append, capture_factory=camera_factory([2, 3]), sleep=lambda s: None
    )
    assert [f.index for _, f in zip(range(4), src)] == [0, 1, 2, 3]
    assert warnings == [
        "camera csi://0 lost, reconnecting in 0.5s (if it stays lost: `sudo systemctl restart nvargus-daemon`)"
    ]


def test_missing_camera_device_and_bad_video(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="/dev/video97: no such camera device"):
        open_source("v4l2:///dev/video97")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(SourceError, match=f"{bad}: cannot open as a video"):
        open_source(str(bad))


# ------------------------------------------------------------------------------------------ sources
def test_folder_skips_unreadable_files_with_one_warning(tmp_path: Path) -> None:
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"im{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    good = (tmp_path / "im0.png").read_bytes()
    (tmp_path / "im1b.jpg").write_bytes(
        cv2.imencode(".jpg", np.zeros((40, 40, 3), np.uint8))[1][:60].tobytes()
    )
    (tmp_path / "im1c.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    warnings: list[str] = []
    with open_source(str(tmp_path), warn=warnings.append) as src:
        frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2]
    assert [Path(f.source_name).name for f in frames] == ["im0.png", "im1.png", "im2.png"]
    assert frames[0].image_bgr.shape == (20, 30, 3) and frames[0].image_bgr.dtype == np.uint8
    assert len(warnings) == 2 and src.skipped == 2
    assert str(tmp_path / "im1b.jpg") in warnings[0] and str(tmp_path / "im1c.png") in warnings[1]
    assert all("\n" not in w and "skipped" in w for w in warnings)
    with pytest.raises(SourceError, match=str(tmp_path / "im1b.jpg")):
        list(open_source(str(tmp_path / "im1b.jpg")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image in this folder"):
        open_source(str(tmp_path / "empty"))


def test_single_image_and_video_file(synth_images: list[Path], synth_video: Path) -> None:
    frames = list(open_source(str(synth_images[0])))
    assert len(frames) == 1 and frames[0].source_name == str(synth_images[0])
    with open_source(f"file://{synth_video}") as src:
        assert src.fps == pytest.approx(10.0) and not src.live
        frames = list(src)
    assert len(frames) == 24 and [f.index for f in frames] == list(range(24))
    assert frames[5].t == pytest.approx(0.5) and frames[0].source_name == f"file://{synth_video}"


def test_camera_drops_out_twice_and_comes_back() -> None:
    """3 frames, drop; reopen fails once; 2 frames, drop; 2 frames: numbering goes on, backoff doubles and
    resets after a good frame."""
    factory, sleeps, warnings = camera_factory([3, 0, 2, 2]), [], []
    src = open_source("v4l2:///dev/video0", warn=warnings.append, capture_factory=factory,
                      backoff=Backoff(initial=0.5, maximum=8.0), sleep=sleeps.append)  # fmt: skip
    frames = [f for _, f in zip(range(7), src)]
    assert [f.index for f in frames] == list(range(7))
    assert [int(f.image_bgr[0, 0, 0]) for f in frames] == [
        11,
        12,
        13,
        31,
        32,
        41,
        42,
    ]  # 3 opens served frames
    assert sleeps == [0.5, 1.0, 0.5]
    assert warnings == [
        "camera v4l2:///dev/video0 lost, reconnecting in 0.5s",
        "camera v4l2:///dev/video0 still lost (attempt 2), reconnecting in 1s",
        "camera v4l2:///dev/video0 lost, reconnecting in 0.5s",
    ]
    assert src.reconnects == 3 and frames[0].t > 1e9  # live frames carry the wall-clock time


def test_backoff_is_capped_and_can_give_up() -> None:
    sleeps: list[float] = []
    src = open_source("rtsp://cam/x", warn=lambda m: None, capture_factory=camera_factory([1]),
                      backoff=Backoff(initial=0.5, maximum=2.0, retries=5), sleep=sleeps.append)  # fmt: skip
    with pytest.raises(SourceError, match="rtsp://cam/x lost: no frame after 5 reconnection attempts"):
        list(src)
    assert sleeps == [0.5, 1.0, 2.0, 2.0, 2.0]


# ------------------------------------------------------------------------------------------ loop + outputs
def test_video_source_to_annotated_video_and_jsonl(synth_video: Path, tmp_path: Path) -> None:
    save, events = tmp_path / "out" / "annotated.mp4", tmp_path / "events.jsonl"
    with open_source(str(synth_video)) as src:
        summary, pipe, _ = loop(src, save=save, jsonl=events)
    assert summary.frames == 24 and summary.stopped == "end of source" and pipe.calls == 24
    assert frames_of(save) == 24 and summary.video_frames == 24
    assert sorted(p.name for p in save.parent.iterdir()) == ["annotated.mp4"]  # no temporary file left
    rows = read_jsonl(events)
    assert len(rows) == 48 == summary.jsonl_lines == summary.detections
    for r in rows:
        assert set(r) == JSONL_KEYS
        assert isinstance(r["frame"], int) and isinstance(r["t"], float) and isinstance(r["score"], float)
        assert len(r["box_xyxy"]) == 4 and r["cls"] in ("mug", "toy")
        assert r["identity"] is None and r["similarity"] is None  # no bank: detection only
    assert [r["frame"] for r in rows[::2]] == list(range(24))
    assert rows[2]["t"] == pytest.approx(0.1) and rows[0]["source"] == str(synth_video)
    assert rows[0]["box_xyxy"][:3] == [1.0, 1.0, summary_w(synth_video) / 2]
    assert "24 frames" in summary.line() and f"wrote {save} (24 frames)" in summary.line()


def summary_w(video: Path) -> int:
    cap = cv2.VideoCapture(str(video))
    w = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    cap.release()
    return w


def test_folder_of_mixed_sizes_and_max_frames(tmp_path: Path) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    for i, (h, w) in enumerate([(40, 60), (50, 50), (40, 60), (30, 80)]):
        cv2.imwrite(str(d / f"{i}.png"), np.full((h, w, 3), 30 * i, np.uint8))
    (d / "2b.jpg").write_bytes(b"\xff\xd8 broken")
    with open_source(str(d), warn=lambda m: None) as src:
        summary, _, _ = loop(src, save=tmp_path / "o.avi", jsonl=tmp_path / "e.jsonl", max_frames=3)
    assert summary.frames == 3 and summary.stopped == "--max-frames 3" and frames_of(tmp_path / "o.avi") == 3
    assert {r["source"] for r in read_jsonl(tmp_path / "e.jsonl")} == {str(d / f"{i}.png") for i in range(3)}
    with open_source(str(d), warn=lambda m: None) as src:
        summary, _, _ = loop(src)
    assert summary.frames == 4 and summary.skipped == 1 and "1 unreadable skipped" in summary.line()


def wait_for_output(proc: subprocess.Popen, path: Path, timeout: float = 60.0) -> None:
    """Wait until the running child ``proc`` has written something to ``path`` (fails if it exits first)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no output after {timeout:g} s"
        time.sleep(0.05)


def in_step_camera(counts: list[int]) -> tuple[Any, FakePipe, Any]:
    """``(capture factory, pipe, stopper)`` for a scripted live camera (:func:`camera_factory`) whose capture
    thread reads in step with the loop: one frame per frame the pipe processes (a camera slower than the
    pipeline, so none is dropped). Open the source with ``sleep=stopper.sleep``: the loop's end stops it."""
    import threading

    from mocha_edge.deploy.cameras import Stopper

    turn, stopper = threading.Semaphore(1), Stopper()
    script = camera_factory(counts)

    def factory(uri):
        cam = script(uri)
        read = cam.read

        def in_step():
            while cam.n > 0 and not turn.acquire(timeout=0.05):
                if stopper.event.is_set():
                    break
            return read()

        cam.read = in_step
        return cam

    class InStep(FakePipe):
        def __call__(self, bgr):
            turn.release()
            return super().__call__(bgr)

    return factory, InStep(), stopper


def test_reconnecting_camera_in_the_loop(tmp_path: Path) -> None:
    """A live camera that drops out twice: it reconnects and numbering goes on."""
    console = Quiet()
    factory, pipe, stopper = in_step_camera([3, 0, 2, 5])
    src = open_source("csi://0", warn=lambda m: console.log(f"warning: {m}"), capture_factory=factory,
                      sleep=stopper.sleep, backoff=Backoff(initial=0.001, maximum=0.002))  # fmt: skip
    summary, _, _ = loop(
        src, pipe, console=console, jsonl=tmp_path / "e.jsonl", save=tmp_path / "v.mp4", max_frames=8
    )
    assert summary.frames == 8 and summary.reconnects == 3
    assert sorted({r["frame"] for r in read_jsonl(tmp_path / "e.jsonl")}) == list(range(8))
    assert frames_of(tmp_path / "v.mp4") == 8
    assert sum("camera csi://0 lost" in line for line in console.lines) == 2


def test_fps_line_reports_stage_timings(synth_video: Path) -> None:
    console = Quiet()
    with open_source(str(synth_video)) as src:
        pipe = FakePipe(delay=0.01)
        enroller = LiveEnroller(pipe, None, None, console.log)
        run_loop(src, pipe, RunOptions(handle_signals=False, fps_every=0.05), enroller, console=console)
    lines = [line for line in console.lines if "FPS" in line]
    assert lines, console.lines
    assert "FPS | ms: pre 0.1 infer 1.0 post 0.2 pool 0.1 match 0.3 track " in lines[0]
    fps = float(lines[0].split()[0])
    assert 5 < fps < 100  # 10 ms fake inference + reading and output


def test_interrupt_finalises_video_and_jsonl(synth_video: Path, tmp_path: Path) -> None:
    class Interrupting(FakePipe):
        def __call__(self, bgr):
            if self.calls == 5:
                raise KeyboardInterrupt
            return super().__call__(bgr)

    with open_source(str(synth_video)) as src:
        summary, _, _ = loop(src, Interrupting(), save=tmp_path / "v.mp4", jsonl=tmp_path / "e.jsonl")
    assert summary.stopped == "SIGINT" and summary.frames == 5
    assert frames_of(tmp_path / "v.mp4") == 5 and len(read_jsonl(tmp_path / "e.jsonl")) == 10


# ------------------------------------------------------------------------------------------ enrolment
def test_enroll_command_adds_a_shot_used_from_the_next_frame(synth_video: Path, tmp_path: Path) -> None:
    bank_path = tmp_path / "live.bank"
    cmds = Commands(
        {3: ["enroll my mug"], 6: ["help", "enroll my mug", "dance"], 9: ["enroll"], 12: ["quit"]}
    )
    console = Quiet()
    with open_source(str(synth_video)) as src:
        summary, pipe, _ = loop(  # per-frame identities: the shot is used from the very next frame
            src,
            console=console,
            bank_path=bank_path,
            commands=cmds,
            jsonl=tmp_path / "e.jsonl",
            tracker="none",
        )
    assert summary.stopped == "quit" and summary.frames == 12 and summary.enrolled == ["my mug", "my mug"]
    bank = PrototypeBank.load(bank_path)
    assert list(bank.identities) == ["my mug"] and len(bank.identities["my mug"].shots) == 2
    assert bank.model_fingerprint == "fake-model" and bank.dim == 4 and bank.identities["my mug"].coarse == 0
    assert pipe.bank is not None and len(pipe.bank.identities["my mug"].shots) == 2
    rows = read_jsonl(tmp_path / "e.jsonl")
    mugs = {r["frame"]: r["identity"] for r in rows if r["cls"] == "mug"}
    assert all(mugs[f] is None for f in range(4)) and all(mugs[f] == "my mug" for f in range(4, 12))
    assert all(r["identity"] is None for r in rows if r["cls"] == "toy")  # conditional: other class
    confirm = [line for line in console.lines if line.startswith("enrolled")]
    assert confirm[0] == f"enrolled 'my mug' (mug) from frame 3: 1 shot, 1 identities, saved {bank_path}"
    assert "2 shots" in confirm[1]
    assert any("unknown command 'dance'" in line for line in console.lines)
    assert any("usage: enroll NAME" in line for line in console.lines)


def test_enroll_needs_a_bank_file_and_a_detection(synth_video: Path) -> None:
    class Empty(FakePipe):
        def __call__(self, bgr):
            d = super().__call__(bgr)
            return SimpleNamespace(**{k: v[:0] for k, v in vars(d).items()})

    console = Quiet()
    with open_source(str(synth_video)) as src:
        loop(src, console=console, commands=Commands({1: ["enroll a"]}), max_frames=3)
    assert any("needs a bank file: start with --prototypes FILE" in line for line in console.lines)
    with open_source(str(synth_video)) as src:
        loop(src, Empty(), console=console, bank_path=Path("/nonexistent/never.bank"),
             commands=Commands({1: ["enroll a"]}), max_frames=3)  # fmt: skip
    assert any("enroll a: no detection in frame 1; nothing enrolled" in line for line in console.lines)


def test_key_e_enrols_what_the_window_shows(synth_video: Path, tmp_path: Path) -> None:
    class Win:
        def __init__(self, keys: dict[int, int]) -> None:
            self.keys, self.n, self.shown, self.closed = keys, 0, [], False

        def show(self, img):
            self.shown.append(img.shape)
            k = self.keys.get(self.n, -1)
            self.n += 1
            return k

        def close(self):
            self.closed = True

    bank_path = tmp_path / "k.bank"
    win = Win({2: ord("e"), 4: ord("e"), 6: ord("q")})
    with open_source(str(synth_video)) as src:
        summary, _, _ = loop(src, bank_path=bank_path, window=win)
    assert summary.stopped == "key q" and summary.frames == 7 and win.closed
    assert sorted(PrototypeBank.load(bank_path).identities) == ["obj-1", "obj-2"]
    # on a terminal the name is asked: the next stdin line names it
    win = Win({1: ord("e")})
    cmds = Commands({3: ["cat"]}, interactive=True)
    with open_source(str(synth_video)) as src:
        loop(src, bank_path=bank_path, window=win, commands=cmds, max_frames=5)
    assert sorted(PrototypeBank.load(bank_path).identities) == ["cat", "obj-1", "obj-2"]


def test_bank_of_another_model_is_refused(synth_video: Path, tmp_path: Path) -> None:
    other = PrototypeBank(4, "another-model", ["mug", "toy"])
    other.add("x", 0, np.ones(4))
    other.save(tmp_path / "o.bank")

    def factory(model, **kw):
        return FakePipe()

    with pytest.raises(BankError, match=f"{tmp_path / 'o.bank'}: prototype bank was made by another model"):
        live.run("m.onnx", str(synth_video), RunOptions(show=False, handle_signals=False),
                 bank_path=tmp_path / "o.bank", pipeline_factory=factory, console=Quiet())  # fmt: skip


# ------------------------------------------------------------------------------------------ CLI
def test_cli_option_errors(synth_video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = CliRunner().invoke(cli, ["run", "m.onnx"])
    assert r.exit_code == 2 and "give a source: --source [NAME=]URI, --camera N or --csi N" in r.output
    r = CliRunner().invoke(cli, ["run", "m.onnx", "--camera", "97", "--csi", "0"])  # several cameras: one run
    assert (
        r.exit_code == 1
        and r.output.strip() == "error: /dev/video97: no such camera device (list them with `ls /dev/video*`)"
    )
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    r = CliRunner().invoke(cli, ["run", "m.onnx", "--source", str(synth_video), "--show"])
    assert (
        r.exit_code == 1
        and r.output.strip() == "error: --show: no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    )
    r = CliRunner().invoke(cli, ["run", "m.onnx", "--source", str(synth_video), "--save", "x.gif"])
    assert r.exit_code == 1 and "x.gif: --save needs one of .mp4" in r.output
    r = CliRunner().invoke(cli, ["run", "m.onnx", "--csi", "0"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "csi://0" in lines[0]


def test_gui_detection() -> None:
    qt = "  GUI:                           QT5\n"
    assert gui_available(qt, {"DISPLAY": ":0"}) == (True, "")
    assert gui_available(qt, {"WAYLAND_DISPLAY": "wayland-0"})[0]
    assert not gui_available(qt, {})[0]
    assert gui_available("  GUI:                           NONE\n", {"DISPLAY": ":0"}) == (
        False,
        "this OpenCV has no GUI backend (a -headless build?)",
    )


def test_detection_records_schema() -> None:
    frame = SimpleNamespace(source_name="csi://0", index=7, t=1.5)
    dets = SimpleNamespace(boxes=np.array([[1.234, 2, 3, 4.5]]), scores=np.array([0.87654321]),
                           cls=np.array([1]), identity=np.array([0]), similarity=np.array([0.9]))  # fmt: skip
    (r,) = detection_records(frame, dets, ["mug", "toy"], ["bob"])
    assert r == {"source": "csi://0", "frame": 7, "t": 1.5, "box_xyxy": [1.23, 2.0, 3.0, 4.5], "cls": "toy",
                 "score": 0.87654, "identity": "bob", "similarity": 0.9, "track_id": None}  # fmt: skip


# ------------------------------------------------------------------------------------------ signals
DRIVER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import mocha_edge.deploy.live as live
    from test_run import FakePipe

    live.make_pipeline = lambda model, **kw: FakePipe(delay=0.03)
    from mocha_edge.cli import main
    main(sys.argv[1:])
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly(sig: signal.Signals, synth_images: list[Path], tmp_path: Path) -> None:
    """A real `mocha-edge run` process (fake slow pipeline) on a long video: `enroll` on stdin, then a
    signal: exit 0, finished mp4, every JSON line complete, summary printed, bank saved."""
    imgs = [cv2.imread(str(p)) for p in synth_images] * 40  # 320 frames, ~10 s at 30 ms a frame
    video = write_video(tmp_path / "long.mp4", imgs)
    save, events, bank = tmp_path / "out.mp4", tmp_path / "e.jsonl", tmp_path / "b.bank"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(tests=str(REPO / "tests")))
    proc = subprocess.Popen(
        [sys.executable, str(driver), "run", "m.onnx", "--source", str(video), "--save", str(save),
         "--jsonl", str(events), "--prototypes", str(bank), "--no-show", "--fps-every", "0.5"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        wait_for_output(proc, events)
        proc.stdin.write("enroll thing\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not bank.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "bank not written"
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"stopped: {sig.name}" in out and "wrote" in out, out
    assert "enrolled 'thing' (mug)" in err, err
    n = frames_of(save)
    assert 0 < n < 320
    rows = read_jsonl(events)  # every line parses
    assert len(rows) == 2 * n and {r["frame"] for r in rows} == set(range(n))
    assert any(r["identity"] == "thing" for r in rows)
    assert PrototypeBank.load(bank).identities["thing"].coarse == 0
    assert not list(tmp_path.glob(".out.*"))


# ------------------------------------------------------------------------------------------ real pipeline
def test_end_to_end_with_the_real_pipeline(
    student_ckpt: Path, synth_images: list[Path], tmp_path: Path
) -> None:
    """The exported student run by the real Pipeline: find a detection, enrol its box with the PyTorch
    path (`mocha_edge.enroll`), then `mocha-edge run` the ONNX model with that bank over a folder and a
    video: outputs complete, and the enrolled box is found again and named, with cosine ~1 (the ONNX
    pipeline's vectors agree with enrolment's)."""
    from mocha_edge.enroll import enroll
    from mocha_edge.export.onnx import export_onnx
    from mocha_edge.infer import Student

    onnx = export_onnx(Student.load(student_ckpt), tmp_path / "student.onnx")
    folder = tmp_path / "frames"
    folder.mkdir()
    for p in synth_images:
        (folder / p.name).write_bytes(p.read_bytes())
    video = write_video(tmp_path / "v.mp4", [cv2.imread(str(p)) for p in synth_images])
    conf = "0.001"  # the session's student is trained for seconds: its scores are low

    def run_cli(src: Path, *extra: str) -> list[dict]:
        events = tmp_path / f"{src.stem}.jsonl"
        r = CliRunner().invoke(cli, ["run", str(onnx), "--source", str(src), "--jsonl", str(events), "--conf", conf,
                                     "--no-show", "--fps-every", "0", *extra])  # fmt: skip
        assert r.exit_code == 0, r.output
        assert "stopped: end of source" in r.output
        rows = read_jsonl(events)
        assert rows and all(set(x) == JSONL_KEYS for x in rows)
        return rows

    first = synth_images[0]
    rows = run_cli(folder / first.name)  # detection only
    assert all(x["identity"] is None and x["similarity"] is None for x in rows)
    top = max(rows, key=lambda x: x["score"])
    bank = tmp_path / "live.bank"
    enroll(student_ckpt, bank, name="target", images=[folder / first.name],
           boxes=[",".join(f"{v:g}" for v in top["box_xyxy"])], cls=top["cls"])  # fmt: skip
    for src in (folder, video):
        save = tmp_path / f"{src.stem}.out.mp4"
        # (the briefly trained student's scores sit below the default naming confidence 0.5)
        rows = run_cli(src, "--prototypes", str(bank), "--save", str(save), "--name-conf", "0.1",
                       "--tracker", "none")  # fmt: skip
        assert frames_of(save) == len(synth_images)
        assert {x["frame"] for x in rows} <= set(range(len(synth_images)))
        assert {x["identity"] for x in rows} <= {None, "target"}
        assert all(
            x["similarity"] is not None for x in rows if x["cls"] == top["cls"]
        )  # conditional matching
        if src == folder:
            again = [
                x
                for x in rows
                if x["source"] == str(folder / first.name)
                and (x["box_xyxy"], x["cls"]) == (top["box_xyxy"], top["cls"])
            ]
            # (the briefly trained student makes near-duplicate boxes that clip to the same pixels)
            best = max(again, key=lambda x: x["score"])
            assert (
                best["score"] == top["score"] and best["identity"] == "target" and best["similarity"] > 0.99
            )


def test_background_enrolment_never_blocks_the_frame_loop(
    synth_video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run`'s enroller copies, recalibrates and saves the bank on a worker thread: frames keep flowing while
    a (slow) save is under way, the new bank reaches the pipe from a later frame, and the loop's end waits
    for queued edits so the file is final."""
    bank_path = tmp_path / "bg.bank"
    save = PrototypeBank.save
    window: list[float] = []

    def slow_save(self, path):
        window.append(time.perf_counter())
        time.sleep(0.6)
        save(self, path)
        window.append(time.perf_counter())

    monkeypatch.setattr(PrototypeBank, "save", slow_save)
    calls: list[float] = []

    class TimedPipe(FakePipe):
        def __call__(self, bgr):
            calls.append(time.perf_counter())
            return super().__call__(bgr)

    pipe, console = TimedPipe(delay=0.05), Quiet()
    enroller = LiveEnroller(pipe, None, bank_path, console.log, background=True)
    with open_source(str(synth_video)) as src:
        summary = run_loop(src, pipe, RunOptions(handle_signals=False, fps_every=0), enroller,
                           commands=Commands({2: ["enroll bg"], 4: ["enroll bg"]}), console=console)  # fmt: skip
    assert len(window) == 4  # two saves, each timed
    during = [t for t in calls if window[0] < t < window[1]]
    assert len(during) >= 3, "the frame loop waited for the enrolment"
    assert summary.enrolled == ["bg", "bg"] and pipe.bank is not None
    assert len(PrototypeBank.load(bank_path).identities["bg"].shots) == 2
    assert sum(line.startswith("enrolled 'bg'") for line in console.lines) == 2
