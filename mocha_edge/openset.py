"""Open-set identity scoring at the operating point: what a user of ``run`` actually gets.

A detection is *named* when the matcher gives it an identity (nearest prototype at or above that
identity's threshold). Each ground-truth object is matched to at most one detection (IoU >= 0.5, greedy in
descending detection score); then

- a name on an *enrolled* object is right or wrong;
- a name on an *unenrolled* object (same classes, not in the bank), or on a detection that matches no
  object, is a false identification;
- objects marked ``ignore`` (e.g. less than half visible in a video frame) and the detections matched to
  them count for nothing.

``id_precision`` = right names / names given; ``id_recall`` = right names / enrolled objects that were
detected; ``false_id_rate`` = named unenrolled objects / unenrolled objects that were detected;
``det_recall_novel`` = detected / all scored (enrolled + unenrolled) objects. All in points (0-100).
Used by ``eval`` (open-set episodes) and by the demo's scoring of the live run on its video.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

IOU_MATCH = 0.5


@dataclass
class IdCounts:
    """Counts of one image, frame, episode or video (they add up)."""

    named: int = 0  # detections given a name (scored ones: not matched to an ignored object)
    right: int = 0  # names equal to the matched enrolled object's identity
    enrolled_detected: int = 0
    enrolled_named: int = 0  # detected enrolled objects given any name (right or wrong)
    enrolled_total: int = 0
    unenrolled_detected: int = 0
    unenrolled_named: int = 0
    unenrolled_total: int = 0
    unmatched_named: int = 0  # names on detections that match no object (background, duplicates)

    def __iadd__(self, other: IdCounts) -> IdCounts:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def metrics(self) -> dict[str, float]:
        """Points (0-100); NaN where the denominator is 0."""

        def pct(a: int, b: int) -> float:
            return 100.0 * a / b if b else float("nan")

        p, r = pct(self.right, self.named), pct(self.right, self.enrolled_detected)
        f1 = (
            2 * p * r / (p + r)
            if np.isfinite(p) and np.isfinite(r) and p + r > 0
            else (0.0 if np.isfinite(p) and np.isfinite(r) else float("nan"))
        )
        det = self.enrolled_detected + self.unenrolled_detected
        return {
            "id_precision": p,
            "id_recall": r,
            "id_f1": f1,
            "false_id_rate": pct(self.unenrolled_named, self.unenrolled_detected),
            "named_enrolled_rate": pct(self.enrolled_named, self.enrolled_detected),
            "det_recall_novel": pct(det, self.enrolled_total + self.unenrolled_total),
        }


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes ``a (n, 4)`` and ``b (m, 4)``."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_detections(det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """The object each detection is matched to (index into ``gt_boxes``, -1: none): by descending score,
    each detection takes the free object it overlaps most, at IoU >= :data:`IOU_MATCH`."""
    det_gt = np.full(len(det_boxes), -1, np.int64)
    if len(gt_boxes) and len(det_boxes):
        iou = _iou(det_boxes, gt_boxes)
        free = np.ones(len(gt_boxes), bool)
        for i in np.argsort(-np.asarray(det_scores, np.float64), kind="stable"):
            cand = np.where(free & (iou[i] >= IOU_MATCH), iou[i], -1.0)
            j = int(cand.argmax())
            if cand[j] >= IOU_MATCH:
                free[j], det_gt[i] = False, j
    return det_gt


def score_image(
    gt_boxes: np.ndarray,
    gt_identity: list[str | None],
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_names: list[str | None],
    gt_ignore: np.ndarray | None = None,
    det_gt: np.ndarray | None = None,
) -> IdCounts:
    """Counts for one image: ``gt_identity[j]`` is the enrolled identity of object j or None (unenrolled);
    ``det_names[i]`` the name ``run`` gave detection i or None (unknown). ``det_gt``: the
    :func:`match_detections` of these boxes, when the caller already has it (eval: once per image)."""
    n_gt = len(gt_identity)
    ignore = np.zeros(n_gt, bool) if gt_ignore is None else np.asarray(gt_ignore, bool)
    c = IdCounts()
    enrolled = np.array([g is not None for g in gt_identity], bool)
    c.enrolled_total = int((enrolled & ~ignore).sum())
    c.unenrolled_total = int((~enrolled & ~ignore).sum())
    if det_gt is None:
        det_gt = match_detections(det_boxes, det_scores, gt_boxes)
    match_of = np.full(n_gt, -1, np.int64)
    match_of[det_gt[det_gt >= 0]] = np.flatnonzero(det_gt >= 0)
    for i, name in enumerate(det_names):
        j = int(det_gt[i])
        if j >= 0 and ignore[j]:
            continue
        if name is not None:
            c.named += 1
        if j < 0:
            c.unmatched_named += name is not None
        elif enrolled[j]:
            c.right += name is not None and name == gt_identity[j]
            c.enrolled_named += name is not None
        else:
            c.unenrolled_named += name is not None
    for j in range(n_gt):
        if ignore[j] or match_of[j] < 0:
            continue
        if enrolled[j]:
            c.enrolled_detected += 1
        else:
            c.unenrolled_detected += 1
    return c


def score_records(records: list[dict[str, Any]], gt: dict[str, Any], min_visible: float = 0.5) -> IdCounts:
    """Counts of a live run's JSON-lines ``records`` (``frame``, ``box_xyxy``, ``score``, ``identity``)
    against a video's ground truth (:func:`mocha_edge.data.synth_video.load_video_gt`): an object is
    enrolled when its instance is in ``gt["enrolled"]``; objects less than ``min_visible`` visible are
    ignored."""
    objects = {int(o["object"]): o for o in gt["objects"]}
    enrolled = set(gt["enrolled"])
    by_frame: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_frame.setdefault(int(r["frame"]), []).append(r)
    total = IdCounts()
    for f, objs in enumerate(gt["frames_gt"]):
        recs = by_frame.get(f, [])
        inst = [objects[int(o["object"])]["instance"] for o in objs]
        total += score_image(
            np.asarray([o["box_xyxy"] for o in objs], np.float64).reshape(-1, 4),
            [n if n in enrolled else None for n in inst],
            np.asarray([r["box_xyxy"] for r in recs], np.float64).reshape(-1, 4),
            np.asarray([r["score"] for r in recs], np.float64),
            [r["identity"] for r in recs],
            np.asarray([float(o["visible"]) < min_visible for o in objs], bool),
        )
    return total


def summarise(per_episode: list[IdCounts]) -> dict[str, Any]:
    """Mean over episodes of each metric and its 95 % half-width (Student t; episodes where a metric is
    undefined are left out of it), plus the pooled counts."""
    from mocha_edge.evaluate import _ci95

    rows = [c.metrics() for c in per_episode]
    out: dict[str, Any] = {}
    for k in (
        "id_precision",
        "id_recall",
        "id_f1",
        "false_id_rate",
        "det_recall_novel",
        "named_enrolled_rate",
    ):
        x = np.asarray([r[k] for r in rows], np.float64)
        x = x[np.isfinite(x)]
        out[k] = float(x.mean()) if len(x) else float("nan")
        if k not in ("det_recall_novel", "named_enrolled_rate"):
            out[f"ci95_{k}"] = _ci95(x) if len(x) else float("nan")
    total = IdCounts()
    for c in per_episode:
        total += c
    out["counts"] = {f.name: getattr(total, f.name) for f in fields(total)}
    out["names_per_episode"] = total.named / max(len(per_episode), 1)
    return out


__all__ = ["IOU_MATCH", "IdCounts", "score_image", "score_records", "summarise"]
