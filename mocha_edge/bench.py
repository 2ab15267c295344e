"""``mocha-edge bench``: latency per stage for every backend and precision this machine has, next to
ultralytics' own predictor on the same student and frames, measured in the same run.

Stages (as in ``runtime/README.md``): *capture* = decode the next frame (file / video), *pre* = BGR frame
-> input tensor, *infer* = the graph, *post* = raw outputs -> boxes in frame pixels (decode + NMS),
*pool* = object vectors, *match* = prototype matching. ``e2e`` = pre + infer + post + pool + match of one
frame (capture runs in its own thread in ``mocha-edge run``). *track* = what ``run --tracker bytetrack`` adds
to a frame: ByteTrack + one identity per track (running mean matched against the bank) + events, timed on
``TRACK_DETECTIONS`` synthetic detections moving smoothly over the row's frames (``track_vs_e2e``: its p50 over
the row's e2e p50, same run). Reference per row: ultralytics' predictor on
ultralytics' plain export of the same student at the same size (ONNX Runtime rows: its ONNX; the PyTorch
row: its ``.pt``), warmed up, same frames, same ONNX Runtime threads.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mocha_edge.errors import MochaError

if TYPE_CHECKING:
    from mocha_edge.deploy.config import DeployConfig
from mocha_edge.utils import atomic_path, keep_torch_threads, write_json_atomic

STAGES = ("capture", "pre", "infer", "post", "pool", "match", "track")
TRACK_DETECTIONS = 20  # detections per frame of the track stage (a busy scene)
BENCH_FORMAT = "mocha-edge-bench/1"


class BenchError(MochaError):
    """A benchmark cannot run (no frames, missing model, unknown backend)."""


@dataclass
class BenchOptions:
    backends: tuple[str, ...] = ("torch", "torch-cuda", "ort", "trt")  # registry engine names
    precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    imgsz: tuple[int, ...] = ()  # default: the model's own size
    frames: int = 100
    warmup: int = 10
    conf: float = 0.25
    iou: float = 0.7
    source: str | None = None  # images / folder / video; default: ultralytics' bundled photos
    calib: str | None = None  # dataset for INT8 calibration when the model is a checkpoint
    prototypes: int = 1000  # synthetic bank size for the match stage
    mode: str = "conditional"
    threads: int | None = None
    reference: bool = True
    work: Path | None = None
    log: Callable[[str], None] = print
    extra: dict[str, Any] = field(default_factory=dict)


def percentiles(ms: Sequence[float]) -> dict[str, float]:
    """``{"p50", "p90", "p99", "mean"}`` of a list of milliseconds (NaN when empty)."""
    a = np.asarray(ms, np.float64)
    if not len(a):
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    p = np.percentile(a, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]), "mean": float(a.mean())}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if platform.system() != "Darwin" else r / 2**20


# ------------------------------------------------------------------------------------------------ frames
def default_source() -> str:
    """ultralytics' bundled photos (bus.jpg 810x1080, zidane.jpg 1280x720): offline and realistic sizes."""
    import ultralytics

    return str(Path(ultralytics.__file__).parent / "assets")


def load_frames(
    source: str, n: int, log: Callable[[str], None] = print
) -> tuple[list[np.ndarray], list[float]]:
    """Up to ``n`` frames from ``source``, opened exactly as ``run`` opens it (image, folder, video,
    ``rtsp://``, ``v4l2://``, ``csi://``, with their options): ``(frames, capture ms per frame)``."""
    from mocha_edge.deploy.sources import SourceError, open_source

    frames: list[np.ndarray] = []
    times: list[float] = []
    try:
        with open_source(source, warn=lambda m: log(f"warning: {m}")) as src:
            it = iter(src)
            while len(frames) < n:
                t = time.perf_counter()
                frame = next(it, None)
                if frame is None:
                    break
                times.append((time.perf_counter() - t) * 1e3)
                frames.append(frame.image_bgr)
    except SourceError as e:
        raise BenchError(str(e)) from None
    if not frames:
        raise BenchError(f"{source}: no readable frame")
    return frames, times


