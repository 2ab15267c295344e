"""Accuracy report of an export: every precision scored on the same images and episodes (paired).

``{"precisions": {"fp32" | "fp16" | "int8": {"map50", "fewshot_map50", "cosine_vs_fp32", "ms_p50", ...}}}``,
mAP in points (0-100). ``map50``: coarse-class detection mAP50 on the val split (conf 0.001);
``fewshot_map50``: 1-shot personalisation mAP50 (conditional matching) on the dataset's episodes;
``cosine_vs_fp32``: mean cosine between each precision's vector and FP32's for the same ground-truth boxes
(``cosine_vs_fp32_min`` the worst); ``ms_p50``: the graph alone (no pre/post), median over interleaved
rounds so every precision sees the same machine load.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mocha_edge import __version__


def vector_cosines(models: dict[str, Any], ds, n_images: int = 50) -> dict[str, tuple[float, float]]:
    """Mean and min cosine of each model's vectors vs ``models['fp32']`` on the same ground-truth boxes."""
    from mocha_edge.evaluate import _gt_pixels
    from mocha_edge.infer import read_bgr

    items = [it for it in (ds.items("val") or ds.items()) if len(it.boxes)][:n_images]
    imgs = [read_bgr(it.path) for it in items]
    px = _gt_pixels(ds, {it.path for it in items})
    boxes = [px[it.path] for it in items]
    ref = np.concatenate(models["fp32"].embed_batch(imgs, boxes))
    out = {}
    for name, m in models.items():
        v = np.concatenate(m.embed_batch(imgs, boxes))
        cos = (v * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
        out[name] = (float(cos.mean()), float(cos.min())) if len(cos) else (float("nan"), float("nan"))
    return out


def model_latency(
    models: dict[str, Any], rounds: int = 5, per_round: int = 20, warmup: int = 5
) -> dict[str, float]:
    """p50 ms of one graph run per model, rounds interleaved across models (same load for all).

    Each round runs a model ``per_round`` times after 3 untimed runs (a deployment runs one model, whose
    weights stay in cache). Sessions must stop their pools spinning after a run (``ort_session`` does):
    on the 2-core CPU, FP32 and INT8 sessions alternating run by run took 9.4 and 6.5-7.5 ms with spinning
    pools, 4.0-5.3 and 3.0-3.5 ms with spinning stopped."""
    x = np.random.default_rng(0).random((1, 3, *(2 * [next(iter(models.values())).imgsz])), np.float32)
    for m in models.values():
        for _ in range(warmup):
            m.raw(x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            for _ in range(3):
                m.raw(x)
            for _ in range(per_round):
                t = time.perf_counter()
                m.raw(x)
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def accuracy_report(
    models: dict[str, Any],
    ds=None,
    episodes: int = 50,
    extra: dict[str, dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Score every precision in ``models`` (must include ``"fp32"``) on ``ds``; speed on this machine."""
    from mocha_edge.evaluate import detection_map, evaluate

    if "fp32" not in models:
        raise ValueError("the report needs the fp32 model as its reference")
    prec: dict[str, dict[str, Any]] = {k: dict((extra or {}).get(k, {})) for k in models}
    report: dict[str, Any] = {
        "format": "mocha-edge-export-report/1",
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "mocha_edge": __version__,
        "precisions": prec,
    }
    if ds is not None:
        has_val = bool(ds.items("val"))
        report["dataset"] = str(ds.source)
        report["map_split"] = "val" if has_val else "all"
        for k, m in models.items():
            t0 = time.perf_counter()
            m50, m5095 = detection_map(m, ds, "val" if has_val else None)
            prec[k]["map50"], prec[k]["map50_95"] = m50, m5095
            log(f"{k}: val mAP50 {m50:.2f} ({time.perf_counter() - t0:.0f} s)")
        if ds.has_instances:
            # mAP in each artefact's shipped space; the operating point is eval's and the demo's to report
            ev = evaluate(ds, models, [1], episodes, ("conditional",), log=lambda s: None, openset=False)
            for row in ev["results"]:
                prec[row["model"]]["fewshot_map50"] = row["map50"]
                prec[row["model"]]["fewshot_ci95"] = row["ci95_map50"]
                prec[row["model"]]["fewshot_episodes"] = row["episodes"]
            log("1-shot: " + ", ".join(f"{k} {prec[k]['fewshot_map50']:.2f}" for k in models))
        for k, (mean, worst) in vector_cosines(models, ds).items():
            prec[k]["cosine_vs_fp32"], prec[k]["cosine_vs_fp32_min"] = mean, worst
    for k, ms in model_latency(models).items():
        prec[k]["ms_p50"] = ms
    for k in models:
        prec[k]["speedup_vs_fp32"] = prec["fp32"]["ms_p50"] / prec[k]["ms_p50"]
    return report


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table of the report."""
    cols = [("map50", "mAP50 val"), ("fewshot_map50", "1-shot mAP50"), ("cosine_vs_fp32", "cos vs fp32"),
            ("ms_p50", "ms p50"), ("speedup_vs_fp32", "× fp32")]  # fmt: skip
    lines = ["| precision | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, p in report["precisions"].items():
        cells = []
        for key, _ in cols:
            v = p.get(key)
            cells.append("–" if v is None else f"{v:.4f}" if key == "cosine_vs_fp32" else f"{v:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
