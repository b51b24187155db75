"""Symmetric InfoNCE between two sets of paired embeddings, negatives gathered across ranks.

L = 1/2 [ CE(s * a b_all^T, y) + CE(s * b a_all^T, y) ], rows of ``a`` and ``b`` paired by index; this is
open_clip's ``ClipLoss``. With ``local_loss`` and ``gather_with_grad`` (the defaults, as in large open_clip
runs) each rank scores its own rows against all gathered rows and gradients flow through the gather, so
the DDP-averaged gradient equals the single-process gradient on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss
from torch import nn


class ContrastiveLoss(nn.Module):
    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        distributed = dist.is_available() and dist.is_initialized()
        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                             rank=dist.get_rank() if distributed else 0,
                             world_size=dist.get_world_size() if distributed else 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """``a``, ``b``: ``(N, D)`` L2-normalised, paired by row; ``logit_scale``: the scale s (already exp'd)."""
        return self.loss(a, b, logit_scale)
