"""``mocha-edge eval``: episodic few-shot evaluation on *instance* labels, several models, same episodes.

Per episode: support boxes -> prototypes (normalised mean of normalised shots per instance); every query
detection takes the identity of its nearest prototype (conditional: within its predicted coarse class;
global: all) and the score ``det_conf · max(cos, 0)``; mAP50 and mAP50-95 over the episode's query images
come from ultralytics' metrics (``match_predictions`` + ``ap_per_class``). Reported: mean over episodes and
the 95 % confidence half-width (Student t). No "unknown" threshold here: mAP ranks every detection.

Rows: each ``--model NAME=PATH`` (``NAME`` ending in ``+translator`` keeps the translator), ``teacher``
(teacher vectors from the cache on ground-truth boxes, score = cosine: the ceiling) and ``random_init``
(a freshly initialised student of the same architecture pooled on the first model's detections: the floor).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from mocha_edge.data.dataset import Dataset, Episode
from mocha_edge.errors import MochaError
from mocha_edge.prototypes import l2n, match

IOUV = torch.linspace(0.5, 0.95, 10)


class EvalError(MochaError):
    """The evaluation cannot run (no episodes, no instance labels, missing cache rows...)."""


@dataclass
class Views:
    """What one model sees: vectors of every support box, detections (+vectors) of every query image."""

    support: dict[tuple[Path, int], np.ndarray]  # (image, box index) -> vector
    query: dict[Path, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # boxes_px, scores, cls, vectors


def sample_episodes(ds: Dataset, shots: int, n: int, seed: int) -> list[Episode]:
    """Episodes for a dataset without ``episodes.json``: per instance, ``shots`` support images drawn
    (seeded) among the images holding it; queries are the evaluation images not used as support."""
    split = "novel" if "novel" in ds.splits else ("val" if "val" in ds.splits else next(iter(ds.splits)))
    items = [it for it in ds.items(split) if len(it.instance) and (it.instance >= 0).all()]
    by_inst: dict[int, list[Path]] = {}
    for it in items:
        for i in set(it.instance.tolist()):
            by_inst.setdefault(int(i), []).append(it.path)
    rng = np.random.default_rng(seed)
    eps = []
    for _ in range(n):
        sup: list[Path] = []
        for inst in sorted(by_inst):
            pool = [p for p in by_inst[inst] if p not in sup]
            if len(pool) < shots:
                continue
            sup += [pool[j] for j in rng.choice(len(pool), shots, replace=False)]
        qry = [it.path for it in items if it.path not in set(sup)]
        eps.append(Episode(shots, sup, qry))
    return eps


def _student_views(
    student, ds: Dataset, support: set[Path], query: set[Path], conf: float, det_source=None
) -> Views:
    from mocha_edge.infer import read_bgr

    items = {it.path: it for it in ds.items()}
    sup: dict[tuple[Path, int], np.ndarray] = {}
    sup_paths = sorted(support)
    for s in range(0, len(sup_paths), 16):
        chunk = sup_paths[s : s + 16]
        imgs = [read_bgr(p) for p in chunk]
        boxes = [
            items[p].boxes * np.array([im.shape[1], im.shape[0]] * 2, np.float32)
            for p, im in zip(chunk, imgs)
        ]
        for p, vecs in zip(chunk, student.embed_batch(imgs, boxes)):
            for j, v in enumerate(vecs):
                sup[(p, j)] = v
    qry = {}
    paths = sorted(query)
    for s in range(0, len(paths), 16):
        chunk = paths[s : s + 16]
        imgs = [read_bgr(p) for p in chunk]
        if det_source is None:
            dets = student.detect(imgs, conf=conf)
            for p, d in zip(chunk, dets):
                qry[p] = (d.boxes, d.scores, d.cls, d.vectors)
        else:  # pool this student's vectors on another model's detections (random_init floor)
            for p, img in zip(chunk, imgs):
                b, sc, c, _ = det_source.query[p]
                qry[p] = (
                    b,
                    sc,
                    c,
                    student.embed(img, b) if len(b) else np.zeros((0, student.dim), np.float32),
                )
    return Views(sup, qry)


def _teacher_views(cache, ds: Dataset, support: set[Path], query: set[Path]) -> Views:
    items = {it.path: it for it in ds.items()}
    vecs = cache.raw.astype(np.float32) if cache.raw is not None else cache.targets

    def rows(it):
        out = [cache.index_of(it.content_hash, b) for b in it.boxes]
        if any(r is None for r in out):
            raise EvalError(
                f"{cache.path}: no teacher target for boxes of {it.path}; rebuild it with `mocha-edge teach`"
            )
        return out

    sup = {}
    for p in sorted(support):
        for j, r in enumerate(rows(items[p])):
            sup[(p, j)] = vecs[r]
    qry = {}
    gt_px = _gt_pixels(ds, query)
    for p in sorted(query):
        it = items[p]
        r = rows(it)
        qry[p] = (gt_px[p], np.ones(len(r), np.float32), it.cls.copy(),
                  vecs[r] if r else np.zeros((0, vecs.shape[1]), np.float32))  # fmt: skip
    return Views(sup, qry)


def _gt_pixels(ds: Dataset, paths: set[Path]) -> dict[Path, np.ndarray]:
    from mocha_edge.data.images import image_size

    items = {it.path: it for it in ds.items()}
    out = {}
    for p in paths:
        w, h = image_size(p)
        out[p] = items[p].boxes * np.array([w, h, w, h], np.float32)
    return out


def _episode_map(
    ds: Dataset,
    ep: Episode,
    views: Views,
    mode: str,
    gt_px: dict[Path, np.ndarray],
    items: dict[Path, Any] | None = None,
) -> tuple[float, float]:
    """mAP50 / mAP50-95 of one episode; ``items`` (path -> ImageItem) may be passed to avoid rebuilding it."""
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class, box_iou

    if items is None:
        items = {it.path: it for it in ds.items()}
    shots: dict[int, list[np.ndarray]] = {}
    for p in ep.support:
        it = items[p]
        for j, inst in enumerate(it.instance.tolist()):
            shots.setdefault(int(inst), []).append(views.support[(p, j)])
    inst_ids = sorted(shots)
    protos = np.stack([l2n(np.stack([l2n(v) for v in shots[i]]).mean(0)) for i in inst_ids])
    proto_cls = np.asarray([ds.idmap[i] for i in inst_ids], np.int64)
    matcher = SimpleNamespace(iouv=IOUV)
    tps, confs, pcls, tcls = [], [], [], []
    for p in ep.query:
        it = items[p]
        boxes, scores, cls, vecs = views.query[p]
        gt = torch.from_numpy(gt_px[p])
        gt_ids = torch.from_numpy(it.instance.astype(np.int64))
        tcls.append(it.instance.astype(np.int64))
        if len(scores) == 0:
            continue
        idx, sim = match(vecs, cls, protos, proto_cls, mode)
        keep = idx >= 0
        ident = np.where(keep, np.asarray(inst_ids)[np.maximum(idx, 0)], -1)
        score = scores * np.maximum(sim, 0) * keep
        order = np.argsort(-score, kind="stable")
        order = order[keep[order]]
        if len(order) == 0:
            continue
        pred = torch.from_numpy(ident[order])
        iou = box_iou(gt, torch.from_numpy(np.asarray(boxes)[order]))
        correct = BaseValidator.match_predictions(matcher, pred, gt_ids, iou)
        tps.append(correct.numpy())
        confs.append(score[order])
        pcls.append(ident[order])
    target = np.concatenate(tcls) if tcls else np.zeros(0)
    if not tps or len(target) == 0:
        return 0.0, 0.0
    ap = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), target)[5]
    return 100.0 * float(ap[:, 0].mean()), 100.0 * float(ap.mean())


def _ci95(x: np.ndarray) -> float:
    if len(x) < 2:
        return 0.0
    from scipy import stats

    return float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def evaluate(
    ds: Dataset,
    models: dict[str, Any],
    shots: list[int],
    n_episodes: int,
    matches: tuple[str, ...] = ("conditional", "global"),
    teacher_cache: Any = None,
    random_init: bool = False,
    conf: float = 0.001,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate every model on the same episodes; returns the JSON-ready report."""
    if not ds.has_instances:
        raise EvalError(
            f"{ds.source}: episodic evaluation needs instance labels (MOCHA layout: fine_names + idmap)"
        )
    episodes: dict[int, list[Episode]] = {}
    for k in shots:
        eps = ds.episodes.get(k)
        episodes[k] = eps[:n_episodes] if eps else sample_episodes(ds, k, n_episodes, seed + k)
        if not episodes[k]:
            raise EvalError(f"{ds.source}: no {k}-shot episode could be built")
    support = {p for eps in episodes.values() for ep in eps for p in ep.support}
    query = {p for eps in episodes.values() for ep in eps for p in ep.query}

    views: dict[str, Views] = {}
    for name, student in models.items():
        t0 = time.perf_counter()
        views[name] = _student_views(student, ds, support, query, conf)
        log(f"{name}: {len(support)} support + {len(query)} query images in {time.perf_counter() - t0:.1f} s")
    if random_init:
        if not models:
            raise EvalError("the random_init row needs at least one --model (its detections are reused)")
        from mocha_edge.infer import Student

        first = next(iter(models))
        views["random_init"] = _student_views(
            Student.random_init(models[first], seed), ds, support, query, conf, det_source=views[first]
        )
    if teacher_cache is not None:
        views["teacher"] = _teacher_views(teacher_cache, ds, support, query)

    gt_px = _gt_pixels(ds, query)
    items = {it.path: it for it in ds.items()}
    results = []
    for name, v in views.items():
        for mode in matches:
            for k, eps in episodes.items():
                m = np.asarray([_episode_map(ds, ep, v, mode, gt_px, items) for ep in eps])
                results.append(
                    {
                        "model": name, "match": mode, "shots": k, "episodes": len(eps),
                        "map50": float(m[:, 0].mean()), "map50_95": float(m[:, 1].mean()),
                        "ci95_map50": _ci95(m[:, 0]), "ci95_map50_95": _ci95(m[:, 1]),
                    }
                )  # fmt: skip
    return {
        "dataset": str(ds.source),
        "score": "det_conf * max(cosine, 0)",
        "conf": conf,
        "episodes_source": {
            k: ("episodes file" if ds.episodes.get(k) else f"sampled, seed {seed + k}") for k in shots
        },
        "results": results,
    }


