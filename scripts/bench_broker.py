"""Loop FPS with and without an MQTT broker that stops answering, in the same run (issue 15's target: the
dead broker costs <= 5 % of the FPS).

The real live loop (``run_loop``: ByteTrack, track identities, events) runs on synthetic frames with a fake
pipeline of a fixed per-frame cost (``--work-ms``, spent as Python busy work that holds the GIL: the worst
case for the sink's threads; a real engine releases it) whose objects jump every ``--every`` frames, so new
tracks, ``identified`` and ``leave`` events keep coming. Conditions alternate round by round:

* ``none``: no output but a JSON-lines events file (the baseline);
* ``stopped``: the same plus ``mqtt://127.0.0.1:PORT/bench?snapshot=1&queue=100`` to a mosquitto that is
  SIGSTOPped ``--stop-after`` seconds into the run, once the sink is connected and delivering (the TCP peer
  is there and answers nothing: paho's in-flight window and the queue fill, the oldest events are dropped).

    python scripts/bench_broker.py --frames 600 --rounds 3 [--work-ms 15] [--every 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Source:
    """``n`` synthetic 320x240 frames at 30 FPS of stream time (``run_loop``'s source interface)."""

    live = False

    def __init__(self, n: int) -> None:
        self.n, self.name, self.fps = n, "bench", 30.0
        self.skipped = self.reconnects = 0
        self.ended = "end"
        self.image = np.full((240, 320, 3), 90, np.uint8)

    def __iter__(self):
        from mocha_edge.deploy.sources import Frame

        for i in range(self.n):
            yield Frame(self.image, i, i / self.fps, self.name)

    def close(self) -> None:
        pass


class Pipe:
    """Four objects of one enrolled identity each; every ``every`` frames they jump elsewhere (new tracks).
    ``work_ms`` of busy work per frame."""

    def __init__(self, work_ms: float, every: int) -> None:
        self.names, self.identity_names = ["dog"], ["rex", "bella", "max", "luna"]
        self.work, self.every, self.frame = work_ms / 1e3, every, 0
        self.timings: dict[str, float] = {}
        self.name_conf = 0.5
        self.protos = np.eye(4, 8, dtype=np.float32)

    def match_vectors(self, vectors: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sim = vectors @ self.protos.T
        return sim.argmax(1).astype(np.int64), sim.max(1).astype(np.float32)

    def identity_similarity(self, vectors: np.ndarray, identity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (vectors * self.protos[identity]).sum(1), np.zeros(len(identity), np.float32)

    def __call__(self, bgr: np.ndarray) -> SimpleNamespace:
        end = time.perf_counter() + self.work
        while time.perf_counter() < end:  # holds the GIL, as Python pre/post-processing does
            pass
        phase = (self.frame // self.every) % 2
        self.frame += 1
        x = np.arange(4, dtype=np.float32) * 70 + 10 + phase * 30
        y = 20.0 + phase * 120
        boxes = np.stack([x, np.full(4, y), x + 50, np.full(4, y + 90)], 1).astype(np.float32)
        vec = np.concatenate([np.eye(4, dtype=np.float32), np.zeros((4, 4), np.float32)], 1)
        self.timings = {"infer": self.work * 1e3}
        ident, sim = self.match_vectors(vec, np.zeros(4, np.int64))
        return SimpleNamespace(boxes=boxes, scores=np.full(4, 0.9, np.float32), cls=np.zeros(4, np.int64),
                               vectors=vec, identity=ident, similarity=sim)  # fmt: skip


def run(frames: int, sinks: list[str], args: argparse.Namespace) -> dict:
    from mocha_edge.deploy.console import Console
    from mocha_edge.deploy.live import LiveEnroller, RunOptions, run_loop
    from mocha_edge.deploy.tracking import IdentityRule

    pipe = Pipe(args.work_ms, args.every)
    console = Console(stream=open(os.devnull, "w"))  # noqa: SIM115
    lines: list[str] = []
    console.log = lines.append  # type: ignore[method-assign]
    opts = RunOptions(sinks=sinks, handle_signals=False, fps_every=0, rule=IdentityRule(leave_after=0.3))
    summary = run_loop(
        Source(frames), pipe, opts, LiveEnroller(pipe, None, None, lines.append), console=console
    )
    return {"fps": summary.fps, "events": sum(summary.events.values()), "outputs": [o.line() for o in summary.outputs],
            "log": lines}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work-ms", type=float, default=15.0, help="the fake pipeline's cost per frame")
    ap.add_argument("--every", type=int, default=15, help="frames between the objects' jumps (new tracks)")
    ap.add_argument("--stop-after", type=float, default=1.0, help="seconds into a run the broker is stopped")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(mosquitto):
        sys.exit("bench_broker: the mosquitto broker is not installed (apt-get install mosquitto)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    port = free_port()
    conf = tmp / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = subprocess.Popen(
        [mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        base = [f"{tmp}/events.jsonl?kind=events"]
        mqtt = f"mqtt://127.0.0.1:{port}/bench?snapshot=1&queue=100&flush=1"
        run(60, [*base, mqtt], args)  # warm-up (imports, tracker), with the broker answering
        results: dict[str, list[dict]] = {"none": [], "stopped": []}
        for r in range(args.rounds):
            for cond in ("none", "stopped") if r % 2 == 0 else ("stopped", "none"):
                stopper = None
                if cond == "stopped":
                    os.kill(broker.pid, signal.SIGCONT)
                    stopper = threading.Timer(args.stop_after, os.kill, (broker.pid, signal.SIGSTOP))
                    stopper.start()
                results[cond].append(run(args.frames, base + ([mqtt] if cond == "stopped" else []), args))
                if stopper is not None:
                    stopper.cancel()
                print(f"round {r + 1} {cond:8s}: {results[cond][-1]['fps']:.1f} FPS, "
                      f"{results[cond][-1]['events']} events; {'; '.join(results[cond][-1]['outputs'])}")  # fmt: skip
    finally:
        os.kill(broker.pid, signal.SIGCONT)
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    fps = {k: statistics.median(x["fps"] for x in v) for k, v in results.items()}
    ratio = fps["stopped"] / fps["none"]
    print(f"median FPS: no MQTT {fps['none']:.1f}, broker stopped {fps['stopped']:.1f}: ratio {ratio:.3f} "
          f"({(1 - ratio) * 100:+.1f} % slower; target <= 5 %)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"fps": fps, "ratio": ratio, "runs": results, "args": vars(args)},
                                        indent=1, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
