"""Where an augmentation puts the pixels of the source image, so boxes can follow them.

A :class:`Geometry` maps source pixel coordinates to view coordinates: ``x' = x * sx - ox``, ``y' = y * sy -
oy``, then, with ``flip``, ``x' -> width - x'``; the view is ``width x height`` pixels. Resizing, cropping,
padding right/bottom and flipping are all of this form, and so is any sequence of them (:meth:`then`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Geometry:
    """The affine map of source pixels into a ``width x height`` view (see the module docstring)."""

    sx: float
    sy: float
    ox: float
    oy: float
    width: float
    height: float
    flip: bool = False

    @classmethod
    def identity(cls, width: float, height: float) -> Geometry:
        return cls(1.0, 1.0, 0.0, 0.0, width, height)

    @classmethod
    def crop_resize(cls, box: tuple[float, float, float, float], size: tuple[int, int]) -> Geometry:
        """The source ``box`` (``x0, y0, x1, y1``) resized to ``size`` ``(H, W)`` (a random resized crop)."""
        x0, y0, x1, y1 = box
        height, width = size
        sx, sy = width / (x1 - x0), height / (y1 - y0)
        return cls(sx, sy, x0 * sx, y0 * sy, width, height)

    def _x_affine(self) -> tuple[float, float]:
        """``(a, b)`` with ``x_view = a * x + b`` (``a < 0`` when flipped)."""
        return (-self.sx, self.width + self.ox) if self.flip else (self.sx, -self.ox)

    def then(self, other: Geometry) -> Geometry:
        """This map followed by ``other`` (whose source is this view)."""
        (a1, b1), (a2, b2) = self._x_affine(), other._x_affine()
        a, b = a2 * a1, a2 * b1 + b2
        flip = a < 0
        return Geometry(abs(a), self.sy * other.sy, b - other.width if flip else -b, other.sy * self.oy + other.oy,
                        other.width, other.height, flip)

    def map_boxes(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(N, 4)`` source ``xyxy`` boxes -> ``(boxes, kept, clipped)``: the boxes in the view, clipped to
        it, ``(N,)`` bool ``kept`` (False for a box with no area left inside the view) and ``(N,)`` bool
        ``clipped`` (a kept box lost part of itself at the view's border)."""
        x0 = boxes[:, 0] * self.sx - self.ox
        x1 = boxes[:, 2] * self.sx - self.ox
        y0 = boxes[:, 1] * self.sy - self.oy
        y1 = boxes[:, 3] * self.sy - self.oy
        if self.flip:
            x0, x1 = self.width - x1, self.width - x0
        raw = torch.stack([x0, y0, x1, y1], dim=1)
        limit = torch.tensor([self.width, self.height, self.width, self.height], dtype=raw.dtype)
        out = torch.minimum(raw.clamp(min=0), limit)
        kept = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        clipped = kept & (out != raw).any(dim=1)
        return out, kept, clipped
