"""CLS->patch attention maps over images, per head or averaged, with the patches a token-removal mask keeps
(e.g. DetailCLIP's teacher attention and the blocks its training would keep)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..eval.encode import evaluating
from ..models import FinegrainCLIP
from .panels import PanelGrid


def cls_attention_maps(model: FinegrainCLIP, images: torch.Tensor, layer: int | None = -1,
                       per_head: bool = False) -> torch.Tensor:
    """The CLS->patch attention of normalised ``images`` ``(B, 3, H, W)``, float32 on their device.

    ``layer``: a block index (negative from the end; -1 = the last block), or None for the mean over all
    blocks (the map DetailCLIP's token removal ranks). Returns ``(B, h, w)`` (mean over heads) or, with
    ``per_head``, ``(B, heads, h, w)``.
    """
    with evaluating(model):
        maps = model.cls_attention(images).float()  # (B, L, heads, h, w)
    layers = maps.shape[1]
    if layer is None:
        maps = maps.mean(dim=1)
    elif -layers <= layer < layers:
        maps = maps[:, layer]
    else:
        raise DataError(f"layer: expected a block index in [{-layers}, {layers - 1}] or None (mean of all "
                        f"blocks), got {layer}")
    return maps if per_head else maps.mean(dim=1)


def plot_attention(images: torch.Tensor, attention: torch.Tensor, removed: torch.Tensor | None,
                   out_path: str | Path, titles: Sequence[str] | None = None,
                   attention_label: str = "CLS attention") -> Path:
    """Save a PNG with one row per image: the image; its attention heat map over it (with per-head maps:
    the mean over heads, then each head; each map coloured from its own minimum to maximum); and, given
    ``removed``, the image with removed patches darkened and kept ones outlined.

    Args:
        images: ``(B, 3, H, W)`` uint8.
        attention: ``(B, h, w)``, or ``(B, heads, h, w)`` per head.
        removed: None, or ``(B, h, w)`` / ``(B, h*w)`` bool, True = removed.
        titles: one per image (e.g. file names), shown over the image; default "image".
        attention_label: the attention maps' title (e.g. "teacher CLS attention").
    """
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    batch = images.shape[0]
    if attention.ndim not in (3, 4) or attention.shape[0] != batch:
        raise ValueError(f"attention must be (B, h, w) or (B, heads, h, w) for {batch} images, got "
                         f"{tuple(attention.shape)}")
    grid = tuple(attention.shape[-2:])
    if removed is not None and tuple(removed.shape) not in ((batch, *grid), (batch, grid[0] * grid[1])):
        raise ValueError(f"removed must be (B, h, w) or (B, h*w) for attention maps of grid {grid}, got "
                         f"{tuple(removed.shape)}")
    if titles is not None and len(titles) != batch:
        raise ValueError(f"titles: expected one per image ({batch}), got {len(titles)}")

    attention = attention.detach().float().cpu()
    maps = [attention] if attention.ndim == 3 else [attention.mean(dim=1), *attention.unbind(dim=1)]
    labels = ([attention_label] if attention.ndim == 3 else
              [f"{attention_label}, mean of {attention.shape[1]} heads"] +
              [f"head {j}" for j in range(attention.shape[1])])
    panels = PanelGrid(batch, 1 + len(maps) + (removed is not None), tuple(images.shape[-2:]))
    height, width = panels.image_size
    ph, pw = height / grid[0], width / grid[1]
    heat = {"cmap": colormaps["inferno"], "alpha": 0.6, "interpolation": "nearest"}
    for i in range(batch):
        picture = images[i].permute(1, 2, 0).cpu().numpy()
        panels.axes(i, 0, titles[i] if titles is not None else "image", picture)
        for col, (values, label) in enumerate(zip(maps, labels), start=1):
            ax = panels.axes(i, col, label, picture)
            panels.show(ax, values[i].numpy(), **heat)
        if removed is not None:
            mask = removed[i].reshape(grid).cpu()
            ax = panels.axes(i, len(maps) + 1, f"kept {int((~mask).sum())} of {grid[0] * grid[1]} patches",
                             picture)
            shade = mask.float().numpy()
            panels.show(ax, np.zeros_like(shade), cmap="gray", vmin=0, vmax=1, alpha=0.75 * shade,
                        interpolation="nearest")
            for r, c in (~mask).nonzero().tolist():
                ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, lw=0.6, edgecolor="lime"))
    return panels.save(out_path)
