"""Soak test of `mocha-edge run` (issue 14): a benchmark script, not a unit test.

    python scripts/soak.py --demo DIR [--minutes 10] [--json soak.json]

DIR is a finished `mocha-edge demo --out DIR` (or `--quick`): its exported ONNX student, its bank and its
generated video. The run is the real command line in a child process, fed and disturbed by real components:

* **source**: a real HTTP server (this script) streams the demo's video as MJPEG (``multipart/x-mixed-replace``),
  looped and paced at the video's rate (``--fps``), and **drops the connection every ``--drop-every`` s**:
  the run must reconnect by itself;
* **failing sink**: the JSONL log (``?rotate=4MB``) lives on a small tmpfs that a filler file fills to the
  last byte for ``--full-for`` s every ``--full-every`` s — real ENOSPC, then space returns (root only: without
  a tmpfs mount the report says ``"disk_full": "off"``);
* **recording**: ``rec/soak.mkv?segment=1m`` beside it (on the normal disk);
* **live enrolments**: an ``enroll soak-N`` line on the run's stdin every ``--enroll-every`` s.

Measured: the child's exit status (it is stopped with SIGTERM at the end: 0 expected), its resident memory
(VmRSS from /proc every second; growth = peak after warm-up − RSS at the end of warm-up), detections the run
reports vs JSON lines found in the log files (no line may be lost), reconnects, faults, segments.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]


def load_frames(video: Path, limit: int = 600) -> tuple[list[bytes], float]:
    """The video's frames as JPEG bytes (at most ``limit``) and its frame rate."""
    cap = cv2.VideoCapture(str(video))
    fps = cap.get(cv2.CAP_PROP_FPS) or 10.0
    out = []
    while len(out) < limit:
        ok, img = cap.read()
        if not ok:
            break
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    cap.release()
    if not out:
        raise SystemExit(f"{video}: no frames")
    return out, float(fps)


class MjpegServer:
    """Serves ``frames`` as one endless paced MJPEG stream per connection, cut after ``drop_every`` s."""

    def __init__(self, frames: list[bytes], fps: float, drop_every: float) -> None:
        self.frames, self.fps, self.drop_every = frames, fps, drop_every
        self.connections = 0
        self.sent = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                t0 = time.monotonic()
                i = 0
                with contextlib.suppress(OSError):
                    while time.monotonic() - t0 < server.drop_every:
                        jpg = server.frames[(server.sent + i) % len(server.frames)]
                        self.wfile.write(
                            b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg)
                            + jpg
                            + b"\r\n"
                        )
                        i += 1
                        wait = t0 + i / server.fps - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                server.sent += i
                self.close_connection = True  # the drop

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/stream.mjpg"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


