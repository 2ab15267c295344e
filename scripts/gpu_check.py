"""GPU checks beyond `pytest -m gpu` (run by scripts/gpu_check.sh): python scripts/gpu_check.py OUTDIR

1. GPU pre/post stages (mocha_edge.deploy.device_stages) on the PyTorch CUDA engine (``torch-cuda``, FP32 and
   FP16), on any CUDA machine: detections and vectors against the same engine with the C stages on the CPU,
   and the stage times for 1080p frames (issue targets: CUDA pre + post <= 0.3 ms; end to end <= 1.15x the
   model's own time).
2. With TensorRT (the ``trt`` engine available): FP16 and Q/DQ INT8 engines made through the exporter, timed,
   then the pipeline on each with the GPU stages against the C stages. Recorded as skipped otherwise.

Engines are made only through the registry (``mocha_edge.deploy.engines``). Writes OUTDIR/gpu_stages.json
(``status`` pass|fail|skip, ``reason``, the numbers) and prints the same as lines; exit code 1 when a check
failed. Work files (synthetic data, checkpoint, exports) go to a temporary folder, not OUTDIR.

MOCHA_EDGE_CKPT: a trained student to use (else a small base student is trained here on synthetic data, from
the default config); GPU_CHECK_EPOCHS (default 30) its epochs; ENGINE_IMGSZ (default 640, the size of the
published Jetson numbers); GPU_CHECK_RUNS (default 200) timed frames per pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = "gpu_stages.json"
CONFS = (0.25, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)  # the first leaving >= 2 detections per frame


def student(work: Path, data: Path) -> str:
    """MOCHA_EDGE_CKPT, or a base student trained here on the synthetic set from the default config."""
    ckpt = os.environ.get("MOCHA_EDGE_CKPT")
    if ckpt:
        return ckpt
    from mocha_edge.train import TrainConfig, train

    cfg = TrainConfig(data=str(data), out=str(work / "run"), stage="base", epochs=int(os.environ.get("GPU_CHECK_EPOCHS", "30")),
                      imgsz=160, batch=16, workers=0, device="cuda:0", val_every=0, lr_student=2e-3)  # fmt: skip
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


def compare_stats(host, dev, frames: list[np.ndarray]) -> dict[str, Any]:
    """Detections of the GPU stages vs the C kernels on the same engine: counts, classes, boxes, scores,
    vectors; ``ok`` when they agree (IoU >= 0.99, score diff <= 1e-3, vector cosine >= 0.999)."""
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
    return {"ok": bool(ok), "detections": int(n), "counts_equal": bool(count_equal), "classes_equal": bool(same_cls),
            "min_iou": worst_iou, "max_score_diff": worst_score, "min_cosine": worst_cos}  # fmt: skip


def compare(host, dev, frames: list[np.ndarray]) -> str:
    """:func:`compare_stats` as one line, starting with OK or MISMATCH."""
    return compare_line(compare_stats(host, dev, frames))


def compare_line(s: dict[str, Any]) -> str:
    return (f"{'OK' if s['ok'] else 'MISMATCH'}: {s['detections']} detections, counts equal {s['counts_equal']}, "
            f"classes equal {s['classes_equal']}, min IoU {s['min_iou']:.5f}, max score diff "
            f"{s['max_score_diff']:.2e}, min cosine {s['min_cosine']:.6f}")  # fmt: skip


def report(label: str, t: dict[str, float]) -> str:
    prepost = t["pre"] + t["post"]
    line = (f"{label}: pre {t['pre']:.3f} ms, infer {t['infer']:.3f}, post {t['post']:.3f}, pool {t['pool']:.3f}, "
            f"match {t['match']:.3f}, e2e {t['e2e']:.3f} ms | pre+post {prepost:.3f} ms (target <= 0.3), "
            f"e2e / infer {t['e2e'] / t['infer']:.2f} (target <= 1.15)")  # fmt: skip
    print(line, flush=True)
    return line


def pick_conf(pipe, frames: list[np.ndarray]) -> tuple[float, int]:
    """The highest of CONFS at which ``pipe`` finds >= 2 detections per frame (a small student trained for
    seconds scores low), and the count there."""
    count = 0
    for c in CONFS:
        pipe.conf = c
        count = sum(len(pipe(f)) for f in frames)
        if count >= 2 * len(frames):
            break
    return pipe.conf, count


def check_pair(row: dict[str, Any], eng, frames: list[np.ndarray], conf: float, facts, no_cuda_lib: str | None,
               runs: int) -> None:  # fmt: skip
    """Fill ``row`` for one engine: the C stages' times and, with the CUDA library, the GPU stages against
    them (detections, vectors) and their times."""
    from mocha_edge.deploy.pipeline import Pipeline

    label = f"{row['engine']} {row['precision']}"
    host = Pipeline(eng, facts=facts, conf=conf, gpu_stages="off")
    if no_cuda_lib is not None:
        row.update(status="skip", reason=f"GPU stages not checked: {no_cuda_lib}")
        print(f"{label}: {row['reason']}", flush=True)
    else:
        dev = Pipeline(eng, facts=facts, conf=conf, gpu_stages="on")
        stats = compare_stats(host, dev, frames)
        line = compare_line(stats)
        print(f"{label} GPU stages vs C stages:", line, flush=True)
        row.update(status="pass" if stats["ok"] else "fail", compare=stats,
                   reason="" if stats["ok"] else f"GPU stages differ from the C stages: {line}")  # fmt: skip
        if stats["ok"] and stats["detections"] == 0:
            row.update(status="skip", reason=f"no detections at conf {conf}: nothing compared")
        row["gpu_stages_ms"] = stage_times(dev, frames, runs)
        report(f"{label} GPU stages", row["gpu_stages_ms"])
    row["c_stages_ms"] = stage_times(host, frames, runs)
    report(f"{label} C stages  ", row["c_stages_ms"])
    if "gpu_stages_ms" in row:
        t = row["gpu_stages_ms"]
        row["targets"] = {"pre_post_ms": t["pre"] + t["post"], "pre_post_le_0.3": t["pre"] + t["post"] <= 0.3,
                          "e2e_over_infer": t["e2e"] / t["infer"], "e2e_le_1.15x": t["e2e"] / t["infer"] <= 1.15}  # fmt: skip


def run_row(rows: list[dict[str, Any]], row: dict[str, Any], fn) -> None:
    """Run one check; an exception fails that row only (with its reason), the others still run."""
    t0 = time.perf_counter()
    try:
        fn(row)
    except Exception as e:
        traceback.print_exc()
        row.update(status="fail", reason=f"{type(e).__name__}: {str(e)[:400]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    rows.append(row)


def checks(res: dict[str, Any], work: Path) -> None:
    import torch

    from mocha_edge import runtime as rt
    from mocha_edge.data.synth import synthesize
    from mocha_edge.deploy.config import DeployConfig
    from mocha_edge.deploy.engines import availability, create_engine
    from mocha_edge.export.onnx import export_onnx
    from mocha_edge.infer import Student

    engines = {e["name"]: e for e in availability()}
    res["engines"] = [{k: e[k] for k in ("name", "available", "reason")} for e in engines.values()]
    if not engines["torch-cuda"]["available"]:
        res.update(
            status="skip", reason=f"the torch-cuda engine cannot run here: {engines['torch-cuda']['reason']}"
        )
        print(res["reason"])
        return
    from mocha_edge.deploy.cuda import cuda_backend

    name, cc, integrated = cuda_backend().device_info()
    res["gpu"] = {
        "name": name,
        "compute_capability": cc,
        "integrated": integrated,
        "torch": torch.__version__,
    }
    cuda = rt.build_info().get("cuda", {})
    res["cuda_library"] = cuda
    no_cuda_lib = (
        None if cuda.get("built") else f"the CUDA library is not built ({cuda.get('why', 'no build info')})"
    )
    print(f"GPU: {name} (compute capability {cc}{', integrated' if integrated else ''}); CUDA library: "
          f"{'built for ' + ', '.join(cuda.get('archs', [])) if no_cuda_lib is None else no_cuda_lib}", flush=True)  # fmt: skip

    imgsz, runs = int(os.environ.get("ENGINE_IMGSZ", "640")), int(os.environ.get("GPU_CHECK_RUNS", "200"))
    t0 = time.perf_counter()
    data = synthesize(work / "synth", seed=0, n_train=64, n_val=16, n_query=10, support_per_instance=5,
                      progress=False)  # fmt: skip
    ckpt = student(work, data)
    st = Student.load(ckpt)
    st.imgsz = imgsz
    onnx_path = export_onnx(st, work / "student.onnx")
    facts = DeployConfig.for_model(onnx_path)
    frames = frames_1080p(data)
    res["student"] = {"checkpoint": ckpt, "imgsz": imgsz, "frames": f"{len(frames)} x 1920x1080",
                      "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print(f"student {ckpt} ({res['student']['seconds']} s to make), engines at {imgsz} px, "
          f"{len(frames)} 1080p frames", flush=True)  # fmt: skip

    rows: list[dict[str, Any]] = []
    res["rows"] = rows
    conf = None
    for half in (False, True):

        def torch_row(row: dict[str, Any], half: bool = half) -> None:
            nonlocal conf
            with create_engine("torch-cuda", ckpt, imgsz=imgsz, half=half) as eng:
                if conf is None:
                    from mocha_edge.deploy.pipeline import Pipeline

                    conf, n = pick_conf(Pipeline(eng, facts=facts, gpu_stages="off"), frames)
                    res["student"].update(conf=conf, detections_at_conf=n)
                    print(f"conf {conf}: {n} detections on the C stages ({row['precision']})", flush=True)
                check_pair(row, eng, frames, conf, facts, no_cuda_lib, runs)

        run_row(rows, {"engine": "torch-cuda", "precision": "fp16" if half else "fp32"}, torch_row)

    trt = engines["trt"]
    if not trt["available"]:
        for prec in ("fp16", "int8"):
            rows.append({"engine": "trt", "precision": prec, "status": "skip", "reason": trt["reason"]})
        print(f"TensorRT engines: skipped ({trt['reason']})", flush=True)
        return
    from mocha_edge.export.exporter import ExportOptions, run_export

    arts: dict[str, Any] = {}

    def trt_row(row: dict[str, Any]) -> None:
        prec = row["precision"]
        if not arts:  # both engines from one export: FP16, and INT8 from the Q/DQ ONNX calibrated on `data`
            t = time.perf_counter()
            opts = ExportOptions(fmt="engine", fp16=True, int8=True, calib=data, imgsz=imgsz, report=False,
                                 out=work / "trt" / "student.onnx")  # fmt: skip
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                arts.update(run_export(Path(ckpt), opts, log=lambda m: print(m, flush=True))["artefacts"])
            for w in caught:
                print("warning:", w.message)
            arts["build_s"] = round(time.perf_counter() - t, 1)
        row["artefact"], row["build_s"] = Path(arts[f"{prec}_engine"]).name, arts["build_s"]
        with create_engine("trt", arts[f"{prec}_engine"]) as eng:
            x = np.random.default_rng(0).random(eng.input_shape, dtype=np.float32).astype(eng.dtype)
            ms = []
            for _ in range(runs):
                t = time.perf_counter()
                eng.run(x)
                ms.append((time.perf_counter() - t) * 1e3)
            p50, p90 = np.percentile(ms, [50, 90])
            row["engine_ms"] = {"p50": float(p50), "p90": float(p90), "runs": runs,
                                "cuda_graph": getattr(eng, "graph_note", "")}  # fmt: skip
            print(f"TensorRT {prec}: p50 {p50:.3f} ms, p90 {p90:.3f} ms over {runs} runs (host->device->host)",
                  flush=True)  # fmt: skip
            check_pair(row, eng, frames, conf or 0.1, eng.facts or facts, no_cuda_lib, runs)

    for prec in ("fp16", "int8"):
        run_row(rows, {"engine": "trt", "precision": prec}, trt_row)


def main(out: Path) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach the network (the GPU machine has none)
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"status": "skip", "reason": "", "rows": []}
    work = Path(tempfile.mkdtemp(prefix="mocha_gpu_check_"))
    t0 = time.perf_counter()
    try:
        checks(res, work)
    except Exception as e:
        traceback.print_exc()
        res.update(status="fail", reason=f"{type(e).__name__}: {str(e)[:400]}")
    finally:
        if not os.environ.get("GPU_CHECK_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    rows = res["rows"]
    if res["status"] != "fail" and rows:
        failed = [f"{r['engine']} {r['precision']}" for r in rows if r.get("status") == "fail"]
        passed = [f"{r['engine']} {r['precision']}" for r in rows if r.get("status") == "pass"]
        if failed:
            res.update(status="fail", reason=f"failed: {', '.join(failed)}")
        elif passed:
            skipped = [f"{r['engine']} {r['precision']}" for r in rows if r.get("status") == "skip"]
            res.update(status="pass", reason=f"skipped: {', '.join(skipped)}" if skipped else "")
        else:
            res.update(status="skip", reason="; ".join(sorted({r.get("reason", "") for r in rows})))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    (out / RESULTS).write_text(json.dumps(res, indent=2) + "\n")
    print(f"gpu_check.py: {res['status']}{': ' + res['reason'] if res['reason'] else ''} ({out / RESULTS})")
    return 1 if res["status"] == "fail" else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check")))
