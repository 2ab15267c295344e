"""Object vectors: mean-pool a box on each feature map that feeds the detection head, concatenate.

The pooling rule is exact and simple so the native runtime can reproduce it bit-for-bit: at stride ``s``
cell ``i`` covers pixels ``[i·s, (i+1)·s)``; a box ``[x1, x2)`` averages the cells it overlaps,
``floor(x1/s) .. max(floor(x1/s)+1, ceil(x2/s)) - 1``, clipped to the map (at least one cell).
Box sums come from a summed-area table, so the cost does not grow with box size.
"""

from __future__ import annotations

import torch


def cell_ranges(boxes: torch.Tensor, stride: float, h: int, w: int) -> torch.Tensor:
    """``(n, 4)`` pixel xyxy boxes -> ``(n, 4)`` int64 ``x0, y0, x1, y1`` cell ranges (end exclusive)."""
    b = boxes.detach().float() / stride
    x0 = b[:, 0].floor().clamp(0, w - 1)
    y0 = b[:, 1].floor().clamp(0, h - 1)
    x1 = torch.maximum(b[:, 2].ceil(), x0 + 1).clamp(max=w)
    y1 = torch.maximum(b[:, 3].ceil(), y0 + 1).clamp(max=h)
    return torch.stack([x0, y0, x1, y1], 1).long()


def box_mean_pool(
    feats: list[torch.Tensor], boxes: torch.Tensor, batch_idx: torch.Tensor, strides: list[float]
) -> torch.Tensor:
    """Mean of each box on each map, concatenated: ``(n, sum(C_i))``. Differentiable w.r.t. ``feats``.

    ``feats[i]`` is ``(B, C_i, H_i, W_i)``; ``boxes`` are ``(n, 4)`` xyxy in input-image pixels;
    ``batch_idx`` ``(n,)`` says which image of the batch each box belongs to.
    """
    out = []
    bi = batch_idx.long()
    for f, s in zip(feats, strides):
        _, c, h, w = f.shape
        sat = torch.zeros(f.shape[0], c, h + 1, w + 1, dtype=torch.float32, device=f.device)
        sat[:, :, 1:, 1:] = f.float().cumsum(2).cumsum(3)  # summed-area table
        r = cell_ranges(boxes, s, h, w).to(f.device)
        x0, y0, x1, y1 = r.unbind(1)
        total = sat[bi, :, y1, x1] - sat[bi, :, y0, x1] - sat[bi, :, y1, x0] + sat[bi, :, y0, x0]  # (n, c)
        area = ((x1 - x0) * (y1 - y0)).clamp(min=1).unsqueeze(1)
        out.append(total / area)
    return torch.cat(out, 1) if out else torch.zeros(0)


def head_channels(model: torch.nn.Module) -> list[int]:
    """Channels of the maps feeding an ultralytics Detect head (64, 128, 256 for a YOLOv8n)."""
    head = model.model[-1]  # type: ignore[index]
    ch = []
    for branch in head.cv2:  # box branch of each level: its first conv reads the level's input map
        conv = next(m for m in branch.modules() if isinstance(m, torch.nn.Conv2d))
        ch.append(int(conv.in_channels))
    return ch
