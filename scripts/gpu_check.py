"""GPU checks beyond `pytest -m gpu` (run by scripts/gpu_check.sh): python scripts/gpu_check.py OUTDIR

1. GPU pre/post stages (mocha_edge.device_stages) on a PyTorch CUDA engine, on any CUDA machine: detections
   against the same engine with the C kernels on the CPU, and the stage times for 1080p frames (issue
   targets: CUDA pre + post <= 0.3 ms; end to end <= 1.15x the model's own time).
2. With TensorRT: FP16 and INT8 engines built and timed, then the pipeline on each with the GPU stages.

MOCHA_EDGE_CKPT: a trained student to use (else a 1-epoch base student is trained here on synthetic data);
ENGINE_IMGSZ (default 640, the size of the published Jetson numbers).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def student(work: Path, data: Path) -> str:
    ckpt = os.environ.get("MOCHA_EDGE_CKPT")
    if ckpt:
        return ckpt
    from mocha_edge.train import TrainConfig, train

    cfg = TrainConfig(data=str(data), out=str(work / "run"), stage="base", epochs=1, imgsz=320, batch=16,
                      workers=2, device="cuda:0", val_every=0)  # fmt: skip
    return str(train(cfg, progress=False).checkpoint)


def frames_1080p(data: Path, n: int = 8) -> list[np.ndarray]:
    import cv2

    from mocha_edge.infer import read_bgr

    paths = sorted((data.parent / "val" / "images").glob("*.jpg"))[:n]
    return [cv2.resize(read_bgr(p), (1920, 1080), interpolation=cv2.INTER_LINEAR) for p in paths]


def stage_times(pipe, frames: list[np.ndarray], runs: int = 200) -> dict[str, float]:
    """p50 ms per stage and end to end (warm-up first)."""
    for f in frames[:4] * 5:
        pipe(f)
    rows: list[dict[str, float]] = []
    for i in range(runs):
        t = time.perf_counter()
        pipe(frames[i % len(frames)])
        rows.append({**pipe.timings, "e2e": (time.perf_counter() - t) * 1e3})
    return {k: float(np.median([r[k] for r in rows])) for k in rows[0]}


def compare(host, dev, frames: list[np.ndarray]) -> str:
    """Detections of the GPU stages vs the C kernels on the same engine outputs' host copies."""
    n, worst_score = 0, 0.0
    worst_iou, worst_cos, same_cls, count_equal = 1.0, 1.0, True, True
    for f in frames:
        a, b = host(f), dev(f)
        if len(a) != len(b):
            count_equal = False
            continue
        n += len(a)
        if not len(a):
            continue
        same_cls &= bool(np.array_equal(a.cls, b.cls))
        lt, rb = np.maximum(a.boxes[:, :2], b.boxes[:, :2]), np.minimum(a.boxes[:, 2:], b.boxes[:, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), 1)
        area = lambda x: np.prod(x[:, 2:] - x[:, :2], 1)  # noqa: E731
        worst_iou = min(worst_iou, float((inter / (area(a.boxes) + area(b.boxes) - inter + 1e-9)).min()))
        worst_score = max(worst_score, float(np.abs(a.scores - b.scores).max()))
        cos = (a.vectors * b.vectors).sum(1) / (
            np.linalg.norm(a.vectors, axis=1) * np.linalg.norm(b.vectors, axis=1)
        )
        worst_cos = min(worst_cos, float(cos.min()))
    ok = count_equal and same_cls and worst_iou >= 0.99 and worst_score <= 1e-3 and worst_cos >= 0.999
    return (f"{'OK' if ok else 'MISMATCH'}: {int(n)} detections, counts equal {count_equal}, classes equal "
            f"{same_cls}, min IoU {worst_iou:.5f}, max score diff {worst_score:.2e}, min cosine {worst_cos:.6f}")  # fmt: skip


def report(label: str, t: dict[str, float]) -> None:
    prepost = t["pre"] + t["post"]
    print(f"{label}: pre {t['pre']:.3f} ms, infer {t['infer']:.3f}, post {t['post']:.3f}, pool {t['pool']:.3f}, "
          f"match {t['match']:.3f}, e2e {t['e2e']:.3f} ms | pre+post {prepost:.3f} ms (target <= 0.3), "
          f"e2e / infer {t['e2e'] / t['infer']:.2f} (target <= 1.15)")  # fmt: skip


