"""The web page of ``mocha-edge run --http`` in a real browser: Debian's chromium driven by Playwright's sync API
against a real ``mocha-edge run`` process (the test student exported to ONNX, a generated video looping in
real time, an empty bank). The live view updates; a clicked box is enrolled and every frame after the one
the answer names shows the name on that track; "not NAME" takes the name off that track from the frame its
answer names; the identity is removed through the list. The checks go by frame numbers, not wall time (the
tap-to-name time is measured by ``scripts/web_load.py``, README "Web page and REST API"; the times are
printed here). A screenshot of each step is saved in the test's tmp_path (``pytest -s`` shows the paths).

Never ``playwright install`` (it downloads a browser): the system's chromium is used. Skipped when chromium or
playwright is missing, except in CI (``CI`` set), where that fails."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium")
HAVE_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None
NAME = "my mug"  # a space: names are percent-encoded in paths
WAIT = 10.0  # s at most for a view after the answer's frame that shows the clicked track (not a speed limit)
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def api(url: str, method: str, body: Any = None) -> tuple[int, Any]:
    """``(status, JSON answer)`` of a call to the run's REST API (as a script would make it, not the page)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def steady_track(run: Run, seconds: float = 1.0) -> int:
    """The track in the most of the run's views over the last ``seconds`` (the detections API), seen now."""
    seen: Counter[int] = Counter()
    frame, end = -1, time.monotonic() + seconds
    while True:
        d = get_json(run.url + f"api/cameras/{run.camera}/detections?after={frame}", timeout=10)
        frame, now = d["frame"], [x["track_id"] for x in d["detections"] if x["track_id"] is not None]
        seen.update(now)
        if now and time.monotonic() >= end:
            return max(now, key=lambda t: seen[t])
        assert time.monotonic() < end + WAIT, f"no tracked detection in {seconds + WAIT} s"


def need_browser() -> None:
    """Skip without chromium or playwright, unless in CI: there a missing browser is a failure."""
    missing = [what for what, ok in (("chromium", CHROMIUM), ("playwright", HAVE_PLAYWRIGHT)) if not ok]
    if missing:
        why = f"{' and '.join(missing)} not installed (apt-get install chromium; pip install playwright)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@dataclass
