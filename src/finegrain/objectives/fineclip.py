"""FineCLIP: global contrastive + real-time region self-distillation + regional contrastive.

``L = L_GC + lambda * L_SD + gamma * L_RC`` (each term switchable: the paper's Table 1 ablation is a config
change):

- ``L_GC`` (``global_contrastive_loss``): symmetric InfoNCE of image vs caption embeddings over the
  global batch.
- ``L_SD`` (``self_distill_loss``): mean over valid regions of ``1 - cos(p_r, v_r)``; ``p_r`` is the 1x1
  RoIAlign of the full image's v-only dense map over the region's box, ``v_r`` the global embedding of
  the region's crop (the box enlarged ``crop_scale`` times) by the same trainable model, no stop-gradient.
- ``L_RC`` (``region_contrastive_loss``): symmetric InfoNCE of ``p_r`` vs region-caption embeddings;
  negatives are all valid regions of all ranks.

Each is a term (``global_contrastive``, ``self_distill``, ``region_contrastive``) over the shared image,
region and text features of :mod:`finegrain.objectives.sources`. One trainable logit scale serves both
contrastive terms; the text tower is frozen (eval mode, run
without a graph, or replaced by a precomputed embedding cache; ``lock_text=false`` trains it too). The full image's dense map and global
embedding come from one tower pass (they share every block but the last). Padding rows (images with
fewer than ``max_regions`` regions, regions without a caption) never enter a loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError
from .base import Progress
from .contrastive import ContrastiveLoss, MaskedContrastiveLoss
from .registry import register_method
from .self_distill import self_distillation_loss
from .sources import ImageSource, RegionSource, TextSource, encode_text, scatter_rows  # noqa: F401
from .term import Features, Term, TermOptions, register_term
from .term_method import TermMethod, TermSpec


@register_term("global_contrastive")
class GlobalContrastive(Term):
    """L_GC: symmetric InfoNCE of image vs caption embeddings over the global batch."""

    @dataclass
    class Options(TermOptions):
        local_loss: bool = True
        gather_with_grad: bool = True

    needs = frozenset({"image", "text"})
    uses_logit_scale = True

    def __init__(self, options: Options, sources):
        super().__init__(options, sources)
        self.contrastive = ContrastiveLoss(options.local_loss, options.gather_with_grad)

    def loss(self, model, features: Features, progress: Progress) -> torch.Tensor:
        return self.contrastive(features["image"], features["text"], model.logit_scale.exp())


@register_term("self_distill")
class SelfDistill(Term):
    """L_SD: ``1 - cos`` of each region's pooled dense feature and the trainable model's embedding of
    its crop (no stop-gradient), over the valid regions of all ranks."""

    needs = frozenset({"roi", "crop", "box_valid"})

    def loss(self, model, features: Features, progress: Progress) -> torch.Tensor:
        return self_distillation_loss(features["roi"], features["crop"], features["box_valid"])


@register_term("region_contrastive")
class RegionContrastive(Term):
    """L_RC: symmetric InfoNCE of pooled region features vs region-caption embeddings; negatives are all
    captioned regions of all ranks."""

    needs = frozenset({"roi", "region_text", "region_valid"})
    uses_logit_scale = True

    def __init__(self, options: TermOptions, sources):
        super().__init__(options, sources)
        self.contrastive = MaskedContrastiveLoss()

    def loss(self, model, features: Features, progress: Progress) -> torch.Tensor:
        return self.contrastive(features["roi"], features["region_text"], model.logit_scale.exp(),
                                features["region_valid"])


@register_method("fineclip")
class FineCLIP(TermMethod):
    @dataclass
    class Options:
        global_contrastive: bool = True  # L_GC
        self_distill: bool = True  # L_SD
        region_contrastive: bool = True  # L_RC
        self_distill_weight: float = 1.0  # lambda
        region_contrastive_weight: float = 1.0  # gamma
        image_size: int | None = None  # training (and crop) size; None: the model's input size
        resize_mode: str = "squash"  # squash (as released) | longest_pad
        max_regions: int = 20  # regions per image, a random subset when a record has more
        min_box_size: float = 8.0  # keep boxes with area in [min_box_size**2, max_box_size**2] (original px)
        max_box_size: float | None = 1024.0  # None: no upper limit
        crop_scale: float = 1.5  # crops are boxes enlarged this much about their centre
        label_as_region_text: bool = False  # a region without a caption uses its label (e.g. COCO names)
        lock_text: bool = True  # freeze the text tower (as the paper)
        local_loss: bool = True
        gather_with_grad: bool = True
        text_cache: str | None = None  # folder written by `finegrain embed-text`: no text tower in training

    @classmethod
    def parts_of(cls, o: Options) -> tuple[list[TermSpec], dict]:
        if not (o.global_contrastive or o.self_distill or o.region_contrastive):
            raise DataError("method: enable at least one of global_contrastive, self_distill, region_contrastive")
        terms = []
        if o.global_contrastive:
            terms.append(TermSpec(GlobalContrastive, "global_contrastive",
                                  GlobalContrastive.Options(1.0, o.local_loss, o.gather_with_grad)))
        if o.self_distill:
            terms.append(TermSpec(SelfDistill, "self_distill", TermOptions(o.self_distill_weight)))
        if o.region_contrastive:
            terms.append(TermSpec(RegionContrastive, "region_contrastive", TermOptions(o.region_contrastive_weight)))
        sources = {"image": ImageSource.Options(o.image_size, o.resize_mode),
                   "regions": RegionSource.Options(max_regions=o.max_regions, min_box_size=o.min_box_size,
                                                   max_box_size=o.max_box_size, crop_scale=o.crop_scale,
                                                   label_as_region_text=o.label_as_region_text),
                   "text": TextSource.Options(o.lock_text, o.text_cache)}
        return terms, sources

    def region_settings(self) -> str:
        return "method.self_distill, method.region_contrastive"
