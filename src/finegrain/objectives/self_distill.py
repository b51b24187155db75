"""Region self-distillation (FineCLIP's L_SD, CLIPSelf's loss): ``mean_r (1 - cos(p_r, v_r))``.

``p_r`` is a region feature pooled from the dense map of the full image (the student), ``v_r`` the global
embedding of the region's crop (the teacher: the trainable model itself in FineCLIP, a frozen copy in
CLIPSelf). The mean runs over the valid regions of all ranks; padding rows never count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contrastive import global_count, global_value, world_size


def self_distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - cos`` averaged over valid rows of all ranks.

    Args:
        student: ``(N, D)`` or padded ``(B, M, D)`` region features (any norm: re-normalised here).
        teacher: same shape; gradients flow into both (detach the teacher yourself to stop them).
        valid: ``(N,)`` / ``(B, M)`` bool, None for all rows.
    Returns:
        A scalar: on every rank the mean over all ranks' valid rows, with this rank's share of its
        gradient (so DDP's averaging gives the gradient of that mean); zero with a graph when no rank has
        a valid row.
    """
    if valid is None:
        valid = torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device)
    total = global_count(valid)
    anchor = 0.0 * (student.sum() + teacher.sum())
    if total == 0:
        return anchor
    cos = (F.normalize(student[valid].float(), dim=-1) * F.normalize(teacher[valid].float(), dim=-1)).sum(-1)
    return global_value((1.0 - cos).sum() * world_size() / total + anchor)
