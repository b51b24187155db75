"""Symmetric InfoNCE between two sets of paired embeddings, negatives gathered across ranks.

L = 1/2 [ CE(s * a b_all^T, y) + CE(s * b a_all^T, y) ], rows of ``a`` and ``b`` paired by index.

- :class:`ContrastiveLoss` is open_clip's ``ClipLoss`` (every rank holds the same number of rows). With
  ``local_loss`` and ``gather_with_grad`` (the defaults, as in large open_clip runs) each rank scores its
  own rows against all gathered rows and gradients flow through the gather, so the DDP-averaged gradient
  equals the single-process gradient on the global batch.
- :class:`MaskedContrastiveLoss` takes only the *valid* rows (e.g. regions that have a caption), any
  number per rank, zero included: padding never enters the logits, and the loss is the mean over all
  valid rows of all ranks, so the DDP gradient equals the single-process gradient on their union.

Logits are computed in float32, under autocast too. Both return, on every rank, the value of the loss over
the global batch (as a single process on all
ranks' rows would compute it), while each rank's gradient is its share of that loss's gradient
(:func:`global_value`), so DDP's gradient averaging gives the global gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def full_precision(x: torch.Tensor):
    """A context in which autocast is off, so logits ``s * a b^T`` (s up to 100) are computed in float32."""
    return torch.autocast(x.device.type, enabled=False)


def world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def global_value(share: torch.Tensor) -> torch.Tensor:
    """``share`` (a scalar: this rank's share of a loss whose mean over ranks is the global loss) with
    its value replaced by that mean, its gradient unchanged. One scalar all-reduce; identity on one process."""
    if not _distributed():
        return share
    mean = share.detach().clone()
    dist.all_reduce(mean)
    return share + (mean / dist.get_world_size() - share.detach())


def global_count(mask: torch.Tensor) -> int:
    """Number of True entries of ``mask`` over all ranks."""
    count = mask.sum().reshape(1)
    if _distributed():
        dist.all_reduce(count)
    return int(count.item())


class ContrastiveLoss(nn.Module):
    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        distributed = dist.is_available() and dist.is_initialized()
        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                             rank=dist.get_rank() if distributed else 0,
                             world_size=dist.get_world_size() if distributed else 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """``a``, ``b``: ``(N, D)`` L2-normalised, paired by row; ``logit_scale``: the scale s (already exp'd).
        The value is the loss over all ranks' rows (each rank's gradient: its rows' share)."""
        with full_precision(a):
            loss = self.loss(a.float(), b.float(), logit_scale.float())
        return global_value(loss) if self.loss.local_loss else loss


class _GatherWithGrad(torch.autograd.Function):
    """``(N, D)`` rows of every rank (the same N on each), concatenated in rank order ``(world * N, D)``. The
    backward sums the gathered rows' gradients over ranks and returns this rank's block, so each rank's
    rows get the gradient of every rank's loss (what ``torch.distributed.nn``'s deprecated ``all_gather``
    did), with public collectives only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows of ``x`` ``(N_r, D)`` (``N_r`` may differ per rank), concatenated in rank order,
    with gradients flowing back to each rank's own rows; and the offset of this rank's rows."""
    if not _distributed():
        return x, 0
    counts = torch.tensor([x.shape[0]], device=x.device)
    all_counts = [torch.zeros_like(counts) for _ in range(dist.get_world_size())]
    dist.all_gather(all_counts, counts)
    sizes = [int(c) for c in all_counts]
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[0]))
    gathered = _GatherWithGrad.apply(padded).split(max(sizes))
    rank = dist.get_rank()
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]), sum(sizes[:rank])


class MaskedContrastiveLoss(nn.Module):
    """InfoNCE over the valid rows of every rank (open_clip's local-loss scheme, variable row counts)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """``a``, ``b``: ``(N, D)`` or padded ``(B, M, D)`` L2-normalised, paired by row; ``valid``: ``(N,)``
        or ``(B, M)`` bool (None: all rows). Returns, on every rank, the mean over all ranks' valid rows of
        ``(CE_a + CE_b) / 2``, with this rank's share of its gradient (DDP's gradient averaging gives the
        gradient of that mean); zero (with a graph) when no rank has a valid row."""
        if valid is not None:
            a, b = a[valid], b[valid]
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        a_all, offset = gather_rows(a)
        b_all, _ = gather_rows(b)
        total = a_all.shape[0]
        # keeps the gathers (and the scale, if trainable) in the graph on a rank without rows, so every
        # rank joins the gathers' backward and DDP sees every parameter used
        anchor = 0.0 * (a_all.sum() + b_all.sum() + logit_scale.sum())
        if total == 0:  # the same on every rank
            return anchor
        if a.shape[0] == 0:
            return global_value(anchor)  # joins the other ranks' all-reduce
        labels = torch.arange(offset, offset + a.shape[0], device=a.device)
        with full_precision(a):
            a, b, a_all, b_all, logit_scale = (t.float() for t in (a, b, a_all, b_all, logit_scale))
            ce_a = F.cross_entropy(logit_scale * a @ b_all.T, labels, reduction="sum")
            ce_b = F.cross_entropy(logit_scale * b @ a_all.T, labels, reduction="sum")
        return global_value((ce_a + ce_b) / 2 * world_size() / total + anchor)
