"""MAE-style decoder: restores the patches an encoder dropped (as mask tokens) and predicts pixels."""

from __future__ import annotations

import functools
import math
from functools import partial

import torch
from open_clip.transformer import LayerNorm, ResidualAttentionBlock
from torch import nn

from .vit_tower import restore_tokens


@functools.lru_cache(maxsize=16)
def sincos_pos_embed_2d(width: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding ``(1 + gh*gw, width)``, a zero row first (the CLS slot).

    MAE's table, for any grid: patch ``(row, col)`` in raster order gets ``[sin(col w), cos(col w),
    sin(row w), cos(row w)]`` with ``w_i = 10000^(-i / (width/4))``, ``i < width/4`` (computed in float64,
    returned as float32).
    """
    if width % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


class MAEDecoder(nn.Module):
    """Encoder tokens of the kept patches -> tokens for every patch, and per-patch pixel predictions.

    ``embed`` (Linear width->width) on CLS + kept tokens, a learnable ``mask_token`` (N(0, 0.02)) in every
    removed slot, the fixed sin-cos position embedding (zero for CLS), ``depth`` pre-norm transformer
    blocks (open_clip's ``ResidualAttentionBlock``: SDPA attention, GELU MLP x4, LayerNorm eps 1e-6), a
    final LayerNorm, and ``pixel_head`` (Linear width -> ph*pw*3). Linear weights are Xavier-uniform with
    zero biases (the pixel head keeps PyTorch's default init), LayerNorms 1/0.
    """

    def __init__(self, width: int, heads: int, patch_size: tuple[int, int], depth: int = 1, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder width {width} is not divisible by its number of heads {heads}")
        norm = partial(LayerNorm, eps=1e-6)
        self.embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio, norm_layer=norm, batch_first=True)
                                     for _ in range(depth)])
        self.norm = norm(width)
        self.pixel_head = nn.Linear(width, math.prod(patch_size) * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.embed, *self.blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for block in self.blocks:  # the fused q/k/v projection, initialised as one (3W, W) linear layer
            nn.init.xavier_uniform_(block.attn.in_proj_weight)
            nn.init.zeros_(block.attn.in_proj_bias)

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor,
                grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a kept-token encoding.

        Args:
            tokens: ``(B, 1+K, W)`` encoder output, CLS first, then the kept patches in ``keep`` order.
            restore: ``(B, N)`` indices putting ``[kept, removed]`` back in raster order (the tower's).
            grid: ``(gh, gw)`` patch grid, ``gh * gw == N``.

        Returns:
            ``(B, 1+N, W)`` decoded tokens (CLS first, raster order) and ``(B, N, ph*pw*3)`` pixel
            predictions for every patch.
        """
        x = self.embed(tokens)
        patches = restore_tokens(x[:, 1:], restore, self.mask_token.reshape(-1))
        x = torch.cat([x[:, :1], patches], dim=1)
        x = x + sincos_pos_embed_2d(x.shape[-1], tuple(grid)).to(x.device, x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x, self.pixel_head(x[:, 1:])
