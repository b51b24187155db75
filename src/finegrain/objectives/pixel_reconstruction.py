"""MAE pixel reconstruction on removed patches, with per-patch normalised targets."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, ph*pw*C)``, patches in raster order, values ordered (row, col, channel)
    within a patch (MAE's layout)."""
    batch, channels, height, width = images.shape
    ph, pw = patch_size
    if height % ph or width % pw:
        raise ValueError(f"image size {(height, width)} is not a multiple of the patch size {(ph, pw)}")
    x = images.reshape(batch, channels, height // ph, ph, width // pw, pw)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, (height // ph) * (width // pw), ph * pw * channels)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise each patch by its own mean and unbiased variance: ``(t - mean) / sqrt(var + eps)``."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def reconstruction_loss(pred: torch.Tensor, images: torch.Tensor, removed: torch.Tensor,
                        patch_size: tuple[int, int], norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error per patch, averaged over the removed patches of the whole batch.

    Args:
        pred: ``(B, N, ph*pw*C)`` predicted pixels per patch (:func:`patchify` layout).
        images: ``(B, C, H, W)`` the target images (the normalised input view itself).
        removed: ``(B, N)`` bool, True where the patch was removed.
        norm_pix: standardise each target patch first (:func:`normalize_patches`).

    Returns ``sum_{b,i} m_bi mean_j (pred - target)^2 / sum_{b,i} m_bi`` (0 when nothing is removed).
    """
    target = patchify(images.float(), patch_size)
    if norm_pix:
        target = normalize_patches(target)
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = removed.float()
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)
