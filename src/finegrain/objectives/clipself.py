"""CLIPSelf: distil a frozen copy's crop embeddings into the trainable model's dense region features.

``self_distill_loss`` = mean over regions of ``1 - cos(p_r, t_r)``: ``p_r`` is the 1x1 RoIAlign of the
trainable model's v-only dense map over the region's box, ``t_r`` the global embedding of the region's
crop by a frozen copy of the initial vision tower. No text. Regions are either the records' boxes
(``region_source="proposals"``: crops from the data pipeline, boxes enlarged ``crop_scale`` times) or
random grid cells drawn on the device (``"grid"``: each image picks an M x N grid, M in 1..max_split and
N in [ceil(M/2), min(2M, max_split)], and up to ``max_regions`` of its cells; the crops are the exact
cells). The loss is the ``clipself_distill`` term; the teacher is the ``frozen_teacher`` source. At export the vision tower can be ensembled with the teacher's:
``alpha * student + (1 - alpha) * teacher``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import DataError
from ..models import EMATeacher
from ..param_rules import ParamRule
from .base import Progress
from .registry import register_method
from .self_distill import self_distillation_loss
from .sources import ImageSource, RegionSource, grid_choices, sample_grid_boxes, scatter_rows  # noqa: F401
from .term import Features, Source, Term, register_source, register_term
from .term_method import TermMethod, TermSpec


def ensemble_visual(student: torch.nn.Module, teacher: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """A copy of the vision tower with weights ``alpha * student + (1 - alpha) * teacher``."""
    mixed = copy.deepcopy(teacher)
    with torch.no_grad():
        for (_, m), (_, s) in zip(mixed.named_parameters(), student.named_parameters()):
            m.lerp_(s.detach().to(m.dtype), alpha)
    return mixed


@register_source
class FrozenTeacherSource(Source):
    """A frozen copy of the initial vision tower (``teacher``) embedding the region crops: ``teacher_crop``
    ``(B, M, D)``, zero rows where invalid. Optionally trains the transformer blocks only, and exports the
    vision tower ensembled with the teacher's."""

    name = "frozen_teacher"
    order = 2
    provides = frozenset({"teacher_crop"})
    requires: ClassVar = {"teacher_crop": {"crop_images", "box_valid", "roi"}}
    per_sample = False

    @dataclass
    class Options:
        train_blocks_only: bool = True  # freeze all but the transformer blocks (embeddings, final norm, projection)
        ensemble_alpha: float = 1.0  # exported weights: alpha * student + (1 - alpha) * teacher

    def __init__(self, options: Options, model, needed: set[str]):
        super().__init__(options, model, needed)
        if not 0.0 <= options.ensemble_alpha <= 1.0:
            raise DataError(f"method.ensemble_alpha must be in [0, 1], got {options.ensemble_alpha}")
        blocks = model.tower.block_prefix + "."
        self.non_block_params = [n for n, _ in model.clip.visual.named_parameters() if not n.startswith(blocks)]
        self.teacher = EMATeacher({"visual": model.clip.visual})  # never updated: a frozen copy

    def compute(self, model, batch, out: Features, progress: Progress) -> None:
        crops, roi = out["crop_images"], out["roi"]
        with torch.no_grad():
            embed = self.teacher["visual"](crops) if len(crops) else roi.new_zeros(0, roi.shape[-1])
        out["teacher_crop"] = scatter_rows(embed.detach().to(roi.dtype), out["box_valid"])

    def param_rules(self) -> list[ParamRule]:
        if not self.options.train_blocks_only:
            return []
        return [ParamRule(f"model.clip.visual.{name}", trainable=False) for name in self.non_block_params]

    def export_model(self, model):
        """The trained model, its vision tower ensembled with the teacher's when ``ensemble_alpha < 1``."""
        if self.options.ensemble_alpha == 1.0:
            return None
        return model.with_visual(ensemble_visual(model.clip.visual, self.teacher["visual"],
                                                 self.options.ensemble_alpha))


@register_term("clipself_distill")
class CLIPSelfDistill(Term):
    """``1 - cos`` of each region's pooled dense feature and the frozen teacher's embedding of its crop."""

    needs = frozenset({"roi", "teacher_crop", "box_valid"})
    per_sample = False

    def loss(self, model, features: Features, progress: Progress) -> torch.Tensor:
        valid = features["box_valid"]
        return self_distillation_loss(features["roi"][valid], features["teacher_crop"][valid])


@register_method("clipself")
class CLIPSelf(TermMethod):
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

    @classmethod
    def parts_of(cls, o: Options) -> tuple[list[TermSpec], dict]:
        if o.region_source == "grid" and o.resize_mode != "squash":
            raise DataError("method.region_source=grid needs method.resize_mode=squash (grid cells cover the "
                            "whole training image)")
        sources = {"image": ImageSource.Options(o.image_size, o.resize_mode),
                   "regions": RegionSource.Options(o.region_source, o.max_regions, o.min_box_size, o.max_box_size,
                                                   o.crop_scale, o.crop_size, max_split=o.max_split),
                   "frozen_teacher": FrozenTeacherSource.Options(o.train_blocks_only, o.ensemble_alpha)}
        return [TermSpec(CLIPSelfDistill, "self_distill", CLIPSelfDistill.Options())], sources

    def region_settings(self) -> str:
        return "method.region_source=proposals (method.region_source=grid needs no boxes)"

    @property
    def black(self) -> torch.Tensor:
        """A zero pixel after normalisation, ``(3,)``: what grid crops are padded with."""
        return self.sources["regions"].black
