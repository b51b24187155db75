"""iBOT self-distillation terms: CLS tokens across views, patch tokens at removed positions.

A teacher's prototype logits are centred and sharpened into targets, ``P_T = softmax((t - c) / tau_T)``;
the student's log-probabilities are ``log_softmax(s / tau_S)``; ``H(P_T, P_S) = -sum_k P_T,k log P_S,k``.
The centre ``c`` is an exponential moving average of the teacher's mean logits over the global batch
(all ranks), updated after the loss that uses it. Losses are computed in float32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def teacher_probabilities(logits: torch.Tensor, centre: torch.Tensor, temp: float) -> torch.Tensor:
    """``softmax((logits - centre) / temp)`` over the last dim (``centre`` broadcasts), float32, no grad."""
    return F.softmax((logits.detach().float() - centre) / temp, dim=-1)


def cross_entropy(targets: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """``H(targets, softmax(student_logits / student_temp))`` over the last dim: ``(..., K) -> (...)``."""
    return -(targets * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


def cls_distillation_loss(student: torch.Tensor, targets: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Cross-view CLS loss: the mean over ordered view pairs ``q != v`` of ``mean_b H(targets[q],
    student[v])``.

    Args:
        student: ``(V, B, K)`` student CLS logits per view.
        targets: ``(V, B, K)`` teacher probabilities per view (:func:`teacher_probabilities`).
    """
    views = student.shape[0]
    if views < 2:
        raise ValueError(f"cross-view CLS distillation needs at least 2 views, got {views}")
    terms = [cross_entropy(targets[q], student[v], student_temp).mean()
             for q in range(views) for v in range(views) if q != v]
    return torch.stack(terms).mean()


def patch_distillation_loss(student: torch.Tensor, targets: torch.Tensor, removed: torch.Tensor,
                            student_temp: float) -> torch.Tensor:
    """Same-view patch loss on removed patches: per sample, ``sum_i m_i H(targets_i, student_i) /
    max(1, sum_i m_i)``, then the mean over samples.

    Args:
        student: ``(B, N, K)`` student patch logits; ``targets``: ``(B, N, K)`` teacher probabilities.
        removed: ``(B, N)`` bool, True where the patch was removed (any number per sample, zero included).
    """
    mask = removed.float()
    per_patch = cross_entropy(targets, student, student_temp)
    return ((per_patch * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)).mean()


class Centre(nn.Module):
    """An EMA of the teacher's mean logits over all ranks' rows: ``c <- m c + (1 - m) mean_rows``.

    ``value`` is a buffer (saved with the checkpoint) of shape ``shape``, e.g. ``(1, K)`` for CLS logits
    or ``(1, 1, K)`` for patch logits.
    """

    def __init__(self, shape: tuple[int, ...], momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("value", torch.zeros(shape))

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """``rows`` ``(M, K)``: this rank's teacher logits; their mean over every rank's rows enters the EMA."""
        total = torch.cat([rows.float().sum(dim=0), rows.new_tensor([rows.shape[0]], dtype=torch.float32)])
        if _distributed():
            dist.all_reduce(total)
        mean = (total[:-1] / total[-1]).view(self.value.shape)
        self.value.copy_(self.value * self.momentum + mean * (1 - self.momentum))


def centred_cls_loss(student: torch.Tensor, teacher: torch.Tensor, centre: Centre, teacher_temp: float,
                     student_temp: float) -> torch.Tensor:
    """:func:`cls_distillation_loss` of ``(V, B, K)`` logits against the teacher's centred targets; then the
    centre takes the teacher's logits."""
    targets = teacher_probabilities(teacher, centre.value, teacher_temp)
    loss = cls_distillation_loss(student, targets, student_temp)
    centre.update(teacher.flatten(0, -2))
    return loss


def centred_patch_loss(student: torch.Tensor, teacher: torch.Tensor, removed: torch.Tensor, centre: Centre,
                       teacher_temp: float, student_temp: float) -> torch.Tensor:
    """The mean over views of :func:`patch_distillation_loss` of ``(V, B, N, K)`` logits against the
    teacher's centred targets; then the centre takes the teacher's logits averaged over all patches."""
    targets = teacher_probabilities(teacher, centre.value, teacher_temp)
    loss = torch.stack([patch_distillation_loss(s, t, m, student_temp)
                        for s, t, m in zip(student, targets, removed)]).mean()
    centre.update(teacher.float().mean(dim=-2).flatten(0, -2))
    return loss


class IBOTClsLoss(nn.Module):
    """:func:`cls_distillation_loss` with its own centre, updated after the loss from the teacher logits."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, centre_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.centre = Centre((1, out_dim), centre_momentum)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """``student``, ``teacher``: ``(V, B, K)`` CLS logits per view."""
        return centred_cls_loss(student, teacher, self.centre, teacher_temp, self.student_temp)


class IBOTPatchLoss(nn.Module):
    """:func:`patch_distillation_loss` with its own centre, updated after the loss from the teacher's
    logits averaged over all patches (removed or not)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, centre_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.centre = Centre((1, 1, out_dim), centre_momentum)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, removed: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        """``student``, ``teacher``: ``(V, B, N, K)`` patch logits per view; ``removed``: ``(V, B, N)``.
        Returns the mean over views of :func:`patch_distillation_loss`."""
        return centred_patch_loss(student, teacher, removed, self.centre, teacher_temp, self.student_temp)