def detection_map(model: Any, ds: Dataset, split: str = "val", conf: float = 0.001) -> tuple[float, float]:
    """Coarse-class detection mAP50 / mAP50-95 (points) of any model with ``detect(images)`` on a split."""
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class, box_iou

    from mocha_edge.infer import read_bgr

    items = ds.items(split)
    gt_px = _gt_pixels(ds, {it.path for it in items})
    matcher = SimpleNamespace(iouv=IOUV)
    tps, confs, pcls, tcls = [], [], [], []
    for it in items:
        d = model.detect([read_bgr(it.path)], conf=conf)[0]
        tcls.append(it.cls)
        if len(d) == 0:
            continue
        order = np.argsort(-d.scores, kind="stable")
        iou = box_iou(torch.from_numpy(gt_px[it.path]), torch.from_numpy(d.boxes[order]))
        tps.append(
            BaseValidator.match_predictions(
                matcher, torch.from_numpy(d.cls[order]), torch.from_numpy(it.cls), iou
            ).numpy()
        )
        confs.append(d.scores[order])
        pcls.append(d.cls[order])
    if not tps:
        return 0.0, 0.0
    ap = ap_per_class(np.concatenate(tps), np.concatenate(confs), np.concatenate(pcls), np.concatenate(tcls))[
        5
    ]
    return 100.0 * float(ap[:, 0].mean()), 100.0 * float(ap.mean())


def format_table(report: dict[str, Any]) -> str:
    """Markdown table of a report's rows."""
    lines = [
        "| model | match | shots | mAP50 | ±95% | mAP50-95 | episodes |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['match']} | {r['shots']} | {r['map50']:.1f} | {r['ci95_map50']:.1f} | "
            f"{r['map50_95']:.1f} | {r['episodes']} |"
        )
    return "\n".join(lines)
