"""Cost of one distillation epoch vs one plain ultralytics training epoch, measured in one run.

    python scripts/bench_train.py --data data/synth --cache data/synth/teacher.safetensors --imgsz 256

Rows (same data, student, image size, batch and workers; no validation):
  ultralytics  `YOLO(model).train(epochs=1)`: the reference, its epoch timed by its own callbacks
  baseline     mocha-edge's loop, student only (what `train --no-distill` does in a student epoch)
  distill      mocha-edge's loop, student + translator + MOCHA losses (a joint epoch)
  translator   mocha-edge's loop, translator-only epoch of the published schedule (student frozen)
Prints each epoch's seconds and its ratio to the ultralytics epoch; --json writes them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def ultralytics_epoch(view_yaml: Path, model: str, args: argparse.Namespace, tmp: Path) -> float:
    from ultralytics import YOLO

    times: dict[str, float] = {}
    y = YOLO(model)
    y.add_callback("on_train_epoch_start", lambda tr: times.__setitem__("start", time.perf_counter()))
    y.add_callback("on_train_epoch_end", lambda tr: times.__setitem__("end", time.perf_counter()))
    y.train(
        data=str(view_yaml), epochs=1, imgsz=args.imgsz, batch=args.batch, workers=args.workers, device="cpu",
        val=False, plots=False, amp=False, project=str(tmp), name="ul", exist_ok=True, verbose=False, seed=0,
    )  # fmt: skip
    return times["end"] - times["start"]


def ours_epoch(
    args: argparse.Namespace, tmp: Path, name: str, distill: bool, schedule: str, model: str
) -> float:
    from mocha_edge.train import TrainConfig, Trainer

    cfg = TrainConfig(
        data=args.data, out=str(tmp / name), model=model, teacher_cache=args.cache if distill else None,
        distill=distill, epochs=1, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
        schedule=schedule, student_every=4, val_every=0,
    )  # fmt: skip
    tr = Trainer(cfg, progress=False, log=lambda s: None)
    tr._setup(None)
    t0 = time.perf_counter()
    tr._epoch(0)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument(
        "--model", default="yolov8n.yaml", help="student (.yaml/.pt); .ckpt not accepted by ultralytics"
    )
    ap.add_argument("--imgsz", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from mocha_edge.data import load_dataset
    from mocha_edge.student import write_yolo_view
    from mocha_edge.utils import offline_env

    offline_env()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        view = write_yolo_view(load_dataset(args.data), tmp / "view")
        rows = {"ultralytics": ultralytics_epoch(view, args.model, args, tmp)}
        rows["baseline"] = ours_epoch(args, tmp, "baseline", False, "joint", args.model)
        rows["distill"] = ours_epoch(args, tmp, "distill", True, "joint", args.model)
        rows["translator"] = ours_epoch(args, tmp, "translator", True, "published", args.model)
    ref = rows["ultralytics"]
    print(f"{'epoch':<12} {'seconds':>8} {'x ultralytics':>14}")
    for k, v in rows.items():
        print(f"{k:<12} {v:8.1f} {v / ref:14.2f}")
    if args.json:
        args.json.write_text(
            json.dumps({"seconds": rows, "ratio": {k: v / ref for k, v in rows.items()}}, indent=2)
        )


if __name__ == "__main__":
    main()
