"""The builtin teacher's network: a small CNN that embeds an object crop.

It stands in for a vision-language teacher on the synthetic benchmark: trained on *base*-instance
identities, it learns the fine appearance (colour scheme, texture, marking) that coarse detection labels
never ask the student to see. The embedding is L2-normalised; a cosine classifier trains it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CropEncoder(nn.Module):
    """``(B, 3, S, S)`` float in [0, 1] -> ``(B, dim)`` unit vectors. ``S`` is ``input_size`` (48)."""

    def __init__(self, dim: int = 256, width: int = 32, input_size: int = 48) -> None:
        super().__init__()
        self.input_size = input_size
        w = width
        self.features = nn.Sequential(
            _block(3, w),
            nn.MaxPool2d(2),  # S/2
            _block(w, 2 * w),
            nn.MaxPool2d(2),  # S/4
            _block(2 * w, 4 * w),
            nn.MaxPool2d(2),  # S/8
            _block(4 * w, 8 * w),
        )
        self.embed = nn.Linear(16 * w, dim)  # avg- and max-pooled features, concatenated
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # (B, 8w, S/8, S/8)
        f = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)  # (B, 16w)
        return F.normalize(self.embed(f), dim=1)


class CosineClassifier(nn.Module):
    """Logits = scale · cos(embedding, class weight); trains the encoder on instance identities."""

    def __init__(self, dim: int, n_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * z @ F.normalize(self.weight, dim=1).T
