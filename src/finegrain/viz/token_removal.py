"""Attention-guided token removal as a picture: per image, the image, the teacher's CLS attention and the
kept / removed patches (e.g. from ``DetailCLIP.removal_maps``)."""

from __future__ import annotations

from pathlib import Path

import torch

from .attention import plot_attention


def plot_token_removal(images: torch.Tensor, attention: torch.Tensor, removed: torch.Tensor,
                       out_path: str | Path) -> Path:
    """Save a PNG with one row per image: the image, its attention heat map over the image, and the image
    with removed patches darkened and kept ones outlined (:func:`finegrain.viz.attention.plot_attention`).

    Args:
        images: ``(B, 3, H, W)`` uint8.
        attention: ``(B, gh, gw)`` mean CLS->patch attention.
        removed: ``(B, gh, gw)`` or ``(B, gh*gw)`` bool, True = removed.
    """
    return plot_attention(images, attention, removed, out_path, attention_label="teacher CLS attention")
