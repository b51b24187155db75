"""Box classification results drawn on an image: each box green when its predicted class is right, red when
wrong, labelled with the prediction, its score and (when wrong) the true class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .panels import PanelGrid

RIGHT = "#00b400"
WRONG = "#e60000"


def plot_box_predictions(image: Image.Image, boxes: torch.Tensor | np.ndarray, true_labels: Sequence[str],
                         pred_labels: Sequence[str], scores: Sequence[float] | torch.Tensor | np.ndarray,
                         out_path: str | Path, title: str | None = None, long_side: int = 800) -> Path:
    """Save a PNG of ``image`` (its longer side drawn ``long_side`` pixels) with the ``K`` boxes on it.

    Args:
        image: the RGB image the boxes refer to.
        boxes: ``(K, 4)`` ``xyxy`` in image pixels.
        true_labels, pred_labels: ``K`` class names each.
        scores: ``K`` scores of the predicted classes (e.g. softmax probabilities), written with 2 decimals.
        title: shown before the count of right boxes (e.g. the file name).

    Each box is labelled "pred (score)", plus "true: name" when wrong, in white on a filled box of its colour
    (above the box, or inside it at the image's top edge); larger boxes are drawn first.
    """
    from matplotlib.patches import Rectangle

    boxes = np.asarray(torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    scores = [float(s) for s in torch.as_tensor(scores, dtype=torch.float32).reshape(-1)]
    count = len(boxes)
    if not len(true_labels) == len(pred_labels) == len(scores) == count:
        raise ValueError(f"{count} boxes need as many true_labels, pred_labels and scores; got "
                         f"{len(true_labels)}, {len(pred_labels)} and {len(scores)}")
    picture = np.asarray(image.convert("RGB"))
    right = [t == p for t, p in zip(true_labels, pred_labels)]
    summary = f"{sum(right)} of {count} boxes right (green), {count - sum(right)} wrong (red)"
    panels = PanelGrid(1, 1, picture.shape[:2], long_side=long_side)
    ax = panels.axes(0, 0, f"{title}: {summary}" if title else summary, picture)
    label_height = 20 * panels.image_size[0] / panels.panel[0]  # a text line, in image pixels
    for i in np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable"):
        x0, y0, x1, y1 = boxes[i].tolist()
        colour = RIGHT if right[i] else WRONG
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.5, edgecolor=colour))
        text = f"{pred_labels[i]} ({scores[i]:.2f})" + ("" if right[i] else f", true: {true_labels[i]}")
        above = y0 >= label_height
        ax.text(x0, y0, text, fontsize=9, color="white", va="bottom" if above else "top", ha="left",
                clip_on=True, bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.5, "alpha": 0.9})
    return panels.save(out_path)
