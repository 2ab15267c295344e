"""What the web page costs the live loop, and how fast it answers (README, "Web page and REST API").

The real pipeline (an exported student) runs `run_loop` on a video paced at ``--fps`` (``?loop=1&realtime=1``)
with the web server on; a real browser (Debian's chromium through Playwright) opens the page for the middle
of three equal windows: no viewer, one page open, no viewer again. Per window: the frames the loop handled
against the frames the source delivered (the shortfall is what a camera would drop), the loop's p50 frame
time (a frame's capture to its outputs written) and, with the page open, the frames a second the page showed.
Then, in the page: a click on a box, a name typed, Enrol -> the time until the name is on a box; "not NAME" on
that box -> the time until its track no longer shows the name.

    python scripts/web_load.py --model /tmp/d4242/export/student.onnx --video /tmp/d4242/data/video/seq_000.mp4 \
        --json web_load.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

COUNT_JS = """() => {
  if (window.__frames === undefined) {
    window.__frames = 0;
    const img = document.querySelector('[data-testid=frame]');
    new MutationObserver(() => { window.__frames += 1; }).observe(img, {attributes: true, attributeFilter: ['src']});
  }
  return window.__frames;
}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--video", required=True, type=Path)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--http-fps", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=20.0, help="each of the three windows")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--trials", type=int, default=5, help="enrolments (and corrections) timed in the page")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="--viewer http: windows with the viewer, each between two without",
    )
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--screenshot", type=Path)
    ap.add_argument("--viewer", choices=["chromium", "http"], default="chromium",
                    help="chromium: the page in a real browser on this machine (its rendering competes for these "
                         "CPUs); http: a client making the page's requests (what the device pays when the page "
                         "is on a phone)")  # fmt: skip
    a = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from mocha_edge.deploy.cameras import Stopper
    from mocha_edge.deploy.console import Console
    from mocha_edge.deploy.live import LiveEnroller, RunOptions, run_loop
    from mocha_edge.deploy.pipeline import Pipeline
    from mocha_edge.deploy.sources import open_source
    from mocha_edge.deploy.web import WebHub, WebServer

    class Recording(WebHub):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.done: list[tuple[float, float]] = []

        def frame_done(self, camera: str, latency_ms: float, timings: dict[str, float], frame: Any) -> None:
            self.done.append((time.monotonic(), latency_ms))
            super().frame_done(camera, latency_ms, timings, frame)

    class Quit:
        def __init__(self) -> None:
            self.stop = threading.Event()

        def poll(self) -> list[str]:
            return ["quit"] if self.stop.is_set() else []

    class Log(Console):
        def status(self, msg: str) -> None:
            pass

    work = Path(tempfile.mkdtemp(prefix="web-load-"))
    pipe = Pipeline(a.model, conf=a.conf)
    console = Log()
    stopper = Stopper()
    src = open_source(f"{a.video}?loop=1&realtime=1&fps={a.fps:g}", sleep=stopper.sleep)
    hub = Recording(http_fps=a.http_fps)
    server = WebServer(hub, "127.0.0.1", 0)
    server.start()
    quit_ = Quit()
    enroller = LiveEnroller(pipe, None, work / "load.bank", console.log, background=True)
    out: dict[str, Any] = {}

    def loop() -> None:
        out["summary"] = run_loop(src, pipe, RunOptions(handle_signals=False, fps_every=0), enroller,
                                  commands=quit_, console=console, web=hub)  # fmt: skip

    th = threading.Thread(target=loop, daemon=True)
    th.start()

    def window(seconds: float, page: Any = None) -> dict[str, Any]:
        f0 = page.evaluate(COUNT_JS) if page is not None else 0
        t0 = time.monotonic()
        time.sleep(seconds)
        t1 = time.monotonic()
        f1 = page.evaluate(COUNT_JS) if page is not None else 0
        lat = [ms for t, ms in hub.done if t0 <= t < t1]
        row = {"seconds": round(t1 - t0, 2), "frames": len(lat), "source_frames": round((t1 - t0) * a.fps),
               "_lat": lat,
               "loop_fps": round(len(lat) / (t1 - t0), 2),
               "shortfall_pct": round(max(0.0, 100 * (1 - len(lat) / ((t1 - t0) * a.fps))), 2),
               "p50_ms": round(statistics.median(lat), 2) if lat else None}  # fmt: skip
        if page is not None:
            row["page_fps"] = round((f1 - f0) / (t1 - t0), 2)
        return row

    result: dict[str, Any] = {
        "model": str(a.model),
        "video": str(a.video),
        "fps": a.fps,
        "http_fps": a.http_fps,
    }
    try:
        time.sleep(a.warmup)
        result["no_viewer_before"] = window(a.seconds)
        if a.viewer == "http":  # off, on, off, on, off, on, off: the machine's drift hits both alike
            cam = next(iter(hub.cams))
            ons, offs = [], [result.pop("no_viewer_before")]
            for _ in range(a.rounds):
                ons.append(http_viewer(server.port, cam, window, a.seconds))
                time.sleep(4.0)  # views stop once nobody asks
                offs.append(window(a.seconds))
            result["no_viewer_before"], result["one_page_open"], result["no_viewer_after"] = (
                pooled(offs[:1]), pooled(ons), pooled(offs[1:]))  # fmt: skip
            result["windows"] = {"off": offs, "on": ons}
            return finish(result, a, pooled(offs))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                        args=["--no-sandbox"])  # fmt: skip
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.goto(server.url)
            page.wait_for_function("document.querySelector('[data-testid=frame]') !== null")
            page.evaluate(COUNT_JS)
            time.sleep(2.0)
            result["one_page_open"] = window(a.seconds, page)
            trials = [click_and_correct(page, f"load-test-{k}") for k in range(a.trials)]
            result["click_to_name_s"] = [t for t, _ in trials]
            result["not_name_s"] = [t for _, t in trials]
            if a.screenshot is not None:
                page.screenshot(path=str(a.screenshot))
            browser.close()
        time.sleep(4.0)  # the page's views stop (nobody watches)
        result["no_viewer_after"] = window(a.seconds)
    finally:
        quit_.stop.set()
        th.join(30)
        server.stop()
    finish(result, a)


