"""Graph latency of an export's FP32 model and its INT8 twin, plain and with the fused ops, same run.

    python scripts/bench_int8.py EXPORT.onnx [--threads 2] [--rounds 12]

EXPORT.onnx is the FP32 file of `mocha-edge export --int8`; its INT8 sibling (the uint8 twin on x86) is
found beside it. Each model runs in blocks of 20 timed runs after 3 untimed ones, blocks interleaved across
models, every session's thread pool told to stop spinning after a run (sessions timed side by side otherwise
steal each other's cores). Prints p50 ms and the ratio to FP32.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mocha_edge.export.exporter import cpu_int8_artefact
from mocha_edge.export.onnx import ort_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=12)
    a = ap.parse_args()
    int8 = cpu_int8_artefact(a.model)
    if int8 is None:
        raise SystemExit(f"{a.model}: no INT8 file beside it (export with --int8)")
    specs = [("fp32", a.model, True), ("int8", int8, False), ("int8 fused", int8, True)]
    sessions = [ort_session(p, threads=a.threads, fuse=f) for _, p, f in specs]
    shape = [d if isinstance(d, int) else 1 for d in sessions[0].get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    name = sessions[0].get_inputs()[0].name
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(a.rounds):
        for i, s in enumerate(sessions):
            for k in range(23):
                t0 = time.perf_counter()
                s.run(None, {name: x})
                if k >= 3:
                    times[i].append(time.perf_counter() - t0)
    ms = [float(np.median(t)) * 1e3 for t in times]
    fused = getattr(sessions[2], "mocha_fused_ops", {})
    print(f"{a.model} ({int8.name}), {a.threads} threads; fused: {fused or 'none'}")
    for (label, _, _), m in zip(specs, ms):
        print(f"  {label:11s} {m:7.2f} ms  {ms[0] / m:5.2f}x fp32")


if __name__ == "__main__":
    main()