class Run:
    """A running ``mocha-edge run --http``: its process, page URL, first camera and log file."""

    proc: subprocess.Popen
    url: str
    camera: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def web_run(student_ckpt: Path, tmp_path: Path) -> Iterator[Run]:
    """``mocha-edge run STUDENT.onnx --http 127.0.0.1:PORT`` on a generated video (looping, paced at its
    15 FPS), with a bank that does not exist yet; killed at the end whatever happens. The weak test student
    needs a low ``--conf``; ``--threshold -1 --name-conf 0``: any detection of an enrolled class is named at
    once (the page and the server are under test, not the student)."""
    need_browser()
    from mocha_edge.data.synth_video import synthesize_video
    from mocha_edge.export.onnx import export_onnx
    from mocha_edge.infer import Student

    # 30 s: at the loop's restart every track ends (a track corrected just before it is never seen again)
    gt = synthesize_video(tmp_path / "d", seed=2, frames=450, model_imgsz=128)
    onnx = export_onnx(Student.load(student_ckpt), tmp_path / "student.onnx")
    port, log = free_port(), tmp_path / "run.log"
    cmd = [sys.executable, "-m", "mocha_edge", "run", str(onnx), "--prototypes", str(tmp_path / "web.bank"),
           "--source", f"{gt.with_suffix('.mp4')}?loop=1&realtime=1", "--http", f"127.0.0.1:{port}",
           "--conf", "0.05", "--threshold", "-1", "--name-conf", "0", "--no-show", "--fps-every", "0"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=env)  # fmt: skip
    run = Run(proc, f"http://127.0.0.1:{port}/", "", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"mocha-edge run exited ({proc.returncode}):\n{run.output()}"
            try:
                get_json(run.url + "api/health")
                cams = get_json(run.url + "api/cameras")["cameras"]
                if cams:
                    break
            except (OSError, ValueError):
                pass
            assert time.monotonic() < deadline, f"no /api/health after 60 s:\n{run.output()}"
            time.sleep(0.1)
        run.camera = cams[0]["name"]
        yield run
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def shot(page: Any, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


# the track ids of the boxes whose centre a click reaches (not under another box)
CLICKABLE_TRACKS = """els => els.filter(e => {
    const r = e.getBoundingClientRect();
    const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
    return hit && hit.closest("[data-testid=box]") === e;
}).map(e => Number(e.dataset.trackId))"""


FRAME_AND_SRC = "e => [e.dataset.frame, e.src]"
# a view's image and box rectangles (CSS px)
RECTS = """v => {
    const r = (e) => { const b = e.getBoundingClientRect(); return {x: b.x, y: b.y, width: b.width, height: b.height}; };
    return [r(v.querySelector("[data-testid=frame]")), [...v.querySelectorAll("[data-testid=box]")].map(r)];
}"""
# a view's shown frame, the identities on the boxes of track t and how many boxes show name n (one instant:
# the page puts a frame and its boxes up in one task)
SHOWN = """(v, [t, n]) => ({
    frame: Number(v.querySelector("[data-testid=frame]").dataset.frame ?? -1),
    track: [...v.querySelectorAll(`[data-testid=box][data-track-id="${t}"]`)].map(e => e.dataset.identity ?? ""),
    named: [...v.querySelectorAll("[data-testid=box]")].filter(e => e.dataset.identity === n).length,
})"""


def views_after(view: Any, frame: int, tid: int, name: str, seconds: float) -> list[dict[str, Any]]:
    """The distinct views the page shows after ``frame`` (the answer's) over ``seconds``: each as :data:`SHOWN`."""
    seen: dict[int, dict[str, Any]] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = view.evaluate(SHOWN, [tid, name])
        if now["frame"] > frame:
            seen.setdefault(now["frame"], now)
        time.sleep(0.02)
    return [seen[f] for f in sorted(seen)]


def click_track(view: Any, boxes: Any, steady: float = 0.0, tries: int = 3, wait: float = 3.0,
                among: Any = None, min_share: float = 0.0) -> int:  # fmt: skip
    """Click one of ``boxes`` (a locator of tracked boxes) that a click reaches, within ``wait`` seconds: the
    track in the most looks at ``among`` (default ``boxes``) over the last ``steady`` seconds, and in at least
    ``min_share`` of them; another one if the track ends before the click. Returns its track id."""
    among = boxes if among is None else among
    for attempt in range(tries):
        looks: deque[tuple[float, set[int]]] = deque()
        start = time.monotonic()
        while True:
            now_t = time.monotonic()
            looks.append((now_t, set(among.evaluate_all("els => els.map(e => Number(e.dataset.trackId))"))))
            while looks[0][0] < now_t - steady:
                looks.popleft()
            seen = Counter(t for _, ts in looks for t in ts)
            now = [t for t in boxes.evaluate_all(CLICKABLE_TRACKS) if seen[t] >= min_share * len(looks)]
            if now and now_t - start >= steady:
                break
            assert now_t - start < steady + wait, f"no box to click among {boxes} (tracks seen: {dict(seen)})"
            time.sleep(0.05)
        tid = max(now, key=lambda t: seen[t])
        try:
            view.locator(f'[data-testid=box][data-track-id="{tid}"]').click(timeout=1_000)
            return tid
        except Exception:  # the track ended or went under another box before the click
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def is_detections(url: str) -> bool:
    return "/detections" in url


def without_names(route: Any) -> None:
    """A Playwright route handler: the server's answer for a view's detections, with no names in it."""
    res = route.fetch()
    body = res.json()
    for det in body.get("detections", []):
        det["identity"] = det["similarity"] = None
    route.fulfill(response=res, json=body)


@pytest.fixture
def page(web_run: Run) -> Iterator[Any]:
    """A chromium page (phone-sized) of Debian's chromium, headless; closed at the end."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport=PHONE)
        finally:
            browser.close()


def inside(bb: dict[str, float], ib: dict[str, float], slack: float = 1.0) -> bool:
    """Bounding box ``bb`` lies within ``ib`` (Playwright's ``bounding_box`` dicts), give or take ``slack`` px."""
    return (ib["x"] - slack <= bb["x"] and bb["x"] + bb["width"] <= ib["x"] + ib["width"] + slack
            and ib["y"] - slack <= bb["y"] and bb["y"] + bb["height"] <= ib["y"] + ib["height"] + slack)  # fmt: skip


def test_enrol_correct_and_remove_in_a_real_browser(page: Any, web_run: Run, tmp_path: Path) -> None:
    """Open the page, watch the live view, enrol a box, "not NAME" it, remove the identity: each step
    asserted; the two naming steps by the frame their answer names."""
    from playwright.sync_api import expect

    cam, errors = web_run.camera, []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(web_run.url)

    # 1. the live view: the frame changes (at least twice in 3 s), boxes inside the (phone-wide) image
    view = page.get_by_test_id(f"view-{cam}")
    img = view.get_by_test_id("frame")
    view.locator("[data-testid=frame][data-frame]").wait_for(timeout=15_000)
    shown, end = [tuple(img.evaluate(FRAME_AND_SRC))], time.monotonic() + 3
    while len(set(shown)) < 3 and time.monotonic() < end:
        time.sleep(0.05)
        shown.append(tuple(img.evaluate(FRAME_AND_SRC)))
    frames, srcs = {f for f, _ in shown}, {s for _, s in shown}
    assert len(frames) >= 3 and len(srcs) >= 3, (
        f"the live view changed {len(frames) - 1} times in 3 s: {shown}"
    )
    view.get_by_test_id("box").first.wait_for(timeout=5_000)
    ib, boxes = view.evaluate(RECTS)  # at one instant
    assert ib["width"] <= PHONE["width"], ib
    for bb in boxes:
        assert inside(bb, ib), f"box {bb} outside the image {ib}"
    shot(page, tmp_path, "1-live-phone")
    page.set_viewport_size(DESKTOP)

    # 2. click a box (a track that has been there a while): the panel shows its class and track
    tid = click_track(view, view.locator("[data-testid=box][data-track-id]"), steady=1.0)
    panel = page.get_by_test_id("panel")
    assert panel.is_visible() and panel.get_attribute("data-track-id") == str(tid)
    assert f"#{tid}" in page.get_by_test_id("panel-title").inner_text()
    shot(page, tmp_path, "2-clicked")

    # 3. type a name, Enrol: every view after the frame the answer names shows the name on the clicked track
    page.get_by_test_id("name-input").fill(NAME)
    named = view.locator(f'[data-testid=box][data-identity="{NAME}"]')
    status = page.get_by_test_id("status")
    t0 = time.monotonic()
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith("/api/identities")
    ) as res:
        page.get_by_test_id("enrol").click()
    answered = time.monotonic() - t0
    assert res.value.status == 201, res.value.text()
    after = res.value.json()["frame"]
    assert isinstance(after, int) and after >= 0, res.value.json()
    named.first.wait_for(timeout=WAIT * 1000)
    print(
        f"enrol: answered after {answered:.3f} s (frame {after}), name on a box after {time.monotonic() - t0:.3f} s"
    )
    later = views_after(view, after, tid, NAME, 2.0)
    assert later, f"no view after frame {after} in 2 s"
    wrong = [v for v in later if any(i != NAME for i in v["track"])]
    assert not wrong, f"track #{tid} shown without {NAME} after frame {after} (the enrolment's): {wrong}"
    assert any(v["named"] for v in later), f"no box named {NAME} after frame {after}: {later}"
    expect(status).to_have_attribute("data-kind", "ok")
    page.get_by_test_id(f"identity-{NAME}").wait_for(timeout=5_000)
    # the live events (SSE) and the camera's stats are on the page too
    identified = page.locator("[data-testid=event][data-event=identified]", has_text=NAME)
    expect(identified.first).to_be_visible(timeout=3_000)
    expect(page.get_by_test_id(f"stats-{cam}").get_by_test_id("fps")).to_contain_text("FPS")
    shot(page, tmp_path, "3-named")

    # 4. "not NAME" on a named box: no view after the frame the answer names shows NAME on that track (a track
    #    of the weak student that is not seen again is no proof: then again on a box the name is on). The weak
    #    student's names come and go (duplicate and false boxes at --conf 0.05; the name of a track the tracker
    #    lost goes to a box where it was): wait up to WAIT s for a named box a click reaches, the one whose
    #    track was on the page in the most looks over the last second (a steady track is nearly always seen
    #    again; a short one often not), and try up to 6 tracks. Each correction makes the weak student name
    #    less (its vectors are close together): after a correction that proved nothing, NAME is enrolled
    #    afresh (through the API) on the track seen most over the last second, which then holds it
    not_name, corrections, tries = page.get_by_test_id("not-name"), 0, 0
    tracked = view.locator("[data-testid=box][data-track-id]")
    while tries < 6:
        tries += 1
        corrections += 1
        if tries > 1:
            assert api(web_run.url + f"api/identities/{NAME.replace(' ', '%20')}", "DELETE")[0] == 200
            for _ in range(5):
                code, body = api(web_run.url + "api/identities", "POST",
                                 {"name": NAME, "camera": cam, "track_id": steady_track(web_run)})  # fmt: skip
                if code == 201:
                    break
            assert code == 201, body
            corrections = 1
        for _ in range(5):  # the name can go off the box between the look and the click: then another one
            named.first.wait_for(timeout=WAIT * 1000)
            tid = click_track(view, named, steady=1.0, wait=WAIT, among=tracked)
            if not_name.is_visible():
                break
        expect(not_name).to_be_visible()
        expect(not_name).to_have_text(f"not {NAME}", timeout=2_000)
        if tries == 1:
            shot(page, tmp_path, "4-named-selected")
            # the name goes off the selected track for a while (the server's views, names removed): the
            # button stays, for the name the track showed
            frame = view.evaluate(SHOWN, [tid, NAME])["frame"]
            page.route(is_detections, without_names)
            try:
                end = time.monotonic() + WAIT
                while view.evaluate(SHOWN, [tid, NAME])["frame"] <= frame + 1 and time.monotonic() < end:
                    time.sleep(0.05)
                assert view.evaluate(SHOWN, [tid, NAME])["frame"] > frame + 1, "no new view in 10 s"
                expect(named).to_have_count(0)
                expect(not_name).to_be_visible()
                expect(not_name).to_have_text(f"not {NAME}")
            finally:  # (waiting for a handler in flight: a request left to it would never be answered)
                page.unroute_all(behavior="wait")
            frame = view.evaluate(SHOWN, [tid, NAME])["frame"]
            end = time.monotonic() + WAIT
            while view.evaluate(SHOWN, [tid, NAME])["frame"] <= frame and time.monotonic() < end:
                time.sleep(0.05)  # the live view goes on
        t0 = time.monotonic()
        with page.expect_response(
            lambda r: r.request.method == "POST" and r.url.endswith("/negatives")
        ) as res:
            not_name.click()
        answered = time.monotonic() - t0
        assert res.value.status == 200, res.value.text()
        after = res.value.json()["frame"]
        later = views_after(view, after, tid, NAME, 4.0)
        wrong = [v for v in later if NAME in v["track"]]
        assert not wrong, f"track #{tid} still shows {NAME} after frame {after} (the correction's): {wrong}"
        expect(status).to_have_attribute("data-kind", "ok")
        seen = [v["frame"] for v in later if v["track"]]
        if not seen:
            print(f"not {NAME}: track #{tid} not seen after frame {after}; once more, {NAME} enrolled afresh")
            continue
        print(f"not {NAME}: answered after {answered:.3f} s (frame {after}); track #{tid} shown "
              f"unnamed in frames {seen[0]}..{seen[-1]} ({len(seen)} views)")  # fmt: skip
        break
    else:
        raise AssertionError("no corrected track was seen again after its correction (6 tracks)")
    row = page.get_by_test_id(f"identity-{NAME}")
    expect(row).to_have_attribute("data-negatives", str(corrections), timeout=6_000)
    shot(page, tmp_path, "5-not-name")

    # 5. remove it through the list, confirmed in the page: gone from the list and the server
    page.get_by_test_id(f"remove-{NAME}").click()
    page.get_by_test_id("confirm-remove").click()
    row.wait_for(state="detached", timeout=3_000)
    assert status.get_attribute("data-kind") == "ok", status.inner_text()
    assert NAME not in [i["name"] for i in get_json(web_run.url + "api/identities")["identities"]]
    expect(named).to_have_count(0, timeout=2_000)  # and off the live view
    shot(page, tmp_path, "6-removed")
    assert not errors, errors
    assert web_run.proc.poll() is None, web_run.output()
