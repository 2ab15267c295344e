"""Native runtime vs ultralytics' predictor: pre+post-processing time per frame, and matching time.

    python scripts/bench_runtime.py [--pt MODEL.pt] [--runs 50] [--match-only]

For imgsz 640 and 320, on a 1080x810 frame (a coco8 photo resized), the same model runs through (a)
ultralytics' own predictor on ultralytics' ONNX export (its ``results[0].speed``: preprocess / inference /
postprocess ms) and (b) ``mocha_edge.deploy.pipeline.Pipeline`` on the mocha-edge ONNX export (native letterbox,
ONNX Runtime, native decode + NMS, native pooling). Printed: medians and the ratio of pre+post (ours
includes box pooling). Then prototype matching, 100 detections x 1000 prototypes x D=448, conditional (80
classes) and global, 1 thread and automatic, plain, with vector centring (80 per-class means) +
per-prototype thresholds, and with centring + a linear projection to D'=128 (prototypes 1000 x 128) +
per-prototype thresholds; and that last one with "not NAME" corrections at their bound (20 per prototype) where
every detection is named (threshold -1: each pays for its identity's 20 corrections), against the same without
corrections (``--match-only``: only this). Without --pt, a YOLOv8n of random weights (BatchNorm statistics
measured on coco8, class bias -3) stands in, built from ultralytics' bundled yaml (nothing downloaded).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COCO8 = REPO / "tests" / "data" / "coco8"  # the real photos shipped with the tests


def random_yolo(imgsz: int = 640, bias: float = -3.0):
    import torch
    from ultralytics import YOLO

    from mocha_edge.infer import letterbox, read_bgr

    torch.manual_seed(0)
    yolo = YOLO("yolov8n.yaml")
    for m in yolo.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    x = np.stack([letterbox(read_bgr(p), imgsz)[0] for p in sorted(COCO8.glob("images/*/*.jpg"))])
    yolo.model.train()
    with torch.no_grad():
        yolo.model(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255)
    yolo.model.eval()
    for branch in yolo.model.model[-1].cv3:
        branch[-1].bias.data.fill_(bias)
    return yolo


def median_ms(fn, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench_frame(pt: Path, imgsz: int, frame: np.ndarray, runs: int, work: Path, conf: float) -> None:
    from ultralytics import YOLO

    from mocha_edge.deploy.pipeline import Pipeline
    from mocha_edge.export.onnx import export_onnx
    from mocha_edge.infer import Student

    ul = YOLO(str(pt))
    names = [ul.model.names[i] for i in range(len(ul.model.names))]
    ours_onnx = export_onnx(Student(ul.model, names, imgsz), work / f"ours{imgsz}.onnx")
    ul_onnx = YOLO(str(pt)).export(format="onnx", imgsz=imgsz, simplify=True, verbose=False)
    theirs = YOLO(ul_onnx, task="detect")
    speeds = []
    for i in range(runs + 5):
        res = theirs.predict(frame, imgsz=imgsz, conf=conf, iou=0.7, verbose=False)[0]
        if i >= 5:
            speeds.append(res.speed)
    n_theirs = len(res.boxes)
    t_pre = statistics.median(s["preprocess"] for s in speeds)
    t_inf = statistics.median(s["inference"] for s in speeds)
    t_post = statistics.median(s["postprocess"] for s in speeds)
    for threads in (None, 1):
        pipe = Pipeline(ours_onnx, conf=conf, iou=0.7, threads=threads)
        times = []
        for i in range(runs + 5):
            det = pipe(frame)
            if i >= 5:
                times.append(pipe.timings)
        med = {k: statistics.median(t[k] for t in times) for k in ("pre", "infer", "post", "match")}
        label = f"ours (ORT threads={threads or 'default'})"
        print(f"  {label:34s} pre {med['pre']:6.2f}  infer {med['infer']:7.2f}  post {med['post']:6.2f}  "
              f"pool {med['match']:5.2f} ms  ({len(det)} detections)")  # fmt: skip
        if threads is None:
            ours_pp = med["pre"] + med["post"] + med["match"]
            ours_nopool = med["pre"] + med["post"]
    print(f"  {'ultralytics predictor (its ONNX)':34s} pre {t_pre:6.2f}  infer {t_inf:7.2f}  post {t_post:6.2f}"
          f"              ({n_theirs} detections)")  # fmt: skip
    theirs_pp = t_pre + t_post
    print(f"  imgsz {imgsz} conf {conf}: pre+post ours {ours_pp:.2f} ms (with pooling) / {ours_nopool:.2f} ms "
          f"(without) vs ultralytics {theirs_pp:.2f} ms -> ratio {ours_pp / theirs_pp:.2f}x / "
          f"{ours_nopool / theirs_pp:.2f}x")  # fmt: skip


def bench_match(runs: int) -> None:
    from mocha_edge import runtime as rt
    from mocha_edge.prototypes import MAX_NEGATIVES
    from mocha_edge.prototypes import match as np_match

    g = np.random.default_rng(0)
    p = g.normal(0, 1, (1000, 448)).astype(np.float32)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    pc, v, dc = g.integers(0, 80, 1000), g.normal(0, 1, (100, 448)).astype(np.float32), g.integers(0, 80, 100)
    means = g.normal(0, 0.1, (80, 448)).astype(np.float32)  # vector centring: one mean per class
    thr = g.uniform(0.0, 0.2, 1000).astype(np.float32)  # one threshold per prototype
    proj = (g.normal(0, 1, (448, 128)) / np.sqrt(448)).astype(np.float32)  # linear projection to D'=128
    pp = g.normal(0, 1, (1000, 128)).astype(np.float32)
    pp /= np.linalg.norm(pp, axis=1, keepdims=True)
    # "not NAME" corrections at their bound, in the projected space
    neg = g.normal(0, 1, (1000 * MAX_NEGATIVES, 128)).astype(np.float32)
    neg /= np.linalg.norm(neg, axis=1, keepdims=True)
    off = np.arange(0, len(neg) + 1, MAX_NEGATIVES, dtype=np.int32)
    every = np.full(1000, -1.0, np.float32)  # every detection named: the most corrections checked
    for mode in ("conditional", "global"):
        t_np = median_ms(lambda mode=mode: np_match(v, dc, p, pc, mode), max(runs // 5, 5))
        t1 = median_ms(lambda mode=mode: rt.match(v, dc, p, pc, mode, threads=1), runs * 4)
        ta = median_ms(lambda mode=mode: rt.match(v, dc, p, pc, mode), runs * 4)
        tc = median_ms(
            lambda mode=mode: rt.match(v, dc, p, pc, mode, threads=1, means=means, thresholds=thr), runs * 4
        )
        tp = median_ms(
            lambda mode=mode: rt.match(
                v, dc, pp, pc, mode, threads=1, means=means, thresholds=thr, proj=proj
            ),
            runs * 4,
        )
        named = [
            median_ms(
                lambda mode=mode, kw=kw: rt.match(
                    v, dc, pp, pc, mode, threads=1, means=means, thresholds=every, proj=proj, **kw
                ),
                runs * 4,
            )
            for kw in ({}, {"negatives": neg, "neg_offsets": off})
        ]
        print(f"  match {mode:11s} 100x1000x448: native {t1:.3f} ms (1 thread), {ta:.3f} ms (auto); "
              f"NumPy {t_np:.3f} ms -> {t_np / ta:.1f}x; centred + per-prototype thresholds {tc:.3f} ms, "
              f"centred + projection to 128 + per-prototype thresholds {tp:.3f} ms (1 thread); all named: "
              f"{named[0]:.3f} ms, with {MAX_NEGATIVES} corrections per prototype {named[1]:.3f} ms "
              f"({named[1] / named[0]:.2f}x)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pt", type=Path, help="an ultralytics .pt (default: random-weight YOLOv8n)")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--conf", default="0.25,0.6", help="comma-separated thresholds (few vs many detections)")
    ap.add_argument("--match-only", action="store_true", help="only the prototype matching benchmark")
    args = ap.parse_args()
    if args.match_only:
        bench_match(args.runs)
        return 0
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import cv2

    from mocha_edge.infer import read_bgr

    photo = sorted(COCO8.glob("images/*/*.jpg"))
    if not photo:
        sys.exit(f"error: {COCO8}: no coco8 photos (run from a full checkout of the repository)")
    frame = cv2.resize(read_bgr(photo[0]), (1080, 810), interpolation=cv2.INTER_LINEAR)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pt = args.pt
        if pt is None:
            pt = work / "random_yolov8n.pt"
            random_yolo().save(str(pt))
        print(
            f"frame 1080x810, model {args.pt or 'random-weight YOLOv8n'}, conf {args.conf}, medians of {args.runs}"
        )
        for imgsz in (640, 320):
            for conf in (float(c) for c in args.conf.split(",")):
                bench_frame(pt, imgsz, frame, args.runs, work, conf)
    bench_match(args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