def pooled(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Windows of one condition as one: frames, shortfall and p50 over all of their frames."""
    lat = [x for r in rows for x in r["_lat"]]
    secs = sum(r["seconds"] for r in rows)
    src = sum(r["source_frames"] for r in rows)
    out = {"seconds": round(secs, 2), "frames": len(lat), "source_frames": src, "loop_fps": round(len(lat) / secs, 2),
           "shortfall_pct": round(max(0.0, 100 * (1 - len(lat) / src)), 2), "p50_ms": round(statistics.median(lat), 2)}  # fmt: skip
    if all("page_fps" in r for r in rows):
        out["page_fps"] = round(sum(r["page_fps"] * r["seconds"] for r in rows) / secs, 2)
    return out


def finish(result: dict[str, Any], a: argparse.Namespace, off: dict[str, Any] | None = None) -> None:
    """Ratios of the page-open window to the two without a viewer; print and write the result."""
    result["viewer"] = a.viewer
    base = [result["no_viewer_before"], result["no_viewer_after"]]
    p50 = off["p50_ms"] if off is not None else statistics.mean(r["p50_ms"] for r in base)
    open_ = result["one_page_open"]
    result["p50_growth_pct"] = round(100 * (open_["p50_ms"] / p50 - 1), 1)
    result["page_fps_of_http_fps_pct"] = round(100 * open_["page_fps"] / a.http_fps, 1)
    for rows in ([result[k] for k in ("no_viewer_before", "one_page_open", "no_viewer_after")],
                 *result.get("windows", {}).values()):  # fmt: skip
        for r in rows:
            r.pop("_lat", None)
    text = json.dumps(result, indent=2)
    print(text)
    if a.json is not None:
        a.json.write_text(text + "\n")


VIEWER = """
import http.client, json, sys, time
port, cam, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
frame, n = -1, 0
while True:
    conn.request("GET", f"/api/cameras/{cam}/detections" + (f"?after={frame}" if frame >= 0 else ""))
    d = json.loads(conn.getresponse().read())
    if d["frame"] == frame or d["frame"] < 0:
        continue
    frame = d["frame"]
    conn.request("GET", f"/api/cameras/{cam}/frame.jpg?boxes=0&frame={frame}")
    conn.getresponse().read()
    n += 1
    with open(out, "a") as f:
        f.write(f"{time.monotonic()}\\n")
"""


def http_viewer(port: int, cam: str, window: Any, seconds: float) -> dict[str, Any]:
    """The page's requests (long-poll detections, then that frame's JPEG) from another process, as from a
    phone, for one window; the frames a second it got."""
    import subprocess
    import sys

    log = Path(tempfile.mkstemp(prefix="viewer-")[1])
    proc = subprocess.Popen([sys.executable, "-c", VIEWER, str(port), cam, str(log)])
    try:
        time.sleep(2.0)
        t0 = time.monotonic()
        row = window(seconds)
        t1 = time.monotonic()
    finally:
        proc.kill()
        proc.wait()
    stamps = [float(x) for x in log.read_text().split()]
    row["page_fps"] = round(sum(t0 <= t < t1 for t in stamps) / (t1 - t0), 2)
    return row


def click_and_correct(page: Any, name: str = "load-test") -> tuple[float | None, float | None]:
    """Enrol a steady box from the page and time the name's appearance; then "not NAME" on it."""
    # a person taps an object they have watched: a track on screen for the last second (the oldest of them)
    steady: set[int] | None = None
    while not steady:
        steady = None
        for _ in range(6):
            page.locator("[data-testid=box][data-track-id]").first.wait_for(timeout=10_000)
            js = "els => els.map(e => +e.dataset.trackId)"
            ids = set(page.eval_on_selector_all("[data-testid=box][data-track-id]", js))
            steady = ids if steady is None else steady & ids
            time.sleep(0.2)
    box = page.locator(f"[data-testid=box][data-track-id='{min(steady)}']").first
    try:
        box.click(timeout=2000)
    except Exception:  # the object left before the tap: tap another one
        return click_and_correct(page, name)
    page.get_by_test_id("name-input").fill(name)
    t0 = time.monotonic()
    page.get_by_test_id("enrol").click()
    named = page.locator(f"[data-testid=box][data-identity='{name}']").first
    try:
        named.wait_for(timeout=10_000)
    except Exception:
        return None, None
    t_name = time.monotonic() - t0
    track = named.get_attribute("data-track-id")
    try:
        named.click(timeout=2000)
    except Exception:
        return round(t_name, 3), None
    t0 = time.monotonic()
    page.get_by_test_id("not-name").click()
    sel = f"[data-testid=box][data-track-id='{track}'][data-identity='{name}']"
    page.wait_for_function(f'document.querySelector("{sel}") === null', timeout=10_000)
    return round(t_name, 3), round(time.monotonic() - t0, 3)


if __name__ == "__main__":
    main()
