"""Attention-guided token removal as a picture: per image, the image, the teacher's CLS attention and the
kept / removed patches (e.g. from ``DetailCLIP.removal_maps``)."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_token_removal(images: torch.Tensor, attention: torch.Tensor, removed: torch.Tensor,
                       out_path: str | Path) -> Path:
    """Save a PNG with one row per image: the image, its attention heat map over the image, and the image
    with removed patches greyed out and kept ones outlined.

    Args:
        images: ``(B, 3, H, W)`` uint8.
        attention: ``(B, gh, gw)`` mean CLS->patch attention.
        removed: ``(B, gh, gw)`` or ``(B, gh*gw)`` bool, True = removed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    batch, _, height, width = images.shape
    grid = tuple(attention.shape[-2:])
    if attention.shape[0] != batch or removed.reshape(batch, -1).shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{batch} images need attention (B, gh, gw) and removed (B, gh*gw) maps of the same "
                         f"grid; got {tuple(attention.shape)} and {tuple(removed.shape)}")
    removed = removed.reshape(batch, *grid).cpu()
    attention = attention.float().cpu()
    ph, pw = height / grid[0], width / grid[1]
    over_image = {"extent": (-0.5, width - 0.5, height - 0.5, -0.5), "interpolation": "nearest"}

    fig, axes = plt.subplots(batch, 3, figsize=(9, 3 * batch), squeeze=False)
    for i in range(batch):
        picture = images[i].permute(1, 2, 0).cpu().numpy()
        cells = [(axes[i, 0], "image"), (axes[i, 1], "teacher CLS attention"),
                 (axes[i, 2], f"kept {int((~removed[i]).sum())} of {grid[0] * grid[1]} patches")]
        for ax, title in cells:
            ax.imshow(picture)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        axes[i, 1].imshow(attention[i].numpy(), cmap="inferno", alpha=0.6, **over_image)
        grey = removed[i].float().numpy()
        axes[i, 2].imshow(grey, cmap="gray_r", alpha=0.75 * grey, vmin=0, vmax=1, **over_image)
        for r, c in (~removed[i]).nonzero().tolist():
            axes[i, 2].add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=False, lw=0.5,
                                           edgecolor="lime"))
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
