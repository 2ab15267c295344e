"""NumPy reference of the runtime's post-processing: DFL decode, class-aware NMS, box mean-pooling.

It works on the raw graph outputs of the export contract and must give the same detections and vectors
as the PyTorch path (``mocha_edge.infer.Student``, which uses ultralytics' decode and NMS); the native
runtime is checked against this file.
"""

from __future__ import annotations

import numpy as np

MAX_WH = 7680.0  # class offset for class-aware NMS (ultralytics' value)


def anchors(shapes: list[tuple[int, int]], strides: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Anchor centres ``(A, 2)`` in grid units (+0.5) and their stride ``(A,)``, level by level, row-major."""
    pts, st = [], []
    for (h, w), s in zip(shapes, strides):
        ys, xs = np.meshgrid(
            np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5, indexing="ij"
        )
        pts.append(np.stack([xs.ravel(), ys.ravel()], 1))
        st.append(np.full(h * w, s, np.float32))
    return np.concatenate(pts), np.concatenate(st)


def decode(box_dist: np.ndarray, cls_logits: np.ndarray, shapes, strides) -> tuple[np.ndarray, np.ndarray]:
    """One image: ``(4·R, A)`` DFL logits + ``(nc, A)`` logits -> ``(A, 4)`` xyxy pixels, ``(A, nc)`` scores."""
    r = box_dist.shape[0] // 4
    d = box_dist.reshape(4, r, -1).astype(np.float64)
    d = np.exp(d - d.max(1, keepdims=True))
    d = (d / d.sum(1, keepdims=True) * np.arange(r)[None, :, None]).sum(1)  # (4, A) expected distance
    pts, st = anchors(shapes, strides)
    x1y1 = pts - d[:2].T
    x2y2 = pts + d[2:].T
    boxes = np.concatenate([x1y1, x2y2], 1) * st[:, None]
    scores = 1.0 / (1.0 + np.exp(-cls_logits.astype(np.float64).T))
    return boxes.astype(np.float32), scores.astype(np.float32)


def _iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    tl = np.maximum(box[:2], boxes[:, :2])
    br = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), 1)
    a = np.prod(box[2:] - box[:2])
    b = np.prod(boxes[:, 2:] - boxes[:, :2], 1)
    return inter / (a + b - inter + 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, conf: float = 0.25, iou: float = 0.7, max_det: int = 300,
        max_nms: int = 30000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Class-aware greedy NMS on the best class per anchor (ultralytics' single-label rule).

    Returns ``(boxes (n, 4), scores (n,), classes (n,))`` sorted by score. Non-finite model outputs never
    come out: an anchor with a NaN score is no candidate (``best > conf`` is false), a candidate whose box is
    not finite is dropped after the ``max_nms`` cut (as the native runtime drops it).
    """
    cls = scores.argmax(1)
    best = scores[np.arange(len(scores)), cls]
    keep = np.flatnonzero(best > conf)
    order = keep[np.argsort(-best[keep], kind="stable")][:max_nms]
    order = order[np.isfinite(boxes[order]).all(1)]  # NaN/inf box: dropped (it took a max_nms place)
    shifted = boxes[order] + (cls[order] * MAX_WH)[:, None]
    picked: list[int] = []
    alive = np.ones(len(order), bool)
    for i in range(len(order)):
        if not alive[i]:
            continue
        picked.append(i)
        if len(picked) == max_det:
            break
        rest = np.flatnonzero(alive[i + 1 :]) + i + 1
        alive[rest[_iou_one(shifted[i], shifted[rest]) > iou]] = False
    idx = order[picked]
    return boxes[idx], best[idx], cls[idx].astype(np.int64)


def _cell_box(b: np.ndarray, s: float, h: int, w: int, min_extent: float = 0.25) -> list[float]:
    out = []
    for lo, hi, size in ((b[0] / s, b[2] / s, w), (b[1] / s, b[3] / s, h)):
        lo, hi = min(max(lo, 0.0), size), min(max(hi, 0.0), size)
        ext = max(hi - lo, min_extent)
        c = min(max((lo + hi) / 2, ext / 2), size - ext / 2)
        out += [c - ext / 2, c + ext / 2]
    return out  # x0, x1, y0, y1


def _coverage(lo: float, hi: float, n: int) -> np.ndarray:
    """How much of each of ``n`` unit cells the interval ``[lo, hi)`` covers."""
    edges = np.arange(n + 1, dtype=np.float64)
    return np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None)


def pool(maps: list[np.ndarray], boxes: np.ndarray, strides: list[float]) -> np.ndarray:
    """Area-mean of each box (letterbox pixels, xyxy) over each ``(C, H, W)`` map, cells seen as constant
    patches (``models.pooling`` rule ``box-area-mean/v2``), written as explicit per-cell coverage weights.

    Only the cells a box covers are read: a NaN/inf cell makes the vectors of the boxes over it non-finite,
    and only theirs (as the native runtime)."""
    out = np.zeros((len(boxes), sum(m.shape[0] for m in maps)), np.float32)
    for n, b in enumerate(np.asarray(boxes, np.float64)):
        parts = []
        for m, s in zip(maps, strides):
            _, h, w = m.shape
            x0, x1, y0, y1 = _cell_box(b, s, h, w)
            wx, wy = _coverage(x0, x1, w), _coverage(y0, y1, h)
            xs, ys = np.flatnonzero(wx), np.flatnonzero(wy)  # the covered cells: one run per axis
            x, y = slice(xs[0], xs[-1] + 1), slice(ys[0], ys[-1] + 1)
            acc = np.einsum("chw,h,w->c", m[:, y, x].astype(np.float64), wy[y], wx[x])
            parts.append(acc / ((x1 - x0) * (y1 - y0)))
        out[n] = np.concatenate(parts)
    return out
