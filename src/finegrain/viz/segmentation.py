"""A segmentation prediction next to its ground truth: image | prediction | ground truth, one fixed colour
per class, ignored pixels black, and a legend of the classes that appear."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .panels import TITLE_PX, PanelGrid, palette

LEGEND_ROW_PX = 20
MAX_NAME_CHARS = 32


def colour_labels(labels: np.ndarray, colours: np.ndarray, ignore_index: int) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8: ``colours[label]``, black where ``ignore_index``."""
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    valid = labels != ignore_index
    rgb[valid] = colours[labels[valid]]
    return rgb


def plot_segmentation(image: Image.Image, pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray | None,
                      class_names: Sequence[str], out_path: str | Path, ignore_index: int = 255,
                      title: str | None = None, long_side: int = 400) -> Path:
    """Save a PNG: the image, the predicted and the true label maps (colours of
    :func:`finegrain.viz.panels.palette`; ``ignore_index`` black) and a legend of every class in either map.

    Args:
        image: RGB; drawn resized to the label maps' size when it differs.
        pred, gt: ``(H, W)`` class indices into ``class_names`` (or ``ignore_index``); ``gt`` None (new images):
            the image and the prediction alone.
        title: over the image (e.g. the file name); default "image".

    With ``gt``, the prediction's title gives its pixel accuracy over the pixels ``gt`` does not ignore.
    """
    from matplotlib.patches import Patch

    truth = gt is not None
    gt = gt if truth else np.full(np.shape(pred), ignore_index)
    pred, gt = (np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m, dtype=np.int64) for m in (pred, gt))
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(f"pred and gt must be (H, W) label maps of one size, got {pred.shape} and "
                         f"{gt.shape}")
    for name, labels in (("pred", pred), ("gt", gt)):
        bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= len(class_names)))]
        if bad.size:
            raise DataError(f"{name}: labels must be class indices 0..{len(class_names) - 1} or the ignore "
                            f"index {ignore_index}, found {int(bad[0])}")
    picture = image.convert("RGB")
    if picture.size != (pred.shape[1], pred.shape[0]):
        picture = picture.resize((pred.shape[1], pred.shape[0]), Image.BILINEAR)
    colours = palette(len(class_names))
    counted = gt != ignore_index
    accuracy = 100 * float((pred[counted] == gt[counted]).mean()) if counted.any() else float("nan")

    present = sorted(set(np.unique(pred).tolist()) | (set(np.unique(gt).tolist()) if truth else set()))
    entries = [(f"{c}: {class_names[c]}", colours[c] / 255) for c in present if c != ignore_index]
    if ignore_index in present:
        entries.append(("ignored", (0, 0, 0)))
    entries = [(name if len(name) <= MAX_NAME_CHARS else name[:MAX_NAME_CHARS - 1] + "…", colour)
               for name, colour in entries]

    scale = long_side / max(pred.shape)
    per_column = max(1, round(pred.shape[0] * scale) // LEGEND_ROW_PX)
    columns = math.ceil(len(entries) / per_column)
    legend_px = columns * (40 + 7 * max(len(name) for name, _ in entries)) + 10
    panels = PanelGrid(1, 3 if truth else 2, pred.shape, long_side=long_side, right=legend_px)
    panels.axes(0, 0, title or "image", np.asarray(picture))
    panels.axes(0, 1, f"prediction (pixel accuracy {accuracy:.1f}%)" if truth else "prediction",
                colour_labels(pred, colours, ignore_index), interpolation="nearest")
    if truth:
        panels.axes(0, 2, "ground truth", colour_labels(gt, colours, ignore_index), interpolation="nearest")
    height, width = panels.size
    handles = [Patch(facecolor=colour, edgecolor="grey", label=name) for name, colour in entries]
    panels.figure.legend(handles=handles, loc="upper left",
                         bbox_to_anchor=(1 - legend_px / width, 1 - TITLE_PX / height),
                         ncols=columns, fontsize=9, frameon=False, borderaxespad=0.5, handlelength=1.2,
                         labelspacing=0.45, columnspacing=1.0)
    return panels.save(out_path)
