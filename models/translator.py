"""The translator: maps a student object vector into the teacher's (PCA-reduced) space.

Training aid only — the exporter strips it and prototypes live in the student's own space. Layout as in
MOCHA: learnable per-channel normalisation, one attention block over the single object token (with one
token the softmax is 1, so it acts as a learned linear map), a feed-forward block ``D -> 4D -> D`` with
residual and LayerNorm, then a linear map ``D -> d_t``. ~2.6 M parameters for ``D = 448, d_t = 512``.
"""

from __future__ import annotations

import torch
from torch import nn


class Translator(nn.Module):
    """``(n, d_in)`` student vectors -> ``(n, d_out)`` vectors in the teacher space."""

    def __init__(self, d_in: int, d_out: int, expansion: int = 4, heads: int | None = None) -> None:
        super().__init__()
        if heads is None:
            heads = next(h for h in (8, 7, 4, 2, 1) if d_in % h == 0)
        self.d_in, self.d_out = d_in, d_out
        self.norm_in = nn.BatchNorm1d(d_in)  # learnable per-channel normalisation
        self.attn = nn.MultiheadAttention(d_in, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(d_in)
        self.ffn = nn.Sequential(
            nn.Linear(d_in, expansion * d_in), nn.GELU(), nn.Linear(expansion * d_in, d_in)
        )
        self.ln2 = nn.LayerNorm(d_in)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_in(x) if x.shape[0] > 1 or not self.training else x
        t = x.unsqueeze(1)  # (n, 1, D): one token per object
        t = self.ln1(t + self.attn(t, t, t, need_weights=False)[0])
        t = self.ln2(t + self.ffn(t))
        return self.proj(t.squeeze(1))

    def config(self) -> dict[str, int]:
        return {"d_in": self.d_in, "d_out": self.d_out, "expansion": self.ffn[0].out_features // self.d_in,
                "heads": self.attn.num_heads}  # fmt: skip