def synthetic_bank(dim: int, names: list[str], n: int, seed: int = 0, space: str = "none"):
    """A bank of ``n`` random unit prototypes spread over the classes, threshold 0.5 each (the match
    stage's cost only); ``dim`` / ``space``: the model's matching space."""
    from mocha_edge.prototypes import Identity, PrototypeBank, l2n

    bank = PrototypeBank(dim=dim, model_fingerprint="bench", class_names=list(names), space=space)
    shots = l2n(np.random.default_rng(seed).normal(size=(n, 1, dim)).astype(np.float32))
    for i in range(n):  # filled directly: add() re-calibrates the thresholds each time
        bank.identities[f"obj{i:05d}"] = Identity(f"obj{i:05d}", i % len(names), shots[i], threshold=0.5)
    return bank


# ------------------------------------------------------------------------------------------------ rows
def time_pipeline(pipe: Any, frames: list[np.ndarray], warmup: int) -> dict[str, list[float]]:
    """Run the pipeline over ``frames`` (after ``warmup`` calls) collecting ``pipe.timings`` per frame."""
    for i in range(warmup):
        pipe(frames[i % len(frames)])
    out: dict[str, list[float]] = {}
    n_dets = []
    for f in frames:
        t = time.perf_counter()
        d = pipe(f)
        e2e = (time.perf_counter() - t) * 1e3
        for k, v in pipe.timings.items():
            out.setdefault(k, []).append(float(v))
        out.setdefault("e2e", []).append(e2e)
        n_dets.append(len(d.scores))
    out["detections"] = [float(x) for x in n_dets]
    return out


def time_tracking(pipe: Any, frames: list[np.ndarray], warmup: int, n_dets: int = TRACK_DETECTIONS,
                  kind: str = "bytetrack", seed: int = 0) -> list[float]:  # fmt: skip
    """ms per frame of ``run``'s tracking stage (:func:`~mocha_edge.deploy.tracking.track_frame`: tracker,
    track identities against ``pipe``'s bank, events) on ``n_dets`` synthetic detections per frame: objects
    of the model's classes drifting a few pixels a frame with box jitter, unit object vectors near a fixed
    one per object. The frames are only the tracker's images; ``pipe``'s detector is not run."""
    from types import SimpleNamespace

    from mocha_edge.deploy.tracking import TrackIdentities, make_tracker, track_frame

    rng = np.random.default_rng(seed)
    h, w = frames[0].shape[:2]
    side = 0.12 * min(w, h)
    pos = rng.uniform([side, side], [w - side, h - side], (n_dets, 2))
    vel = rng.normal(0, 2.0, (n_dets, 2))
    cls = rng.integers(0, max(len(pipe.names), 1), n_dets).astype(np.int64)
    base = rng.normal(size=(n_dets, pipe.dim)).astype(np.float32)
    tracker = make_tracker(kind, 30.0, conf=getattr(pipe, "conf", None))  # as run makes it
    idents = TrackIdentities("bench", list(pipe.names), snapshots=False)
    out: list[float] = []
    for i in range(warmup + len(frames)):
        pos = np.clip(pos + vel, side, [w - side, h - side])
        c = pos + rng.normal(0, 1.0, pos.shape)
        boxes = np.concatenate([c - side / 2, c + side / 2], 1).astype(np.float32)
        dets = SimpleNamespace(boxes=boxes, scores=rng.uniform(0.5, 0.95, n_dets).astype(np.float32), cls=cls,
                               vectors=base + 0.1 * rng.normal(size=base.shape).astype(np.float32),
                               identity=np.full(n_dets, -1, np.int64), similarity=np.zeros(n_dets, np.float32))  # fmt: skip
        frame = SimpleNamespace(t=i / 30.0, index=i, image_bgr=frames[i % len(frames)])
        t = time.perf_counter()
        track_frame(tracker, idents, pipe, frame, dets)
        if i >= warmup:
            out.append((time.perf_counter() - t) * 1e3)
    return out


