"""Peak RSS of ``mocha-edge teach`` and ``mocha-edge eval`` at 1× and 4× the built-in benchmark (issue 18).

    OMP_NUM_THREADS=1 python scripts/mem_slope.py --work /tmp/mem18 \\
        --teacher-weights data/synth/teacher.teacher/builtin_teacher.pt --student runs/distill/last.ckpt

Builds (once, in ``--work``) ``data synth --seed 7`` at 1× and at 4× the train/val/query images, then runs each
command in a child process, one at a time, and reads the child's peak resident set (``wait4``'s ru_maxrss).
teach: the builtin teacher with fixed weights (``--model``: nothing to train, so the run measures the teacher
pass, the merge and the PCA fit); without ``--teacher-weights`` one unmeasured run trains them on the 1× data.
eval: ``--student`` (a checkpoint whose class names are the benchmark's; without it a 1-epoch
``train --stage base --imgsz 128`` student is trained first, unmeasured). Prints the table and the slope
in MB per 1,000 images (teach: every image of the dataset; eval: the support + query images it reads).
``--repo DIR`` runs ``python -m mocha_edge`` from DIR (e.g. a ``git worktree`` of an older commit: before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCALES = {"1x": (1200, 200, 200), "4x": (4800, 800, 800)}  # --train, --val, --query


def run(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run ``python -m mocha_edge CMD`` in a child; ``(peak RSS in MB, seconds)``. Fails loudly."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(
            [sys.executable, "-m", "mocha_edge", *cmd], cwd=cwd, stdout=fh, stderr=fh, env=env
        )
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({log}): mocha-edge {' '.join(cmd)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0  # Linux: KiB


def count_images(data: Path, splits: tuple[str, ...]) -> int:
    return sum(len(list((data / s / "images").glob("*"))) for s in splits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the data, caches and logs.")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1], help="Code to measure.")
    ap.add_argument(
        "--teacher-weights", type=Path, help="A trained builtin_teacher.pt (else trained, unmeasured)."
    )
    ap.add_argument(
        "--student", type=Path, help="Student checkpoint for eval (else a 1-epoch one is trained)."
    )
    ap.add_argument("--episodes", type=int, default=20, help="eval --episodes")
    ap.add_argument("--label", default="", help="Tag for the logs and the table (e.g. before/after).")
    ap.add_argument("--json", type=Path, help="Also write the rows here.")
    ap.add_argument("--commands", default="teach,eval", help="Which to measure (comma list).")
    args = ap.parse_args()
    work, repo = args.work.resolve(), args.repo.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = {}
    for scale, (tr, va, qu) in SCALES.items():
        data[scale] = work / f"synth_{scale}"
        if not (data[scale] / "dataset.yaml").is_file():
            cmd = ["data", "synth", "--out", str(data[scale]), "--seed", "7", "--quiet"]
            run(
                [*cmd, "--train", str(tr), "--val", str(va), "--query", str(qu)],
                repo,
                work / f"synth_{scale}.log",
            )
    weights = args.teacher_weights
    if weights is None:
        weights = work / "teacher_w.teacher" / "builtin_teacher.pt"
        if not weights.is_file():
            run(["teach", "--data", str(data["1x"]), "--out", str(work / "teacher_w.safetensors"), "--quiet"],
                repo, work / "teacher_w.log")  # fmt: skip
    student = args.student
    if student is None:
        student = work / "student" / "last.ckpt"
        if not student.is_file():
            run(["train", "--stage", "base", "--data", str(data["1x"]), "--out", str(work / "student"),
                 "--epochs", "1", "--imgsz", "128", "--quiet"], repo, work / "student.log")  # fmt: skip
    rows = []
    tag = f"_{args.label}" if args.label else ""
    for scale in SCALES:
        d = data[scale]
        out = work / f"cache_{scale}{tag}.safetensors"
        for p in (out, out.with_name(out.name + ".partial"), out.with_name(out.stem + ".teacher")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        teach = ["teach", "--teacher", "builtin", "--model", str(weights), "--data", str(d), "--out", str(out),
                 "--quiet"]  # fmt: skip
        if "teach" in args.commands:
            mb, s = run(teach, repo, work / f"teach_{scale}{tag}.log")
            rows.append(("teach", scale, count_images(d, ("train", "val", "novel")), mb, s))
        ev = ["eval", "--data", str(d), "--model", f"s={student}", "--shots", "1,5", "--episodes",
              str(args.episodes), "--json", str(work / f"eval_{scale}{tag}.json")]  # fmt: skip
        if "eval" in args.commands:
            mb, s = run(ev, repo, work / f"eval_{scale}{tag}.log")
            rows.append(("eval", scale, count_images(d, ("novel",)), mb, s))
    print(f"| command{' (' + args.label + ')' if args.label else ''} | scale | images | peak RSS MB | s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.0f} |")
    for cmd in ("teach", "eval"):
        if cmd not in args.commands:
            continue
        a, b = [r for r in rows if r[0] == cmd]
        print(f"{cmd}: slope {(b[3] - a[3]) / (b[2] - a[2]) * 1000:.1f} MB per 1,000 images")
    if args.json:
        args.json.write_text(
            json.dumps([dict(zip(("command", "scale", "images", "rss_mb", "s"), r)) for r in rows])
        )


if __name__ == "__main__":
    main()
