"""Scaling on torchrun (issue 18, item 4): one single-thread process against two, in one run.

    python scripts/scale_bench.py --work /tmp/scale18 --teacher-weights DEMO/data/teacher.teacher/builtin_teacher.pt

Builds (once, in ``--work``) ``data synth --seed 7`` at 4× the default benchmark (4,800 train, 800 val, 800
query images), then, each in a child process and one at a time, with ``OMP_NUM_THREADS=1`` (one torch thread
per process) and data-loader workers 0:

* ``teach --nproc 1`` and ``teach --nproc 2`` with the builtin teacher's fixed weights (``--model``: nothing to
  train). Measured: the teacher pass alone, as teach logs it (``teacher pass: N boxes in S s``: every rank's
  boxes until the last rank is done), so start-up, the cache check and the rank-0 merge + PCA fit are out;
  the merge is timed apart (what stays serial).
* ``train --schedule joint --epochs 1 --workers 0`` with ``--nproc 1`` and ``--nproc 2`` (global batch 16, the
  demo's image size 256), distilling from the 1-process cache: the epoch's steps alone (``train_s`` in
  ``metrics.csv``: no start-up, validation or saving).

The rounds alternate (1, 2, 1, 2, ...; ``--rounds``) so the machine's drift hits both; the ratio of the
medians is printed and written to ``--json``. Without ``--teacher-weights`` one unmeasured ``teach`` trains
them first. ``--train-images`` trains on the first N train images only (a shorter epoch; say so when quoting).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCALE_4X = (4800, 800, 800)  # --train, --val, --query: 4x ``data synth``'s defaults
PASS = re.compile(r"teacher pass: (\d+) boxes in ([\d.]+) s")
MERGE = re.compile(r"cache: .* ([\d.]+) s(,|$)")


def run(cmd: list[str], log: Path, cwd: Path) -> tuple[str, float]:
    """``python -m mocha_edge CMD`` in a child with one torch thread; (its output, seconds). Fails loudly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mocha_edge", *cmd], cwd=cwd, env=env, capture_output=True,
                       text=True)  # fmt: skip
    out = p.stdout + p.stderr
    log.write_text(out)
    if p.returncode != 0:
        raise SystemExit(f"failed ({log}): mocha-edge {' '.join(cmd)}\n{out[-2000:]}")
    return out, time.perf_counter() - t0


def clear(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="Folder for the data, caches, runs and logs.")
    ap.add_argument(
        "--teacher-weights", type=Path, help="A trained builtin_teacher.pt (else trained, unmeasured)."
    )
    ap.add_argument(
        "--sizes", default=",".join(map(str, SCALE_4X)), help="train,val,query images (smoke tests)."
    )
    ap.add_argument("--rounds", type=int, default=1, help="Alternating rounds of each measurement.")
    ap.add_argument("--skip", default="", help="Comma list of parts to skip: teach, train.")
    ap.add_argument("--json", type=Path, help="Write the measurements here.")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    sizes = tuple(int(v) for v in args.sizes.split(","))
    data = work / ("synth_4x" if sizes == SCALE_4X else "synth_" + "_".join(map(str, sizes)))
    if not (data / "dataset.yaml").is_file():
        tr, va, qu = sizes
        run(["data", "synth", "--out", str(data), "--seed", "7", "--quiet", "--train", str(tr), "--val", str(va),
             "--query", str(qu)], work / "synth.log", repo)  # fmt: skip
    weights = args.teacher_weights
    if weights is None:
        weights = work / "teacher_w.teacher" / "builtin_teacher.pt"
        if not weights.is_file():
            run(["teach", "--data", str(data), "--out", str(work / "teacher_w.safetensors"), "--quiet"],
                work / "teacher_w.log", repo)  # fmt: skip
    result: dict = {"data": str(data), "scale": dict(zip(("train", "val", "query"), sizes)), "rounds": []}
    cache1 = work / "cache_n1.safetensors"
    for r in range(args.rounds):
        row: dict = {}
        for n in (1, 2):
            if "teach" not in skip or not cache1.is_file():
                out = work / f"cache_n{n}.safetensors"
                clear(out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".lock"))
                text, wall = run(["teach", "--teacher", "builtin", "--model", str(weights), "--data", str(data),
                                  "--out", str(out), "--nproc", str(n), "--quiet"],
                                 work / f"teach_n{n}_r{r}.log", repo)  # fmt: skip
                m, c = PASS.search(text), MERGE.search(text)
                if m is None:
                    raise SystemExit(f"{work / f'teach_n{n}_r{r}.log'}: no 'teacher pass' line")
                boxes, s = int(m[1]), float(m[2])
                row[f"teach_n{n}"] = {"boxes": boxes, "pass_s": s, "boxes_per_s": boxes / s, "wall_s": wall,
                                      "teach_s": float(c[1]) if c else None}  # fmt: skip
                print(f"round {r} teach nproc {n}: {boxes} boxes in {s:.1f} s = {boxes / s:.1f} boxes/s "
                      f"(wall {wall:.0f} s)", flush=True)  # fmt: skip
            if "train" not in skip:
                out = work / f"train_n{n}"
                clear(out)
                run(["train", "--data", str(data), "--teacher-cache", str(cache1), "--out", str(out),
                     "--epochs", "1", "--schedule", "joint", "--imgsz", "256", "--batch", "16", "--workers", "0",
                     "--nproc", str(n), "--seed", "0", "--quiet"], work / f"train_n{n}_r{r}.log", repo)  # fmt: skip
                hist = [ln.split(",") for ln in (out / "metrics.csv").read_text().splitlines()]
                col = hist[0].index("train_s")
                s = float(hist[-1][col])
                row[f"train_n{n}"] = {"epoch_s": s}
                print(f"round {r} train nproc {n}: epoch {s:.1f} s", flush=True)
        result["rounds"].append(row)
    summary = {}
    for part, key, better in (("teach", "boxes_per_s", "higher"), ("train", "epoch_s", "lower")):
        vals = {
            n: [rw[f"{part}_n{n}"][key] for rw in result["rounds"] if f"{part}_n{n}" in rw] for n in (1, 2)
        }
        if vals[1] and vals[2]:
            a, b = statistics.median(vals[1]), statistics.median(vals[2])
            summary[part] = {"n1": a, "n2": b, "speedup": b / a if better == "higher" else a / b}
            print(
                f"{part}: 1 process {a:.2f}, 2 processes {b:.2f} ({key}) -> speed-up {summary[part]['speedup']:.2f}x"
            )
    result["summary"] = summary
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
