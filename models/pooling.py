"""Object vectors: mean of a box on each feature map that feeds the detection head, concatenated.

Pooling rule (``box-area-mean/v2``), chosen so that it is continuous in the box coordinates (box jitter
from FP16/INT8 or another backend moves a vector a little, never by a whole cell) and exactly reproducible
in C: each map is a piecewise-constant function over its cells (cell ``i`` covers ``[i·s, (i+1)·s)`` at
stride ``s``); a box's vector is that function's mean over the box area. Boxes are clipped to the map and
given a minimum extent of ``MIN_EXTENT`` cells (kept centred, shifted inside the map). The area integral is
a bilinear interpolation of the summed-area table, so the cost does not grow with box size.
"""

from __future__ import annotations

import torch

MIN_EXTENT = 0.25  # cells
POOLING = "box-area-mean/v2"


def cell_box(boxes: torch.Tensor, stride: float, h: int, w: int) -> torch.Tensor:
    """``(n, 4)`` pixel xyxy -> clipped box in cell units ``(n, 4)`` with at least ``MIN_EXTENT`` per side."""
    b = boxes.detach().float() / stride
    out = []
    for lo, hi, size in ((b[:, 0], b[:, 2], w), (b[:, 1], b[:, 3], h)):
        lo, hi = lo.clamp(0, size), hi.clamp(0, size)
        ext = (hi - lo).clamp(min=MIN_EXTENT)
        c = ((lo + hi) / 2).clamp(ext / 2, size - ext / 2)
        out += [c - ext / 2, c + ext / 2]
    x0, y0, x1, y1 = out[0], out[2], out[1], out[3]
    return torch.stack([x0, y0, x1, y1], 1)


def _sat_at(sat: torch.Tensor, bi: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of summed-area tables ``sat (B, C, H+1, W+1)`` at fractional ``(y, x)``: ``(n, C)``."""
    h1, w1 = sat.shape[2] - 1, sat.shape[3] - 1
    y0 = y.floor().clamp(0, h1 - 1).long()
    x0 = x.floor().clamp(0, w1 - 1).long()
    fy = (y - y0).unsqueeze(1)
    fx = (x - x0).unsqueeze(1)
    a = sat[bi, :, y0, x0]
    b = sat[bi, :, y0, x0 + 1]
    c = sat[bi, :, y0 + 1, x0]
    d = sat[bi, :, y0 + 1, x0 + 1]
    return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def box_mean_pool(
    feats: list[torch.Tensor], boxes: torch.Tensor, batch_idx: torch.Tensor, strides: list[float]
) -> torch.Tensor:
    """Area-mean of each box on each map, concatenated: ``(n, sum(C_i))``. Differentiable w.r.t. ``feats``.

    ``feats[i]`` is ``(B, C_i, H_i, W_i)``; ``boxes`` are ``(n, 4)`` xyxy in input-image pixels;
    ``batch_idx`` ``(n,)`` says which image of the batch each box belongs to.
    """
    out = []
    bi = batch_idx.long()
    for f, s in zip(feats, strides):
        _, c, h, w = f.shape
        sat = torch.zeros(f.shape[0], c, h + 1, w + 1, dtype=torch.float32, device=f.device)
        sat[:, :, 1:, 1:] = f.float().cumsum(2).cumsum(3)
        x0, y0, x1, y1 = cell_box(boxes, s, h, w).to(f.device).unbind(1)
        total = (
            _sat_at(sat, bi, y1, x1)
            - _sat_at(sat, bi, y0, x1)
            - _sat_at(sat, bi, y1, x0)
            + _sat_at(sat, bi, y0, x0)
        )
        out.append(total / ((x1 - x0) * (y1 - y0)).unsqueeze(1))
    return torch.cat(out, 1) if out else torch.zeros(0)


def head_channels(model: torch.nn.Module) -> list[int]:
    """Channels of the maps feeding an ultralytics Detect head (64, 128, 256 for a YOLOv8n)."""
    head = model.model[-1]  # type: ignore[index]
    ch = []
    for branch in head.cv2:  # box branch of each level: its first conv reads the level's input map
        conv = next(m for m in branch.modules() if isinstance(m, torch.nn.Conv2d))
        ch.append(int(conv.in_channels))
    return ch
