"""What a predictor returns for one image: typed results whose coordinates are the input image's pixels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Detections:
    """Detections on one image.

    boxes: ``(N, 4)`` float32 xyxy in the image's pixels. scores: ``(N,)`` float32, highest first per class.
    labels: ``(N,)`` int64 indices into ``class_names``. masks: ``(N, H, W)`` bool instance masks (Mask R-CNN), or
    None. ``image_size``: ``(H, W)``.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    image_size: tuple[int, int]
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def names(self) -> list[str]:
        """The class name of each detection."""
        return [self.class_names[i] for i in self.labels.tolist()]

    def above(self, threshold: float) -> Detections:
        """The detections scoring at least ``threshold``."""
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], self.class_names, self.image_size,
                          None if self.masks is None else self.masks[keep])


@dataclass
class Segmentation:
    """A semantic segmentation of one image.

    label_map: ``(H, W)`` int64 index into ``class_names`` for every pixel. probabilities: ``(C, H, W)`` float32
    per-class probabilities when asked for, else None.
    """

    label_map: torch.Tensor
    class_names: list[str]
    probabilities: torch.Tensor | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.label_map.shape)


@dataclass
class Classification:
    """Zero-shot classification of one image (or of boxes in it).

    scores: ``(C,)`` softmax probabilities over ``class_names`` at the model's logit scale (``(K, C)`` for K boxes).
    """

    scores: torch.Tensor
    class_names: list[str]

    @property
    def labels(self) -> torch.Tensor:
        """The best class index (``()`` for an image, ``(K,)`` for boxes)."""
        return self.scores.argmax(dim=-1)

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` best ``(class name, probability)`` of an image, best first."""
        values, indices = self.scores.topk(min(k, self.scores.shape[-1]))
        return [(self.class_names[i], v) for v, i in zip(values.tolist(), indices.tolist())]
