"""`run --http`: the REST API over a real uvicorn server and the real live loop (a paced video, a fake pipeline
that matches through its bank), its security rules, and the bank shared with `mocha-edge enroll`."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_run import FakePipe, Quiet, write_video

from mocha_edge.deploy import web
from mocha_edge.deploy.live import LiveEnroller, RunOptions, run_loop
from mocha_edge.deploy.web import WebHub, WebServer, parse_http
from mocha_edge.prototypes import PrototypeBank

TOKEN = "t0ken-for-the-tests-0123456789"


class StopCommands:
    """stdin for the loop: ``quit`` once :attr:`stop` is set."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def poll(self) -> list[str]:
        return ["quit"] if self.stop.is_set() else []


@dataclass
class Live:
    url: str
    hub: WebHub
    bank: Path
    console: Quiet
    pipe: FakePipe
    host: str
    port: int

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                raw: bytes | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        conn = http.client.HTTPConnection(self.host, self.port, timeout=20)
        h = {"Authorization": f"Bearer {TOKEN}"} if self.hub.token else {}
        if body is not None:
            raw = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        conn.request(method, path, body=raw, headers=h)
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def stream(self, path: str, content_type: str) -> tuple[http.client.HTTPConnection, Any]:
        """An open streaming response (status 200 and ``content_type`` checked) and its connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("content-type").startswith(content_type)
        return conn, r

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data) if data else None

    def detections(self, cam: str = "clip", need: int = 1, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, d = self.json("GET", f"/api/cameras/{cam}/detections")
            assert status == 200, d
            if len(d["detections"]) >= need:
                return d
            time.sleep(0.05)
        raise AssertionError(f"no detections from {cam} in {timeout} s")


def _video(path: Path, n: int = 30) -> Path:
    rng = np.random.default_rng(0)
    imgs = [np.full((120, 160, 3), int(v), np.uint8) for v in rng.integers(40, 200, n)]
    return write_video(path, imgs, fps=30.0)


@pytest.fixture
def live(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Live]:
    """`run_loop` on a 30 FPS paced looping video with the web server on 127.0.0.1 (the token given as the
    fixture's parameter, if any)."""
    from mocha_edge.deploy.cameras import Stopper
    from mocha_edge.deploy.sources import open_source

    token = getattr(request, "param", None)
    video = _video(tmp_path / "clip.mp4")
    stopper = Stopper()
    src = open_source(f"{video}?loop=1&realtime=1", sleep=stopper.sleep)
    pipe, console = FakePipe(), Quiet()
    bank = tmp_path / "my.bank"
    enroller = LiveEnroller(pipe, None, bank, console.log, background=True)
    hub = WebHub(http_fps=10, token=token, loopback_only=True)
    server = WebServer(hub, "127.0.0.1", 0)
    server.start()
    cmds = StopCommands()
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["summary"] = run_loop(src, pipe, RunOptions(handle_signals=False, fps_every=0), enroller,
                                      commands=cmds, console=console, web=hub)  # fmt: skip
        except BaseException as e:
            out["error"] = e

    th = threading.Thread(target=body, daemon=True)
    th.start()
    deadline = time.monotonic() + 10
    while not hub.cams and th.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # run_loop registers its cameras
    try:
        yield Live(server.url, hub, bank, console, pipe, "127.0.0.1", server.port)
    finally:
        cmds.stop.set()
        th.join(20)
        server.stop()
    assert not th.is_alive(), "the loop did not stop"
    if "error" in out:
        raise out["error"]
    assert not out["summary"].faults, out["summary"].faults


def test_parse_http() -> None:
    assert parse_http("8080") == ("127.0.0.1", 8080)
    assert parse_http("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_http("[::1]:9000") == ("::1", 9000)
    for bad in ("x", "1:99999", "[::1]9000", ":"):
        with pytest.raises(web.WebError, match="--http"):
            parse_http(bad)


def test_live_view_api_and_openapi(live: Live) -> None:
    status, h = live.json("GET", "/api/health")
    assert status == 200 and h["ok"] and h["bank"]["identities"] == 0 and h["cameras"] == ["clip"]
    d = live.detections(need=2)
    assert d["width"] == 160 and d["height"] == 120
    det = d["detections"][0]
    assert set(det) == {"id", "box_xyxy", "cls", "score", "track_id", "identity", "similarity"}
    assert det["cls"] == "mug" and det["identity"] is None and isinstance(det["track_id"], int)
    # the raw view of that frame, and the annotated latest one
    status, hdr, jpg = live.request("GET", f"/api/cameras/clip/frame.jpg?boxes=0&frame={d['frame']}")
    assert status == 200 and hdr["content-type"] == "image/jpeg" and hdr["x-frame"] == str(d["frame"])
    img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (120, 160, 3)
    # the view changes: a long poll returns a newer frame
    status, d2 = live.json("GET", f"/api/cameras/clip/detections?after={d['frame']}")
    assert status == 200 and d2["frame"] != d["frame"]
    status, c = live.json("GET", "/api/cameras")
    cam = c["cameras"][0]
    assert cam["name"] == "clip" and cam["fps"] > 5 and {"pre", "infer", "track"} <= set(cam["stages_ms"])
    status, spec = live.json("GET", "/openapi.json")
    paths = set(spec["paths"])
    assert {"/api/health", "/api/cameras", "/api/cameras/{cam}/frame.jpg", "/api/cameras/{cam}/stream.mjpg",
            "/api/cameras/{cam}/detections", "/api/identities", "/api/identities/{name}",
            "/api/identities/{name}/negatives", "/api/events", "/api/events/history"} <= paths  # fmt: skip
    assert live.request("GET", "/docs")[0] == 404  # no docs page: its assets would come from a CDN
    status, hdr, page = live.request("GET", "/")
    assert status == 200 and b"<html" in page.lower()
    assert "frame-ancestors 'none'" in hdr["content-security-policy"] and hdr["x-frame-options"] == "DENY"
    assert live.json("GET", "/api/cameras/nope/detections")[0] == 404


def test_mjpeg_stream_sends_annotated_frames(live: Live) -> None:
    conn, r = live.stream("/api/cameras/clip/stream.mjpg", "multipart/x-mixed-replace")
    buf = b""
    while buf.count(b"--frame") < 3:
        buf += r.read1(65536)
    conn.close()
    part = buf.split(b"--frame")[1]
    jpg = part.split(b"\r\n\r\n", 1)[1]
    assert jpg[:2] == b"\xff\xd8"


def views_after(live: Live, frame: int, n: int, wait: float = 10.0) -> list[dict[str, Any]]:
    """The next ``n`` views of camera clip after ``frame`` (long polls; ``wait`` s at most: a hang, not a speed
    limit)."""
    assert isinstance(frame, int) and frame >= 0, frame
    out: list[dict[str, Any]] = []
    end = time.monotonic() + wait
    while len(out) < n:
        assert time.monotonic() < end, f"only {len(out)} views after frame {frame} in {wait} s"
        last = out[-1]["frame"] if out else frame
        d = live.json("GET", f"/api/cameras/clip/detections?after={last}")[1]
        if d["frame"] > last:
            out.append(d)
    return out


def test_enrol_correct_rename_remove(live: Live) -> None:
    d = live.detections(need=2)
    det = d["detections"][0]
    status, r = live.json(
        "POST", "/api/identities", {"name": " Rex ", "camera": "clip", "detection_id": det["id"]}
    )
    assert status == 201, r
    assert r["name"] == "Rex" and r["shots"] == 1 and r["created"] is True
    # the name is on the clicked track in every view after the frame the answer names (bank in the pipe, pin)
    later = views_after(live, r["frame"], 3)
    assert all(
        x["identity"] == "Rex" for v in later for x in v["detections"] if x["track_id"] == det["track_id"]
    )
    assert any(x["identity"] == "Rex" for v in later for x in v["detections"]), later
    bank = PrototypeBank.load(live.bank)
    assert list(bank.identities) == ["Rex"] and bank.identities["Rex"].thumb is not None
    status, ids = live.json("GET", "/api/identities")
    (rex,) = ids["identities"]
    assert rex["shots"] == 1 and rex["negatives"] == 0 and rex["cls"] == "mug" and rex["thumb"]
    status, _hdr, thumb = live.request("GET", rex["thumb"])
    assert status == 200 and thumb[:2] == b"\xff\xd8"
    # a second shot from the same track
    status, r = live.json(
        "POST", "/api/identities", {"name": "Rex", "camera": "clip", "track_id": det["track_id"]}
    )
    assert status == 201 and r["shots"] == 2 and r["created"] is False, r
    # "not Rex" on the named box: a correction in the bank, and that track stops showing Rex
    named = next(x for v in reversed(later) for x in v["detections"] if x["identity"] == "Rex")
    status, r = live.json(
        "POST", "/api/identities/Rex/negatives", {"camera": "clip", "detection_id": named["id"]}
    )
    assert status == 200 and r["negatives"] == 1, r
    later = views_after(live, r["frame"], 3)
    same = [x for v in later for x in v["detections"] if x["track_id"] == named["track_id"]]
    assert same and all(x["identity"] != "Rex" for x in same), later
    assert len(PrototypeBank.load(live.bank).identities["Rex"].negatives) == 1
    status, r = live.json("PATCH", "/api/identities/Rex", {"name": "Max"})
    assert status == 200 and r["name"] == "Max"
    bank = PrototypeBank.load(live.bank)
    assert list(bank.identities) == ["Max"] and len(bank.identities["Max"].shots) == 2
    assert live.json("GET", "/api/identities")[1]["identities"][0]["name"] == "Max"
    status, r = live.json("DELETE", "/api/identities/Max")
    assert status == 200 and r["removed"] == "Max"
    assert not PrototypeBank.load(live.bank).identities
    assert live.json("DELETE", "/api/identities/Max")[0] == 404


def test_events_stream_and_history(live: Live) -> None:
    conn, r = live.stream("/api/events", "text/event-stream")
    d = live.detections(need=1)
    live.json(
        "POST", "/api/identities", {"name": "Rex", "camera": "clip", "detection_id": d["detections"][0]["id"]}
    )
    buf = b""
    deadline = time.monotonic() + 10
    while b"event: identified" not in buf and time.monotonic() < deadline:
        buf += r.read1(65536)
    conn.close()
    assert b"event: identified" in buf, buf[-500:]
    block = buf[buf.index(b"event: identified") :].split(b"\n\n")[0]
    rec = json.loads(block.split(b"data: ", 1)[1])
    assert rec["identity"] == "Rex" and rec["camera"] == "clip"
    hist = live.json("GET", "/api/events/history")[1]["events"]
    assert any(e["event"] == "identified" and e["identity"] == "Rex" for e in hist)
    assert [e["id"] for e in hist] == sorted(e["id"] for e in hist)


def test_bad_requests(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    d = live.detections(need=1)
    det = d["detections"][0]
    for bad, rule in (("", "is empty"), ("x" * 65, "65 characters"), ("a\x07b", "control"), ("a/b", "'/'")):
        status, r = live.json(
            "POST", "/api/identities", {"name": bad, "camera": "clip", "detection_id": det["id"]}
        )
        assert status == 422 and rule in r["detail"], (bad, r)
    # an id no longer held: 409 asking to click again
    status, r = live.json("POST", "/api/identities", {"name": "Rex", "camera": "clip", "detection_id": 10**9})
    assert status == 409 and "click the box again" in r["detail"]
    monkeypatch.setattr(web, "ID_TTL", 0.0)
    status, r = live.json(
        "POST", "/api/identities", {"name": "Rex", "camera": "clip", "detection_id": det["id"]}
    )
    assert status == 409, r
    monkeypatch.undo()
    # cross-origin state changes, non-JSON bodies, big bodies
    body = {"name": "Rex", "camera": "clip", "detection_id": det["id"]}
    assert live.json("POST", "/api/identities", body, headers={"Origin": "http://evil.example"})[0] == 403
    assert live.json("POST", "/api/identities", body, headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    status, _, _ = live.request(
        "POST", "/api/identities", raw=b"name=Rex", headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    big = {"name": "Rex", "camera": "clip", "detection_id": det["id"], "pad": "x" * 10000}
    assert live.json("POST", "/api/identities", big)[0] == 413
    # a DNS-rebinding page: a foreign Host on the loopback server
    assert live.json("GET", "/api/health", headers={"Host": "evil.example:80"})[0] == 403
    # same-origin requests pass
    origin = f"http://127.0.0.1:{live.port}"
    status, r = live.json(
        "POST", "/api/identities", body, headers={"Origin": origin, "Sec-Fetch-Site": "same-origin"}
    )
    assert status == 201, r
    assert live.json("PATCH", "/api/identities/Nobody", {"name": "X"})[0] == 404


@pytest.mark.parametrize("live", [TOKEN], indirect=True)
def test_token_required(live: Live) -> None:
    conn = http.client.HTTPConnection(live.host, live.port, timeout=10)
    for path, headers in (("/api/health", {}), ("/api/health", {"Authorization": "Bearer wrong"}),
                          ("/", {}), ("/api/events", {"Cookie": "mocha_edge_token=nope"})):  # fmt: skip
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        assert r.status == 401 and r.read() == b"", path
    conn.request("GET", f"/?token={TOKEN}")
    r = conn.getresponse()
    r.read()
    assert r.status == 303 and r.getheader("location") == "/"
    cookie = r.getheader("set-cookie").split(";")[0]
    assert "HttpOnly" in r.getheader("set-cookie") and "SameSite=Strict" in r.getheader("set-cookie")
    conn.request("GET", "/api/health", headers={"Cookie": cookie})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["ok"]
    conn.close()
    assert live.json("GET", "/api/health")[0] == 200  # Bearer


def test_bank_problem_is_shown_and_the_loop_goes_on(live: Live) -> None:
    d = live.detections(need=1)
    live.json(
        "POST", "/api/identities", {"name": "Rex", "camera": "clip", "detection_id": d["detections"][0]["id"]}
    )
    live.bank.write_bytes(b"not a bank")
    deadline = time.monotonic() + 5
    while True:
        h = live.json("GET", "/api/health")[1]
        if h["bank"]["problem"]:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    assert not h["ok"] and str(live.bank) in h["bank"]["problem"]
    d = live.detections(need=1)
    assert any(
        x["identity"] == "Rex" for x in live.json("GET", "/api/cameras/clip/detections")[1]["detections"]
    )
    live.bank.unlink()
    time.sleep(1.5)
    assert "removed" in live.json("GET", "/api/health")[1]["bank"]["problem"]


def test_the_hub_hands_views_only_while_watched_and_at_http_fps() -> None:
    hub = WebHub(http_fps=10)
    hub.add_camera("c")
    frame = type("F", (), {"image_bgr": np.zeros((4, 4, 3), np.uint8), "index": 0, "t": 0.0})()
    assert not hub.wants("c")  # nobody watches: nothing copied
    hub.watch("c")
    t = time.monotonic()
    made = 0
    for k in range(75):  # 2.5 s of a 30 FPS source
        now = t + k / 30
        if hub.wants("c", now):
            made += 1
            hub.offer("c", frame, None, ["mug"], [], now=now)
    assert 24 <= made <= 26, made  # 10 a second, not 7.5 (every 4th frame) by a naive "period since last"
    assert hub.latest("c").frame == 0
    hub.cams["c"].watched_until = 0.0
    assert not hub.wants("c")  # the viewer left


def test_run_cli_http_options(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mocha_edge.cli import cli

    video = _video(tmp_path / "v.mp4", 3)
    r = CliRunner().invoke(cli, ["run", "m.onnx", "--source", str(video), "--http", "1:99999"])
    assert r.exit_code == 2 and "--http" in r.output
    r = CliRunner().invoke(
        cli, ["run", "m.onnx", "--source", str(video), "--http", "8080", "--http-token", "short"]
    )
    assert r.exit_code == 2 and "16 characters" in r.output


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    hub = WebHub()
    a = WebServer(hub, "127.0.0.1", 0)
    try:
        with pytest.raises(web.WebError, match="cannot listen"):
            WebServer(WebHub(), "127.0.0.1", a.port)
    finally:
        a.sock.close()


def test_page_and_enroll_cli_share_the_bank(student_ckpt: Path, tmp_path: Path) -> None:
    """The page enrols (through the running loop) while `mocha-edge enroll` writes the same bank file: both
    identities survive, and the running loop takes up the other process's identity (the page lists it)."""
    import os
    import subprocess

    from mocha_edge.data.synth_video import synthesize_video
    from mocha_edge.deploy.cameras import Stopper
    from mocha_edge.deploy.pipeline import Pipeline
    from mocha_edge.deploy.sources import open_source
    from mocha_edge.export.onnx import export_onnx
    from mocha_edge.infer import Student

    gt_path = synthesize_video(tmp_path / "d", seed=2, frames=30, model_imgsz=128)
    gt = json.loads(gt_path.read_text())
    cli_name, support = sorted(gt["supports"].items())[0]
    onnx = export_onnx(Student.load(student_ckpt), tmp_path / "student.onnx")
    pipe = Pipeline(onnx, threshold=-1.0, name_conf=0.0, conf=0.05)
    bank, console = tmp_path / "shared.bank", Quiet()
    stopper = Stopper()
    src = open_source(f"{gt_path.with_suffix('.mp4')}?loop=1&realtime=1", sleep=stopper.sleep)
    hub = WebHub(http_fps=10)
    server = WebServer(hub, "127.0.0.1", 0)
    server.start()
    cmds = StopCommands()
    out: dict[str, Any] = {}
    enroller = LiveEnroller(pipe, None, bank, console.log, background=True)
    th = threading.Thread(target=lambda: out.setdefault("summary", run_loop(
        src, pipe, RunOptions(handle_signals=False, fps_every=0), enroller, commands=cmds, console=console, web=hub
    )), daemon=True)  # fmt: skip
    th.start()
    live = Live(server.url, hub, bank, console, pipe, "127.0.0.1", server.port)  # type: ignore[arg-type]
    try:
        while not hub.cams:
            time.sleep(0.01)
        cam = next(iter(hub.cams))
        d = live.detections(cam, need=1, timeout=30)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        proc = subprocess.Popen(
            [sys.executable, "-m", "mocha_edge", "enroll", str(student_ckpt), "--bank", str(bank), "--name", cli_name,
             "--boxes-json", str(gt_path.parent / support)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        made, cls = 0, None
        while (
            proc.poll() is None
        ):  # the page keeps enrolling (shots of one class) while the other process works
            d = live.json("GET", f"/api/cameras/{cam}/detections")[1]
            pick = [x for x in d["detections"] if cls in (None, x["cls"])]
            if pick:
                body = {"name": "from-page", "camera": cam, "detection_id": pick[0]["id"]}
                status, r = live.json("POST", "/api/identities", body)
                assert status == 201, r
                made, cls = made + 1, pick[0]["cls"]
            time.sleep(0.2)
        assert proc.wait() == 0, proc.stdout.read() if proc.stdout else ""
        assert made >= 1
        while True:  # and once more after it wrote
            pick = [
                x
                for x in live.json("GET", f"/api/cameras/{cam}/detections")[1]["detections"]
                if x["cls"] == cls
            ]
            if pick:
                body = {"name": "from-page", "camera": cam, "detection_id": pick[0]["id"]}
                assert live.json("POST", "/api/identities", body)[0] == 201
                break
        assert set(PrototypeBank.load(bank).identities) == {cli_name, "from-page"}
        deadline = time.monotonic() + 5
        while {i["name"] for i in live.json("GET", "/api/identities")[1]["identities"]} != {
            cli_name,
            "from-page",
        }:
            assert time.monotonic() < deadline, live.json("GET", "/api/identities")
            time.sleep(0.1)
    finally:
        cmds.stop.set()
        th.join(20)
        server.stop()
    assert not out["summary"].faults, out["summary"].faults


def test_two_cameras_and_views_only_for_the_watched_one(tmp_path: Path) -> None:
    """Several cameras: each is listed and served by its label; a camera nobody asks for gets no views
    (nothing copied or encoded for it), the watched one about --http-fps of them."""
    from mocha_edge.deploy.cameras import Stopper

    stopper = Stopper()
    from mocha_edge.deploy.sources import open_source

    srcs = {
        name: open_source(f"{_video(tmp_path / f'{name}.mp4')}?loop=1&realtime=1", sleep=stopper.sleep)
        for name in ("front", "garden")
    }
    pipe, console = FakePipe(), Quiet()
    hub = WebHub(http_fps=10)
    server = WebServer(hub, "127.0.0.1", 0)
    server.start()
    cmds = StopCommands()
    enroller = LiveEnroller(pipe, None, tmp_path / "b.bank", console.log, background=True)
    th = threading.Thread(target=lambda: run_loop(
        srcs, pipe, RunOptions(handle_signals=False, fps_every=0), enroller, commands=cmds, console=console, web=hub
    ), daemon=True)  # fmt: skip
    th.start()
    live = Live(server.url, hub, tmp_path / "b.bank", console, pipe, "127.0.0.1", server.port)
    try:
        while len(hub.cams) < 2:
            time.sleep(0.01)
        live.detections("front", need=1)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:  # a page watching `front` for 2 s
            live.json("GET", f"/api/cameras/front/detections?after={live.hub.latest('front').frame}")
        made = hub.cams["front"].seq
        assert 15 <= made <= 30, made  # ~10 a second (plus the first)
        assert hub.cams["garden"].seq == 0 and not hub.cams["garden"].views
        cams = {c["name"]: c for c in live.json("GET", "/api/cameras")[1]["cameras"]}
        assert set(cams) == {"front", "garden"} and cams["garden"]["fps"] > 5  # the loop runs it all the same
        assert live.json("GET", "/api/cameras/garden/detections")[0] == 200
    finally:
        cmds.stop.set()
        th.join(20)
        server.stop()
