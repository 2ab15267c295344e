"""MOCHA's distillation losses (Camuffo et al., arXiv 2509.14001), written from the formulas.

``L = L_det + λ_dist · L_dist + λ_emb · L_emb``
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def local_alignment_loss(
    student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``L_dist``: MSE + L1 between translated student vectors and teacher targets, ``(n, d)`` each.

    ``weight`` ``(n,)`` optionally scales each object's term (Align-KD focus weighting); the result is the
    weighted mean over objects of the per-object mean over dimensions.
    """
    per_obj = (student - teacher).pow(2).mean(1) + (student - teacher).abs().mean(1)
    if weight is None:
        return per_obj.mean()
    return (per_obj * weight).sum() / weight.sum().clamp(min=1e-12)


def _neg_dist_logits(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Row-wise logits ``-||x_i - x_j|| / (d · τ)`` with the diagonal removed: ``(n, n-1)``."""
    n, d = x.shape
    dist = torch.cdist(x.float(), x.float()) / d
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    return (-dist / tau)[off].view(n, n - 1)


def relational_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """``L_emb``: global relational consistency over the objects of a batch.

    Pairwise Euclidean distances divided by the dimension, diagonal removed; each row becomes a softmax
    over negative distances (temperature ``τ``) for the student and for the detached teacher; the loss is
    the row-wise cross-entropy of the teacher distribution against the student one, averaged over rows
    (equal to KL(teacher || student) up to the teacher's entropy). Zero for fewer than 3 objects.
    """
    if student.shape[0] < 3:
        return student.sum() * 0.0
    p_t = F.softmax(_neg_dist_logits(teacher.detach(), tau), dim=1)
    log_p_s = F.log_softmax(_neg_dist_logits(student, tau), dim=1)
    return -(p_t * log_p_s).sum(1).mean()
