"""Attention-guided token removal (DetailCLIP, after A-CLIP): keep the patches a teacher attends to most.

The teacher's CLS->patch attention, averaged over layers and heads, is pooled into 2x2-patch blocks; the
``keep_count`` highest-scoring blocks are kept, deterministically, and every other block's four patches
are removed. Pure tensor functions; ``True`` in a removal mask means *removed*.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_cls_attention(cls_attention: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, L, heads, N)`` CLS->patch attention -> ``(B, gh, gw)`` mean over layers, then heads."""
    return cls_attention.mean(dim=1).mean(dim=1).unflatten(-1, tuple(grid))


def keep_count(num_blocks: int, keep_ratio: float) -> int:
    """Blocks kept: ``floor(num_blocks * keep_ratio) + 1``, at most ``num_blocks`` (the released code's
    count, there named ``mask_ratio``; 25 of 49 blocks at 0.5)."""
    return min(num_blocks, int(num_blocks * keep_ratio) + 1)


def check_even_grid(grid: tuple[int, int]) -> None:
    """Raise ``ValueError`` unless both sides of the patch grid are even (2x2 blocks must tile it)."""
    if grid[0] % 2 or grid[1] % 2:
        raise ValueError(f"attention-guided token removal pools 2x2-patch blocks and needs an even patch grid, "
                         f"got {tuple(grid)}")


def block_scores(scores: torch.Tensor) -> torch.Tensor:
    """``(B, gh, gw)`` patch scores -> ``(B, gh/2, gw/2)`` block scores: a bilinear 2x downsize (as
    released; for an exact halving it is the mean of each 2x2 block)."""
    check_even_grid(scores.shape[-2:])
    size = (scores.shape[-2] // 2, scores.shape[-1] // 2)
    return F.interpolate(scores.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def removal_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """``(B, gh, gw)`` patch scores -> ``(B, gh*gw)`` bool, True = removed (raster order).

    Keeps the :func:`keep_count` highest-scoring 2x2 blocks of each sample. Ties are broken by a stable
    descending sort: among equal scores the block earlier in raster order is kept (the released code's
    unstable ``argsort(descending=True)`` leaves that order unspecified).
    """
    blocks = block_scores(scores)
    batch, bh, bw = blocks.shape
    flat = blocks.reshape(batch, bh * bw)
    kept = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :keep_count(bh * bw, keep_ratio)]
    removed = torch.ones_like(flat, dtype=torch.bool).scatter_(1, kept, False)
    removed = removed.view(batch, bh, 1, bw, 1).expand(batch, bh, 2, bw, 2)
    return removed.reshape(batch, 4 * bh * bw)


def kept_indices(removed: torch.Tensor, count: int) -> torch.Tensor:
    """``(B, N)`` removal mask with ``count`` kept patches per row -> ``(B, count)`` kept patch indices,
    ascending."""
    return torch.argsort(removed.to(torch.uint8), dim=1, stable=True)[:, :count]
