"""CLIPSelf: distil a frozen copy's crop embeddings into the trainable model's dense region features.

``self_distill_loss`` = mean over regions of ``1 - cos(p_r, t_r)``: ``p_r`` is the 1x1 RoIAlign of the
trainable model's v-only dense map over the region's box, ``t_r`` the global embedding of the region's
crop by a frozen copy of the initial vision tower. No text. Regions are either the records' boxes
(``region_source="proposals"``: crops from the data pipeline, boxes enlarged ``crop_scale`` times) or
random grid cells drawn on the device (``"grid"``: each image picks an M x N grid, M in 1..max_split and
N in [ceil(M/2), min(2M, max_split)], and up to ``max_regions`` of its cells; the crops are the exact
cells). At export the vision tower can be ensembled with the teacher's:
``alpha * student + (1 - alpha) * teacher``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import open_clip
import torch

from ..models import EMATeacher
from ..models.roi import crop_boxes, pool_boxes
from ..param_rules import ParamRule
from ..sample_spec import AUGMENT_NONE, SampleSpec
from .base import Method, Progress
from .registry import register_method
from .self_distill import self_distillation_loss

REGION_SOURCES = ("proposals", "grid")


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


def ensemble_visual(student: torch.nn.Module, teacher: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """A copy of the vision tower with weights ``alpha * student + (1 - alpha) * teacher``."""
    mixed = copy.deepcopy(teacher)
    with torch.no_grad():
        for (_, m), (_, s) in zip(mixed.named_parameters(), student.named_parameters()):
            m.lerp_(s.detach().to(m.dtype), alpha)
    return mixed


@register_method("clipself")
class CLIPSelf(Method):
    @dataclass
    class Options:
        region_source: str = "proposals"  # proposals (the records' boxes) | grid (random grid cells)
        image_size: int | None = None  # training size (CLIPSelf: 1024 for B/16); None: the model's
        resize_mode: str = "longest_pad"  # longest_pad (as released for proposals) | squash (needed by grid)
        crop_size: int | None = None  # None: the model's input size
        max_regions: int = 20
        max_split: int = 6  # grid: the largest number of rows / columns
        min_box_size: float = 8.0  # proposals: area filter in original pixels
        max_box_size: float | None = 1024.0  # None: no upper limit
        crop_scale: float = 1.5  # proposals: crops are boxes enlarged this much
        train_blocks_only: bool = True  # freeze all but the transformer blocks (embeddings, final norm, projection)
        ensemble_alpha: float = 1.0  # exported weights: alpha * student + (1 - alpha) * teacher

    def __init__(self, options: Options, model):
        super().__init__(options, model)
        o = options
        problems = []
        if o.region_source not in REGION_SOURCES:
            problems.append(f"method.region_source must be one of {REGION_SOURCES}, got {o.region_source!r}")
        if o.region_source == "grid" and o.resize_mode != "squash":
            problems.append("method.region_source=grid needs method.resize_mode=squash (grid cells cover the "
                            "whole training image)")
        if not 0.0 <= o.ensemble_alpha <= 1.0:
            problems.append(f"method.ensemble_alpha must be in [0, 1], got {o.ensemble_alpha}")
        if o.max_split < 1 or o.max_regions < 1:
            problems.append(f"method.max_split and method.max_regions must be >= 1, got {o.max_split}, {o.max_regions}")
        if problems:
            raise ValueError("; ".join(problems))
        model.lock_text_tower()  # no text in CLIPSelf
        blocks = model.tower.block_prefix + "."
        self.non_block_params = [n for n, _ in model.clip.visual.named_parameters() if not n.startswith(blocks)]
        self.teacher = EMATeacher({"visual": model.clip.visual})  # never updated: a frozen copy
        preprocess = open_clip.get_model_preprocess_cfg(model.clip)
        mean, std = torch.tensor(preprocess["mean"]), torch.tensor(preprocess["std"])
        self.register_buffer("black", -mean / std, persistent=False)  # a zero pixel after normalisation

    def sample_spec(self) -> SampleSpec:
        o = self.options
        size = None if o.image_size is None else (o.image_size, o.image_size)
        crop = None if o.crop_size is None else (o.crop_size, o.crop_size)
        if o.region_source == "grid":
            return SampleSpec(augment=AUGMENT_NONE, image_size=size, resize_mode=o.resize_mode, caption="none")
        return SampleSpec(augment=AUGMENT_NONE, image_size=size, resize_mode=o.resize_mode, caption="none",
                          regions=True, max_regions=o.max_regions, min_box_size=o.min_box_size,
                          max_box_size=o.max_box_size if o.max_box_size is not None else math.inf,
                          region_crops=True, crop_size=crop, crop_scale=o.crop_scale)

    def region_settings(self) -> str:
        return "method.region_source=proposals (method.region_source=grid needs no boxes)"

    def param_rules(self) -> list[ParamRule]:
        rules = [ParamRule("model.clip.logit_scale", trainable=False)]
        if self.options.train_blocks_only:
            rules += [ParamRule(f"model.clip.visual.{name}", trainable=False) for name in self.non_block_params]
        return rules

    def forward(self, model, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        images = batch["image"]
        if self.options.region_source == "grid":
            boxes, valid = sample_grid_boxes(images.shape[0], images.shape[-2], images.shape[-1],
                                             self.options.max_split, self.options.max_regions)
            boxes, valid = boxes.to(images.device), valid.to(images.device)
            crop = self.options.crop_size or model.image_size[0]
            crops = crop_boxes(images, boxes, (crop, crop), valid, fill=self.black)
        else:
            boxes, valid, crops = batch["boxes"], batch["box_valid"], batch["crops"]
        student = pool_boxes(model.encode_dense(images), boxes, model.patch_size, valid)[valid]
        with torch.no_grad():
            teacher = (self.teacher["visual"](crops) if len(crops) else student.new_zeros(student.shape)).detach()
        return {"self_distill_loss": self_distillation_loss(student, teacher),
                "regions_per_image": valid.float().sum(1).mean()}

    def export_model(self, model):
        """The trained model, its vision tower ensembled with the teacher's when ``ensemble_alpha < 1``."""
        if self.options.ensemble_alpha == 1.0:
            return model
        return model.with_visual(ensemble_visual(model.clip.visual, self.teacher["visual"],
                                                 self.options.ensemble_alpha))
