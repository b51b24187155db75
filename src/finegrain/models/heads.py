"""Projection heads on top of a vision tower's tokens."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn


class IBOTHead(nn.Module):
    """iBOT / DINO projection head: MLP -> L2 norm -> weight-normalised prototypes.

    ``in_dim -> hidden_dim -> ... -> bottleneck_dim`` (``layers`` Linear layers, GELU between, no norm,
    trunc-normal(0.02) weights and zero biases), L2-normalised, then ``out_dim`` prototype logits from a
    bias-free linear layer whose rows are normalised to norm 1 (weight norm with the gain fixed at 1, as
    iBOT's ``norm_last_layer=True``). One head serves CLS and patch tokens alike (iBOT's shared head).
    """

    def __init__(self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3):
        super().__init__()
        if layers < 2:
            raise ValueError(f"IBOTHead needs at least 2 MLP layers, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1)
        mlp: list[nn.Module] = []
        for a, b in pairwise(dims):
            mlp += [nn.Linear(a, b), nn.GELU()]
        self.mlp = nn.Sequential(*mlp, nn.Linear(hidden_dim, bottleneck_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)  # PyTorch's default init, as iBOT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_dim)`` -> ``(..., out_dim)`` float32 prototype logits (the prototype layer runs in
        float32 under autocast too: the targets divide these logits by a temperature of 0.04)."""
        x = F.normalize(self.mlp(x).float(), dim=-1)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x, F.normalize(self.last_layer.weight.float(), dim=-1))