class DiskFiller:
    """A tmpfs of ``size_mb`` at ``path``; :meth:`fill` takes its last byte, :meth:`free` gives it back."""

    def __init__(self, path: Path, size_mb: int) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                           capture_output=True, text=True)  # fmt: skip
        self.mounted = r.returncode == 0
        self.why = "" if self.mounted else (r.stderr.strip() or f"mount exit {r.returncode}")
        self.filler = path / ".filler"
        self.phases = 0

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            n = 1 << 20
            while n:  # unbuffered writes, halving the size at each ENOSPC: down to the last byte
                try:
                    os.write(fd, b"\0" * n)
                except OSError:
                    n //= 2
        finally:
            os.close(fd)
        self.phases += 1

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def count_lines(folder: Path, stem: str) -> int:
    """JSON lines in ``stem`` and its rotated files; every line must parse."""
    n = 0
    for p in sorted(folder.glob(f"{stem}*")):
        if p.name.startswith(".") or not p.is_file():
            continue
        for line in p.read_text().splitlines():
            json.loads(line)
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", type=Path, required=True, help="a finished `mocha-edge demo --out DIR`")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before RSS growth is measured")
    ap.add_argument("--fps", type=float, default=10.0, help="pace of the stream")
    ap.add_argument("--drop-every", type=float, default=30.0)
    ap.add_argument("--enroll-every", type=float, default=60.0)
    ap.add_argument("--full-every", type=float, default=120.0)
    ap.add_argument("--full-for", type=float, default=10.0)
    ap.add_argument(
        "--record", default="soak.mkv?segment=1m", help="recording sink in work/rec ('' for none)"
    )
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    args = ap.parse_args(argv)

    model = args.demo / "export" / "student.onnx"
    bank_src = args.demo / "demo.bank"
    video = args.demo / "data" / "video" / "seq_000.mp4"
    for p in (model, bank_src, video):
        if not p.is_file():
            raise SystemExit(f"{p}: missing; run `mocha-edge demo --quick --out {args.demo}` first")
    work = args.work or Path(tempfile.mkdtemp(prefix="mocha-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    bank = work / "soak.bank"
    shutil.copy(bank_src, bank)
    frames, _ = load_frames(video)
    server = MjpegServer(frames, args.fps, args.drop_every)
    disk = DiskFiller(work / "logs", 16)
    (work / "rec").mkdir(exist_ok=True)
    cmd = [
        sys.executable, "-m", "mocha_edge", "run", str(model), "--prototypes", str(bank),
        "--source", server.url, "--no-show", "--fps-every", "30",
        "--sink", str(work / "logs" / "det.jsonl") + "?rotate=4MB&keep=1000",
    ]  # fmt: skip
    if args.record:
        cmd += ["--sink", str(work / "rec" / args.record)]
    print("soak:", " ".join(cmd), flush=True)
    print(f"soak: disk-full phases {'on' if disk.mounted else 'off (' + disk.why + ')'}", flush=True)
    log = open(work / "run.log", "w")  # noqa: SIM115 (kept open for the child's lifetime)
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    rss: list[tuple[float, int]] = []
    enrolled = 0
    next_enroll, next_full = t0 + args.enroll_every, t0 + args.full_every
    full_until = None
    while time.monotonic() < end and child.poll() is None:
        now = time.monotonic()
        kb = rss_kb(child.pid)
        if kb is not None:
            rss.append((now - t0, kb))
        if now >= next_enroll:
            enrolled += 1
            child.stdin.write(f"enroll soak-{enrolled}\n")
            child.stdin.flush()
            next_enroll += args.enroll_every
        if disk.mounted and full_until is None and now >= next_full:
            disk.fill()
            full_until = now + args.full_for
        if full_until is not None and now >= full_until:
            disk.free()
            full_until = None
            next_full = now + args.full_every
        time.sleep(1.0)
    early_exit = child.poll()
    if early_exit is None:
        disk.free()
        time.sleep(max(0.0, args.full_for))  # a paused sink retries and drains its buffer
        child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            code = "hung (killed)"
    else:
        code = early_exit
    log.close()
    server.close()
    output = (work / "run.log").read_text()
    summary = [ln for ln in output.splitlines() if re.search(r"\d+ frames", ln)]
    m = re.search(r"(\d+) frames.*?(\d+) detections", summary[-1]) if summary else None
    detections = int(m.group(2)) if m else None
    lines = count_lines(work / "logs", "det.jsonl")
    disk.unmount()
    warm = [kb for t, kb in rss if t <= args.warmup]
    after = [kb for t, kb in rss if t > args.warmup]
    base = warm[-1] if warm else None
    report = {
        "minutes": round((time.monotonic() - t0) / 60, 2),
        "exit": code,
        "exited_early": early_exit is not None,
        "rss_mb_end_of_warmup": round(base / 1024, 1) if base else None,
        "rss_mb_peak_after": round(max(after) / 1024, 1) if after else None,
        "rss_growth_mb": round((max(after) - base) / 1024, 1) if after and base else None,
        "detections_reported": detections,
        "jsonl_lines": lines,
        "lost_lines": (detections - lines) if detections is not None else None,
        "stream_connections": server.connections,
        "enrol_commands": enrolled,
        "enrolled_lines": len(re.findall(r"enrolled 'soak-", output)),
        "disk_full": disk.phases if disk.mounted else "off",
        "segments": sorted(p.name for p in (work / "rec").iterdir()),
        "summary": summary[-1] if summary else None,
        "work": str(work),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = code == 0 and report["lost_lines"] == 0 and (report["rss_growth_mb"] or 0) <= 20
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