def main(out: Path) -> int:
    import torch
    from mocha_edge.export.onnx import export_onnx, read_facts

    from mocha_edge.bench import TorchCudaEngine
    from mocha_edge.data.synth import synthesize
    from mocha_edge.infer import Student
    from mocha_edge.pipeline import Pipeline

    if not torch.cuda.is_available():
        print("no CUDA device: GPU stage checks not run")
        return 0
    work = out / "engines"
    work.mkdir(parents=True, exist_ok=True)
    imgsz = int(os.environ.get("ENGINE_IMGSZ", "640"))
    data = synthesize(work / "synth", seed=0, n_train=160, n_val=16, n_query=10, support_per_instance=5,
                      progress=False)  # fmt: skip
    ckpt = student(work, data)
    print("student:", ckpt)
    st = Student.load(ckpt)
    st.imgsz = imgsz
    onnx_path = export_onnx(st, work / "student.onnx")
    facts = read_facts(onnx_path)
    frames = frames_1080p(data)
    rc = 0

    print(f"== GPU pre/post stages, PyTorch CUDA engine, {imgsz} px, 1080p frames")
    for half in (False, True):
        eng = TorchCudaEngine(ckpt, imgsz, half=half)
        host = Pipeline(eng, facts=facts, conf=0.1, gpu_stages="off")
        dev = Pipeline(eng, facts=facts, conf=0.1, gpu_stages="on")
        line = compare(host, dev, frames)
        print(f"torch {'fp16' if half else 'fp32'} GPU stages vs C kernels:", line)
        rc |= int(line.startswith("MISMATCH"))
        report(f"torch {'fp16' if half else 'fp32'} GPU stages", stage_times(dev, frames))
        report(f"torch {'fp16' if half else 'fp32'} C stages  ", stage_times(host, frames))

    print("== TensorRT engines")
    try:
        import tensorrt

        tensorrt.Builder  # noqa: B018 (`tensorrt-stubs` alone installs an empty namespace package)
    except (ImportError, AttributeError):
        print("TensorRT: absent - engine building not checked")
        return rc
    from mocha_edge.export.calib import select_calibration
    from mocha_edge.export.trt import TrtEngine, build_engine, cuda_backend

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        calib = select_calibration(data, n=500)  # the synth set has fewer: a warning, printed below
    for w in caught:
        print("warning:", w.message)
    name, cc, integrated = cuda_backend().device_info()
    print(f"GPU: {name} (compute capability {cc}{', integrated' if integrated else ''})")
    rng = np.random.default_rng(0)
    for prec in ("fp16", "int8"):
        t0 = time.perf_counter()
        eng_path = build_engine(
            onnx_path, precision=prec, calib=calib if prec == "int8" else None, imgsz=imgsz
        )
        build_s = time.perf_counter() - t0
        with TrtEngine(eng_path, warmup=20) as eng:
            x = rng.random(eng.input_shape, dtype=np.float32).astype(eng.dtype)
            ms = []
            for _ in range(200):
                t = time.perf_counter()
                eng.run(x)
                ms.append((time.perf_counter() - t) * 1e3)
            p50, p90 = np.percentile(ms, [50, 90])
            print(f"{prec}: {eng_path.name} built in {build_s:.1f} s; batch {eng.input_shape[0]} at {imgsz} px: "
                  f"p50 {p50:.3f} ms, p90 {p90:.3f} ms over 200 runs (host->device->host; CUDA graph: "
                  f"{eng.graph_note})")  # fmt: skip
            host = Pipeline(eng, conf=0.1, gpu_stages="off")
            dev = Pipeline(eng, conf=0.1, gpu_stages="on")
            line = compare(host, dev, frames)
            print(f"TensorRT {prec} GPU stages vs C kernels:", line)
            rc |= int(line.startswith("MISMATCH"))
            report(f"TensorRT {prec} GPU stages", stage_times(dev, frames))
            report(f"TensorRT {prec} C stages  ", stage_times(host, frames))
    return rc


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check")))
