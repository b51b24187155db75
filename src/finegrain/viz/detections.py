"""Detections next to the ground truth: image with predicted boxes (class, score, mask) | image with the true
ones; one fixed colour per class, and the classes of a given novel set drawn dashed and marked ``*`` (the base /
novel split of open-vocabulary detection)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .panels import PanelGrid, palette

MASK_ALPHA = 0.45


@dataclass
class Detections:
    """Boxes of one image: ``boxes`` ``(N, 4)`` xyxy pixels, ``labels`` N class names, ``scores`` N values (None
    for the ground truth), ``masks`` ``(N, H, W)`` bool or None."""

    boxes: torch.Tensor | np.ndarray
    labels: Sequence[str]
    scores: Sequence[float] | None = None
    masks: torch.Tensor | np.ndarray | None = None

    def __post_init__(self):
        self.boxes = np.asarray(torch.as_tensor(self.boxes, dtype=torch.float32).reshape(-1, 4))
        count = len(self.boxes)
        if len(self.labels) != count or (self.scores is not None and len(self.scores) != count):
            raise ValueError(f"{count} boxes need as many labels (and scores), got {len(self.labels)} labels and "
                             f"{None if self.scores is None else len(self.scores)} scores")
        if self.masks is not None:
            self.masks = np.asarray(torch.as_tensor(self.masks).bool())
            if len(self.masks) != count:
                raise ValueError(f"{count} boxes need as many masks, got {len(self.masks)}")


def plot_detections(image: Image.Image, predicted: Detections, truth: Detections | None, class_names: Sequence[str],
                    out_path: str | Path, novel: Collection[str] = (), title: str | None = None,
                    long_side: int = 400) -> Path:
    """Save a PNG of ``image`` with the ``predicted`` detections (labelled "name score") and, beside it, with the
    ``truth`` (None: the prediction alone, for new images). Colours follow the class's index in ``class_names``
    (:func:`~finegrain.viz.panels.palette`), so a class has the same colour in both panels; a class in ``novel``
    is drawn with a dashed box and its name marked ``*``. Masks are overlaid translucent in the box's colour;
    larger boxes are drawn first."""
    picture = np.asarray(image.convert("RGB"))
    colours = palette(len(class_names)) / 255
    index = {name: i for i, name in enumerate(class_names)}
    shown = [predicted] if truth is None else [predicted, truth]
    unknown = sorted({name for d in shown for name in d.labels} - set(index))
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among the class names")
    panels = PanelGrid(1, len(shown), picture.shape[:2], long_side=long_side)
    headings = [f"prediction: {len(predicted.labels)} boxes"]
    if truth is not None:
        split = f" (* novel: {sum(name in novel for name in truth.labels)} of {len(truth.labels)})" if novel else ""
        headings.append(f"ground truth: {len(truth.labels)} boxes{split}")
    for col, (detections, heading) in enumerate(zip(shown, headings)):
        heading = f"{title}: {heading}" if title and col == 0 else heading
        ax = panels.axes(0, col, heading, _with_masks(picture, detections, colours, index))
        _draw_boxes(ax, detections, colours, index, set(novel), label_height=20 * picture.shape[0] / panels.panel[0])
    return panels.save(out_path)


def _with_masks(picture: np.ndarray, detections: Detections, colours: np.ndarray, index: dict) -> np.ndarray:
    if detections.masks is None or not len(detections.masks):
        return picture
    out = picture.astype(np.float32) / 255
    for mask, name in zip(detections.masks, detections.labels):
        out[mask] = (1 - MASK_ALPHA) * out[mask] + MASK_ALPHA * colours[index[name]]
    return out


def _draw_boxes(ax, detections: Detections, colours: np.ndarray, index: dict, novel: set, label_height: float):
    from matplotlib.patches import Rectangle

    boxes = detections.boxes
    for i in np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable"):
        x0, y0, x1, y1 = boxes[i].tolist()
        name = detections.labels[i]
        colour = colours[index[name]]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2, edgecolor=colour,
                               linestyle="--" if name in novel else "-"))
        text = name + ("*" if name in novel else "")
        if detections.scores is not None:
            text += f" {float(detections.scores[i]):.2f}"
        ax.text(x0, y0, text, fontsize=8, color="white" if colour.mean() < 0.6 else "black", clip_on=True,
                va="bottom" if y0 >= label_height else "top", ha="left",
                bbox={"facecolor": colour, "edgecolor": "none", "pad": 1.2, "alpha": 0.85})
