"""What a region proposer and a captioner are, and the thresholds every proposer shares.

A proposer turns a batch of images into boxes; a captioner turns a batch of images (region crops, or whole
images) into one sentence each. Both describe themselves in one line, written into every record they
annotate (``source.proposer`` / ``source.captioner``), so a dataset says how it was made.

Boxes are ``(x0, y0, x1, y1)`` in absolute pixels of the image as finegrain loads it (EXIF orientation
applied: :func:`finegrain.data.images.load_image`), the frame of every region-text record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image
from torchvision.ops import nms

from finegrain.data.records import Record
from finegrain.errors import DataError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Proposal:
    """One proposed region: its box, the detector's confidence (None when it has none, e.g. ground truth)
    and its class name when the proposer knows one."""

    box: Box
    score: float | None = None
    label: str | None = None


class Proposer(Protocol):
    """Boxes for images. ``propose(images, records)`` gets the loaded images and their records (a
    ground-truth proposer reads the boxes it already knows from the record) and returns one list of raw
    :class:`Proposal` per image; the pipeline then applies a :class:`ProposalFilter`."""

    def describe(self) -> str:
        """One line naming the proposer, its model and weights, e.g. ``torchvision:fasterrcnn_resnet50_fpn_v2
        weights=frcnn.pth``."""

    def propose(self, images: Sequence[Image.Image], records: Sequence[Record]) -> list[list[Proposal]]:
        """Raw proposals of each image."""


class Captioner(Protocol):
    """One sentence per image (a region crop or a whole image), batched."""

    def describe(self) -> str:
        """One line naming the captioner, its model and prompt, e.g. ``blip2:Salesforce/blip2-opt-2.7b
        prompt='Describe this image in one sentence.'``."""

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image, in order, stripped; ``""`` where the model wrote nothing (the pipeline drops
        and counts such regions)."""


@dataclass(frozen=True)
class ProposalFilter:
    """Thresholds applied to every proposer's raw boxes, in this order:

    1. clip each box to the image; a box with zero area after clipping is dropped and counted
       (``zero_area``);
    2. drop boxes scoring below ``min_score`` (boxes without a score are kept);
    3. drop boxes whose area (pixels², after clipping) is below ``min_area`` or above ``max_area``;
    4. class-agnostic non-maximum suppression at ``nms_iou`` (None: none), higher scores first;
    5. keep the ``max_per_image`` best (None: all), by score, boxes without a score in their given order.
    """

    min_score: float = 0.0
    min_area: float = 0.0
    max_area: float | None = None
    nms_iou: float | None = None
    max_per_image: int | None = None

    def __post_init__(self):
        if self.min_area < 0 or (self.max_area is not None and self.max_area < self.min_area):
            raise DataError(f"proposal filter: need 0 <= min_area <= max_area, got {self.min_area}, {self.max_area}")
        if self.nms_iou is not None and not 0 < self.nms_iou <= 1:
            raise DataError(f"proposal filter: nms_iou must be in (0, 1], got {self.nms_iou}")
        if self.max_per_image is not None and self.max_per_image < 1:
            raise DataError(f"proposal filter: max_per_image must be >= 1, got {self.max_per_image}")

    def describe(self) -> str:
        parts = [f"score>={self.min_score:g}", f"area>={self.min_area:g}"]
        if self.max_area is not None:
            parts.append(f"area<={self.max_area:g}")
        if self.nms_iou is not None:
            parts.append(f"nms={self.nms_iou:g}")
        if self.max_per_image is not None:
            parts.append(f"max={self.max_per_image}")
        return " ".join(parts)

    def __call__(self, proposals: Sequence[Proposal], width: int, height: int) -> tuple[list[Proposal], int]:
        """``(kept proposals, count of zero-area boxes dropped)`` for one ``width x height`` image."""
        clipped, zero_area = [], 0
        for p in proposals:
            x0, y0, x1, y1 = (min(max(float(v), 0.0), limit) for v, limit in zip(p.box, (width, height) * 2))
            if x1 <= x0 or y1 <= y0:
                zero_area += 1
                continue
            clipped.append(Proposal((x0, y0, x1, y1), p.score, p.label))
        kept = [p for p in clipped
                if (p.score is None or p.score >= self.min_score)
                and self.min_area <= _area(p.box) <= (self.max_area if self.max_area is not None else float("inf"))]
        scored = all(p.score is not None for p in kept)
        if self.nms_iou is not None and kept:
            scores = torch.tensor([p.score if p.score is not None else 1.0 for p in kept], dtype=torch.float64)
            order = nms(torch.tensor([p.box for p in kept], dtype=torch.float64), scores, self.nms_iou).tolist()
            kept = [kept[i] for i in order]
        elif scored:
            kept = sorted(kept, key=lambda p: -p.score)
        if self.max_per_image is not None:
            kept = kept[:self.max_per_image]
        return kept, zero_area


def _area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])
