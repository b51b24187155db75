"""Feature sources for terms on the unaugmented image: its tower pass, its regions, the texts.

- ``image``: one pass of the trainable tower over ``batch["image"]`` gives the L2-normalised global
  embedding ``image`` ``(B, D)`` and, when a term needs region features, the v-only ``dense`` map too.
- ``regions``: ``box_valid`` ``(B, M)``, ``roi`` ``(B, M, D)`` (1x1 RoIAlign of ``dense``), ``crop``
  ``(B, M, D)`` (the trainable model's global embedding of each region's crop) and ``crop_images``
  (the crops themselves, for a teacher); zero rows where invalid. Boxes are the records' (``proposals``)
  or random grid cells drawn on the device (``grid``, CLIPSelf's).
- ``text``: caption embeddings ``text`` ``(B, D)``, region-caption embeddings ``region_text``
  ``(B, M, D)`` and ``region_valid`` (a valid box with a caption); without a graph when the text tower
  is locked, or looked up in a precomputed cache.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar

import open_clip
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError
from ..models.roi import crop_boxes, pool_boxes
from ..sample_spec import AUGMENT_NONE
from .base import Progress
from .term import Features, Source, register_source

REGION_SOURCES = ("proposals", "grid")


def scatter_rows(rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rows ``(R, D)`` for the True entries of ``valid`` ``(B, M)`` (in ``valid.nonzero()`` order) ->
    padded ``(B, M, D)`` with zero rows elsewhere."""
    out = rows.new_zeros(valid.numel(), rows.shape[-1])
    out[valid.reshape(-1)] = rows
    return out.view(*valid.shape, rows.shape[-1])


def encode_text(model, tokens: torch.Tensor, frozen: bool = True) -> torch.Tensor:
    """L2-normalised fp32 embeddings ``(N, D)`` of token rows ``(N, L)`` (N >= 1); without a graph when
    the text tower is ``frozen``."""
    with torch.no_grad() if frozen else contextlib.nullcontext():
        return model.encode_text(tokens, normalize=True).float()