def ultralytics_reference(model_file: str, frames: list[np.ndarray], imgsz: int, conf: float, iou: float,
                          warmup: int) -> dict[str, float]:  # fmt: skip
    """ultralytics' predictor on ``model_file`` (its own .pt or ONNX export): p50 ms per stage, timed with
    the torch CPU threads our rows run with (its first ``predict`` sets ``cpu_count - 1``: put back)."""
    import torch
    from ultralytics import YOLO

    with keep_torch_threads() as threads:
        m = YOLO(model_file, task="detect")
        for i in range(max(1, warmup)):
            m.predict(frames[i % len(frames)], imgsz=imgsz, conf=conf, iou=iou, verbose=False)
            torch.set_num_threads(threads)
        pre, inf, post = [], [], []
        for f in frames:
            sp = m.predict(f, imgsz=imgsz, conf=conf, iou=iou, verbose=False)[0].speed
            pre.append(sp["preprocess"])
            inf.append(sp["inference"])
            post.append(sp["postprocess"])
    pp = [a + b for a, b in zip(pre, post)]
    e2e = [a + b + c for a, b, c in zip(pre, inf, post)]
    return {
        "ultralytics_pre_ms_p50": float(np.median(pre)), "ultralytics_model_ms_p50": float(np.median(inf)),
        "ultralytics_post_ms_p50": float(np.median(post)), "ultralytics_pre_post_ms_p50": float(np.median(pp)),
        "ultralytics_e2e_ms_p50": float(np.median(e2e)),
    }  # fmt: skip