def grid_choices(max_split: int) -> list[tuple[int, int]]:
    """The ``(rows, cols)`` grids CLIPSelf draws from: rows in 1..max_split, cols in
    [ceil(rows/2), min(2*rows, max_split)]."""
    return [(m, n) for m in range(1, max_split + 1) for n in range((m + 1) // 2, min(2 * m, max_split) + 1)]


def sample_grid_boxes(batch: int, height: int, width: int, max_split: int, max_regions: int,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a random grid and up to ``max_regions`` of its cells in random order.

    Returns ``boxes`` ``(B, max_regions, 4)`` xyxy pixels and ``valid`` ``(B, max_regions)`` bool (CPU).
    """
    choices = grid_choices(max_split)
    boxes = torch.zeros(batch, max_regions, 4)
    valid = torch.zeros(batch, max_regions, dtype=torch.bool)
    for b in range(batch):
        rows, cols = choices[int(torch.randint(len(choices), (1,), generator=generator))]
        ys, xs = torch.linspace(0, height, rows + 1), torch.linspace(0, width, cols + 1)
        cells = torch.stack([xs[:-1].repeat(rows), ys[:-1].repeat_interleave(cols),
                             xs[1:].repeat(rows), ys[1:].repeat_interleave(cols)], dim=1)
        picked = cells[torch.randperm(len(cells), generator=generator)[:max_regions]]
        boxes[b, :len(picked)] = picked
        valid[b, :len(picked)] = True
    return boxes, valid


@register_source
class ImageSource(Source):
    """The trainable tower's one pass over the unaugmented image: ``image`` and the v-only ``dense`` map."""

    name = "image"
    order = 0
    provides = frozenset({"image", "dense"})

    @dataclass
    class Options:
        image_size: int | None = None  # training size; None: the model's input size
        resize_mode: str = "squash"  # squash | longest_pad

    def sample_request(self) -> dict:
        size = self.options.image_size
        return {"augment": AUGMENT_NONE, "image_size": None if size is None else (size, size),
                "resize_mode": self.options.resize_mode}

    def compute(self, model, batch, out: Features, progress: Progress) -> None:
        tower = model.forward_tower(batch["image"], dense="v_only" if "dense" in self.needed else None)
        out["image"] = F.normalize(tower.image_embed, dim=-1)
        if "dense" in self.needed:
            out["dense"] = tower.dense


@register_source
class RegionSource(Source):
    """Region features of the unaugmented image: RoI-pooled dense features and crop embeddings."""

    name = "regions"
    order = 1
    provides = frozenset({"box_valid", "roi", "crop", "crop_images"})
    requires: ClassVar = {"roi": {"dense"}}

    @dataclass
    class Options:
        region_source: str = "proposals"  # proposals (the records' boxes) | grid (random grid cells)
        max_regions: int = 20  # regions per image, a random subset when a record has more
        min_box_size: float = 8.0  # keep boxes with area in [min_box_size**2, max_box_size**2] (original px)
        max_box_size: float | None = 1024.0  # None: no upper limit
        crop_scale: float = 1.5  # proposals: crops are boxes enlarged this much about their centre
        crop_size: int | None = None  # None: the training image size
        label_as_region_text: bool = False  # a region without a caption uses its label (e.g. COCO names)
        max_split: int = 6  # grid: the largest number of rows / columns

    def __init__(self, options: Options, model, needed: set[str]):
        super().__init__(options, model, needed)
        o = options
        problems = []
        if o.region_source not in REGION_SOURCES:
            problems.append(f"method.region_source must be one of {REGION_SOURCES}, got {o.region_source!r}")
        if o.max_split < 1 or o.max_regions < 1:
            problems.append(f"method.max_split and method.max_regions must be >= 1, got {o.max_split}, {o.max_regions}")
        if problems:
            raise DataError("; ".join(problems))
        preprocess = open_clip.get_model_preprocess_cfg(model.clip)
        mean, std = torch.tensor(preprocess["mean"]), torch.tensor(preprocess["std"])
        self.black = -mean / std  # a zero pixel after normalisation (grid crops are padded with it)

    @property
    def grid(self) -> bool:
        return self.options.region_source == "grid"

    def sample_request(self) -> dict:
        o = self.options
        if self.grid:
            return {}
        crops = bool(self.needed & {"crop", "crop_images"})
        request = {"regions": True, "max_regions": o.max_regions, "min_box_size": o.min_box_size,
                   "max_box_size": math.inf if o.max_box_size is None else o.max_box_size,
                   "label_as_region_text": o.label_as_region_text, "region_crops": crops}
        if crops:
            request.update(crop_scale=o.crop_scale, crop_size=None if o.crop_size is None else (o.crop_size,) * 2)
        return request

    def compute(self, model, batch, out: Features, progress: Progress) -> None:
        o = self.options
        images = batch["image"]
        if self.grid:
            boxes, valid = sample_grid_boxes(images.shape[0], images.shape[-2], images.shape[-1], o.max_split,
                                             o.max_regions)
            boxes, valid = boxes.to(images.device), valid.to(images.device)
            size = o.crop_size or model.image_size[0]
            crops = crop_boxes(images, boxes, (size, size), valid, fill=self.black.to(images.device))
        else:
            boxes, valid, crops = batch["boxes"], batch["box_valid"], batch.get("crops")
        out["box_valid"] = valid
        if "roi" in self.needed:
            out["roi"] = pool_boxes(out["dense"], boxes, model.patch_size, valid)
        if "crop_images" in self.needed:
            out["crop_images"] = crops
        if "crop" in self.needed:
            embed = (model.encode_image(crops, normalize=True) if len(crops)
                     else out["roi"].new_zeros(0, out["roi"].shape[-1]))
            out["crop"] = scatter_rows(embed.to(out["roi"].dtype), valid)

    def metrics(self, features: Features, progress: Progress) -> dict[str, torch.Tensor]:
        return {"regions_per_image": features["box_valid"].float().sum(1).mean()}


@register_source
class TextSource(Source):
    """Caption and region-caption embeddings by the text tower (frozen by default) or a text cache."""

    name = "text"
    order = 3
    provides = frozenset({"text", "region_text", "region_valid"})
    requires: ClassVar = {"region_text": {"roi"}}

    @dataclass
    class Options:
        lock_text: bool = True  # freeze the text tower (as FineCLIP)
        text_cache: str | None = None  # folder written by `finegrain embed-text`: no text tower in training

    def __init__(self, options: Options, model, needed: set[str]):
        super().__init__(options, model, needed)
        if options.text_cache and not options.lock_text:
            raise ConfigError("method.text_cache needs method.lock_text=true: a trained text tower would leave "
                              "the cached embeddings behind")
        if options.lock_text:
            model.lock_text_tower()

    def sample_request(self) -> dict:
        request = {"caption": "required"} if "text" in self.needed else {}
        return {**request, "text_cache": self.options.text_cache}

    def compute(self, model, batch, out: Features, progress: Progress) -> None:
        if "text" in self.needed:
            out["text"] = self._embed(model, batch, "text")
        if self.needed & {"region_text", "region_valid"}:
            region_valid = batch["box_valid"] & batch["region_text_valid"]
            out["region_valid"] = region_valid
            if "region_text_embed" in batch:
                out["region_text"] = batch["region_text_embed"].float() * region_valid.unsqueeze(-1)
            elif not region_valid.any():
                out["region_text"] = torch.zeros_like(out["roi"])
            else:
                rows = encode_text(model, batch["region_text"][region_valid], frozen=self.options.lock_text)
                out["region_text"] = scatter_rows(rows, region_valid)

    def _embed(self, model, batch, key: str) -> torch.Tensor:
        if f"{key}_embed" in batch:
            return batch[f"{key}_embed"].float()
        return encode_text(model, batch[key], frozen=self.options.lock_text)