def row_from_times(backend: str, precision: str, imgsz: int, times: dict[str, list[float]],
                   capture: list[float]) -> dict[str, Any]:  # fmt: skip
    """One JSON row: p50 per stage under the schema's keys + p50/p90/p99 of every stage."""
    stages = {"capture": percentiles(capture)}
    for k in ("pre", "infer", "post", "pool", "match", "track", "e2e"):
        stages[k] = percentiles(times.get(k, []))
    e2e = stages["e2e"]
    track = stages["track"]["p50"]
    return {
        "backend": backend, "precision": precision, "imgsz": imgsz,
        "model_ms_p50": stages["infer"]["p50"], "pre_ms_p50": stages["pre"]["p50"],
        "post_ms_p50": stages["post"]["p50"],
        "pool_ms_p50": stages["pool"]["p50"], "match_ms_p50": stages["match"]["p50"],
        "capture_ms_p50": stages["capture"]["p50"],
        "track_ms_p50": track, "track_vs_e2e": track / e2e["p50"] if e2e["p50"] > 0 else float("nan"),
        "e2e_ms_p50": e2e["p50"], "fps": 1000.0 / e2e["mean"] if e2e["mean"] > 0 else float("nan"),
        "detections_per_frame": float(np.mean(times.get("detections", [0.0]))),
        "stages": stages, "peak_rss_mb": peak_rss_mb(), "gpu_mem_mb": None,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ output
def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a Markdown table (p50 ms; ratio = ours / ultralytics, e2e and pre+post)."""
    head = ("| backend | precision | imgsz | pre | infer | post | pool+match | e2e | FPS | track (% e2e) "
            "| ultralytics e2e | e2e ratio | pre+post ratio |")  # fmt: skip
    lines = [head, "|" + "---|" * 13]
    for r in result["rows"]:
        ue2e, upp = r.get("ultralytics_e2e_ms_p50"), r.get("ultralytics_pre_post_ms_p50")
        ratio = f"{r['e2e_ms_p50'] / ue2e:.2f}" if ue2e else "–"
        pp = f"{(r['pre_ms_p50'] + r['post_ms_p50']) / upp:.2f}" if upp else "–"
        tr = r.get("track_ms_p50")
        track = f"{tr:.2f} ({100 * r['track_vs_e2e']:.1f} %)" if tr is not None and tr == tr else "–"
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r['imgsz']} | {r['pre_ms_p50']:.2f} | {r['model_ms_p50']:.2f} "
            f"| {r['post_ms_p50']:.2f} | {r['pool_ms_p50'] + r['match_ms_p50']:.2f} | {r['e2e_ms_p50']:.2f} "
            f"| {r['fps']:.1f} | {track} | {'–' if not ue2e else f'{ue2e:.2f}'} | {ratio} | {pp} |"
        )
    return "\n".join(lines)


def chart(result: dict[str, Any], dest: Path) -> Path:
    """Stacked bars of the p50 stages per row, ultralytics' e2e as a marker (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['backend']} {r['precision']}\n{r['imgsz']}" for r in rows]
    keys = [("pre_ms_p50", "pre"), ("model_ms_p50", "infer"), ("post_ms_p50", "post"),
            ("pool_ms_p50", "pool"), ("match_ms_p50", "match")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows) + 2), 4))
    bottom = np.zeros(len(rows))
    for k, name in keys:
        v = np.array([r[k] for r in rows], float)
        ax.bar(labels, v, bottom=bottom, label=name)
        bottom += v
    ref = [r.get("ultralytics_e2e_ms_p50") for r in rows]
    if any(ref):
        ax.scatter(
            labels, [x if x else np.nan for x in ref], marker="_", s=900, c="k", label="ultralytics e2e"
        )
    ax.set_ylabel("ms per frame (p50)")
    ax.set_title(f"mocha-edge bench — {result['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return dest


def write_outputs(result: dict[str, Any], json_path: Path) -> dict[str, Path]:
    """``OUT.json`` + ``OUT.md`` + ``OUT.png`` (each atomically)."""
    json_path = Path(json_path)
    write_json_atomic(json_path, result)
    md = json_path.with_suffix(".md")
    with atomic_path(md) as tmp:
        Path(tmp).write_text(markdown_table(result) + "\n")
    return {"json": json_path, "md": md, "png": chart(result, json_path.with_suffix(".png"))}


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Ratios B / A per row present in both (keyed by backend, precision, imgsz)."""
    key = lambda r: (r["backend"], r["precision"], r["imgsz"])  # noqa: E731
    rows_a = {key(r): r for r in a["rows"]}
    cols = ("pre_ms_p50", "model_ms_p50", "post_ms_p50", "match_ms_p50", "e2e_ms_p50", "fps")
    lines = [f"B / A   (A: {a.get('device')}; B: {b.get('device')})",
             "| backend | precision | imgsz | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]  # fmt: skip
    shared = 0
    for r in b["rows"]:
        ra = rows_a.get(key(r))
        if ra is None:
            continue
        shared += 1
        cells = [f"{r[c] / ra[c]:.2f}" if ra.get(c) else "–" for c in cols]
        lines.append(f"| {r['backend']} | {r['precision']} | {r['imgsz']} | " + " | ".join(cells) + " |")
    if not shared:
        raise BenchError("the two benchmark files share no (backend, precision, imgsz) row")
    return "\n".join(lines)


def load_result(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise BenchError(f"{p}: no such file") from None
    except json.JSONDecodeError as e:
        raise BenchError(f"{p}: not JSON ({e.msg}, line {e.lineno})") from None
    if d.get("format") != BENCH_FORMAT or "rows" not in d:
        raise BenchError(f"{p}: not a mocha-edge bench result")
    return d


def device_name() -> str:
    """``"<cpu model>, N cores"`` (+ the CUDA device when torch sees one)."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            out += f"; {torch.cuda.get_device_name(0)}"
    except Exception:  # a broken torch must not stop a CPU bench
        pass
    return out


def artefact_for(engine: str, precision: str, plan: dict[str, Any]) -> Path | None:
    """The file engine ``engine`` runs at ``precision`` for one bench plan (None: not a configuration here).

    PyTorch runs the checkpoint at FP32; ONNX Runtime the FP32 or the INT8 (Q/DQ) ONNX; TensorRT its FP16 or
    INT8 engine built beside the ONNX."""
    from mocha_edge.deploy.engines import engine_spec

    spec = engine_spec(engine)
    for cand in (plan.get("ckpt") if precision == "fp32" else None, plan.get(precision),
                 plan.get(f"{precision}_engine")):  # fmt: skip
        if cand is not None and Path(cand).suffix.lower() in spec.suffixes:
            return Path(cand)
    return None


def _ckpt_of(model: Path, facts: DeployConfig | None) -> Path | None:
    if model.suffix in (".ckpt", ".pt"):
        return model
    src = Path(facts.source if facts is not None else "")
    return src if src.suffix in (".ckpt", ".pt") and src.is_file() else None


def _ultralytics_pt(ckpt: Path) -> Path | None:
    """The plain ultralytics ``student.pt`` written beside a run's checkpoint (or the .pt itself)."""
    p = ckpt if ckpt.suffix == ".pt" else ckpt.with_name("student.pt")
    return p if p.is_file() else None


def _plan(model: Path, opts: BenchOptions, work: Path) -> list[dict[str, Any]]:
    """Per input size: the FP32 ONNX, the INT8 ONNX (if any), engines, the checkpoint and its facts."""
    from mocha_edge.deploy.config import DeployConfig
    from mocha_edge.export.exporter import ExportOptions, artefact_path, cpu_int8_artefact, run_export
    from mocha_edge.infer import Student

    if not model.exists():
        raise BenchError(f"{model}: no such model")
    if model.suffix == ".onnx":
        facts = DeployConfig.for_model(model)
        base_sizes = [facts.imgsz]
    elif model.suffix in (".ckpt", ".pt"):
        facts = None
        base_sizes = [Student.load(model).imgsz]
    else:
        raise BenchError(f"{model}: give a checkpoint (.ckpt/.pt) or an .onnx from `mocha-edge export`")
    ckpt = _ckpt_of(model, facts)
    want_int8 = "int8" in opts.precisions and opts.calib is not None
    plans = []
    for s in opts.imgsz or base_sizes:
        p: dict[str, Any] = {"imgsz": int(s), "ckpt": ckpt}
        onnx = model if model.suffix == ".onnx" and int(s) == facts.imgsz else None  # type: ignore[union-attr]
        if onnx is None or (want_int8 and cpu_int8_artefact(onnx) is None):
            if ckpt is None:
                raise BenchError(f"{model}: imgsz {s} needs the checkpoint it was exported from (not found)")
            onnx = work / f"student_{s}.onnx"
            run_export(ckpt, ExportOptions(imgsz=int(s), int8=want_int8, calib=Path(opts.calib) if want_int8 else None,
                                           report=False, out=onnx), log=lambda _: None)  # fmt: skip
        p["fp32"] = onnx
        if (int8 := cpu_int8_artefact(onnx)) is not None:
            p["int8"] = int8
        for prec in ("fp16", "int8"):
            if (eng := artefact_path(onnx, prec, "engine")).is_file():
                p[f"{prec}_engine"] = eng
        p["facts"] = DeployConfig.for_model(onnx)
        plans.append(p)
    return plans


def _make_engine(name: str, path: Path, imgsz: int, opts: BenchOptions):
    """Engine ``name`` on ``path`` from the registry; ONNX Runtime with ``opts.threads`` or, by default, the
    faster of 1 / all cores on this machine."""
    from mocha_edge.deploy.engines import create_engine

    if name == "ort" and not opts.threads:
        return _fastest_engine(path, np.zeros((1, 3, imgsz, imgsz), np.float32))
    if name in ("torch", "torch-cuda"):
        return create_engine(name, path, imgsz=imgsz)
    return create_engine(name, path, threads=opts.threads)


def _fastest_engine(path: Path, x: np.ndarray, rounds: int = 5, per_round: int = 8):
    """ONNX Runtime intra-op threads for this graph on this machine, by measurement: 1 vs all cores,
    rounds interleaved so both settings see the same machine load; the engine with the lower median."""
    import os

    from mocha_edge.deploy.engines import create_engine

    cores = os.cpu_count() or 1
    engines = {th: create_engine("ort", path, threads=th) for th in sorted({1, cores})}
    times: dict[int, list[float]] = {th: [] for th in engines}
    for eng in engines.values():
        for _ in range(3):
            eng.run(x)
    for _ in range(rounds if len(engines) > 1 else 0):
        for th, eng in engines.items():
            for _ in range(per_round):
                t = time.perf_counter()
                eng.run(x)
                times[th].append(time.perf_counter() - t)
    return engines[min(times, key=lambda th: float(np.median(times[th] or [0.0])))]


def run_bench(model: str | Path, opts: BenchOptions) -> dict[str, Any]:
    """Measure every available (backend, precision, imgsz) row; see the module docstring."""
    import shutil
    import tempfile

    from mocha_edge.deploy.config import load_space
    from mocha_edge.deploy.engines import availability
    from mocha_edge.deploy.pipeline import Pipeline
    from mocha_edge.space import match_dim, space_id
    from mocha_edge.utils import offline_env

    offline_env()
    log = opts.log
    model = Path(model)
    tmp = None
    if opts.work is None:
        tmp = tempfile.mkdtemp(prefix="mocha-bench-")
        work = Path(tmp)
    else:
        work = Path(opts.work)
        work.mkdir(parents=True, exist_ok=True)
    try:
        source = opts.source or default_source()
        frames, capture = load_frames(source, opts.frames, log)
        log(f"{len(frames)} frames from {source} ({frames[0].shape[1]}x{frames[0].shape[0]})")
        rows: list[dict[str, Any]] = []
        skipped: list[str] = []
        for plan in _plan(model, opts, work):
            s, facts = plan["imgsz"], plan["facts"]
            sp = load_space(facts, plan["fp32"])
            bank = synthetic_bank(match_dim(sp, facts.vector_dim), list(facts.names), opts.prototypes,
                                  space=space_id(sp))  # fmt: skip
            bank.model_fingerprint = facts.model_fingerprint
            candidates: list[tuple[str, str, Any]] = []
            for avail in availability(list(opts.backends)):
                backend = avail["name"]
                if not avail["available"]:
                    skipped.append(f"{backend}: {avail['reason']}")
                    continue
                for prec in opts.precisions:
                    art = artefact_for(backend, prec, plan)
                    if art is None:
                        skipped.append(
                            f"{backend} {prec} {s}: no artefact / not a deployment configuration here"
                        )
                        continue
                    candidates.append(
                        (backend, prec, lambda b=backend, a=art, z=s: _make_engine(b, a, z, opts))
                    )
            ref_cache: dict[str, dict[str, float]] = {}
            for backend, prec, make in candidates:
                log(f"bench {backend} {prec} {s} ...")
                engine = make()
                pipe = Pipeline(engine, conf=opts.conf, iou=opts.iou, bank=bank, mode=opts.mode, facts=facts,
                                space=sp)  # fmt: skip
                times = time_pipeline(pipe, frames, opts.warmup)
                times["track"] = time_tracking(pipe, frames, opts.warmup)
                row = row_from_times(backend, prec, s, times, capture)
                row["threads"] = engine.threads
                row["pre_post_on"] = "gpu" if pipe.gpu_stages is not None else "cpu"
                if opts.reference and backend in ("torch", "ort"):
                    key = "pt" if backend == "torch" else "onnx"
                    if key not in ref_cache:
                        ref_cache[key] = _reference(plan, key, frames, opts, work, log)
                    row.update(ref_cache[key])
                rows.append(row)
                log(f"  e2e p50 {row['e2e_ms_p50']:.2f} ms (pre {row['pre_ms_p50']:.2f}, infer "
                    f"{row['model_ms_p50']:.2f}, post {row['post_ms_p50']:.2f}, match {row['match_ms_p50']:.2f}); "
                    f"track {row['track_ms_p50']:.2f} ms at {TRACK_DETECTIONS} detections "
                    f"({100 * row['track_vs_e2e']:.1f} % of e2e)")  # fmt: skip
        if not rows:
            raise BenchError("no backend/precision could be measured: " + "; ".join(skipped))
        return {
            "format": BENCH_FORMAT, "device": device_name(), "model": str(model), "source": source,
            "frames": len(frames), "frame_size": [int(frames[0].shape[1]), int(frames[0].shape[0])],
            "conf": opts.conf, "iou": opts.iou, "prototypes": opts.prototypes, "mode": opts.mode,
            "rows": rows, "skipped": sorted(set(skipped)), "peak_rss_mb": peak_rss_mb(),
        }  # fmt: skip
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _reference(plan: dict[str, Any], key: str, frames: list[np.ndarray], opts: BenchOptions, work: Path,
               log: Callable[[str], None]) -> dict[str, float]:  # fmt: skip
    """ultralytics' predictor on its own export of the same student (``pt``: PyTorch, ``onnx``: ORT)."""
    import shutil

    ckpt = plan["ckpt"]
    pt = _ultralytics_pt(ckpt) if ckpt is not None else None
    if pt is None:
        log("  (no ultralytics student.pt beside the checkpoint: no reference row)")
        return {}
    s = plan["imgsz"]
    local = work / f"ul_{s}" / "student.pt"
    local.parent.mkdir(parents=True, exist_ok=True)
    if not local.is_file():
        shutil.copy(pt, local)
    target = str(local)
    if key == "onnx":
        from ultralytics import YOLO

        onnx = local.with_suffix(".onnx")
        if not onnx.is_file():
            with keep_torch_threads():
                YOLO(str(local)).export(format="onnx", imgsz=s, simplify=False, dynamic=False, verbose=False)
        target = str(onnx)
    return ultralytics_reference(target, frames, s, opts.conf, opts.iou, opts.warmup)
