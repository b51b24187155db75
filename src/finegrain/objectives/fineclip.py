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

One trainable logit scale serves both contrastive terms; the text tower is frozen (eval mode, run
without a graph, or replaced by a precomputed embedding cache; ``lock_text=false`` trains it too). The full image's dense map and global
embedding come from one tower pass (they share every block but the last). Padding rows (images with
fewer than ``max_regions`` regions, regions without a caption) never enter a loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.roi import pool_boxes
from ..param_rules import ParamRule
from ..sample_spec import AUGMENT_NONE, SampleSpec
from .base import Method, Progress
from .contrastive import ContrastiveLoss, MaskedContrastiveLoss
from .registry import register_method
from .self_distill import self_distillation_loss


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


@register_method("fineclip")
class FineCLIP(Method):
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

    def __init__(self, options: Options, model):
        super().__init__(options, model)
        o = options
        if not (o.global_contrastive or o.self_distill or o.region_contrastive):
            raise ValueError("method: enable at least one of global_contrastive, self_distill, region_contrastive")
        if o.text_cache and not o.lock_text:
            raise ValueError("method.text_cache needs method.lock_text=true: a trained text tower would leave "
                             "the cached embeddings behind")
        if o.lock_text:
            model.lock_text_tower()
        self.global_contrastive = ContrastiveLoss(o.local_loss, o.gather_with_grad)
        self.region_contrastive = MaskedContrastiveLoss()

    @property
    def uses_regions(self) -> bool:
        return self.options.self_distill or self.options.region_contrastive

    def sample_spec(self) -> SampleSpec:
        o = self.options
        spec = SampleSpec(augment=AUGMENT_NONE, image_size=None if o.image_size is None else (o.image_size,) * 2,
                          resize_mode=o.resize_mode, caption="required" if o.global_contrastive else "none",
                          text_cache=o.text_cache)
        if not self.uses_regions:
            return spec
        return dataclasses.replace(
            spec, regions=True, max_regions=o.max_regions, min_box_size=o.min_box_size,
            max_box_size=math.inf if o.max_box_size is None else o.max_box_size,
            label_as_region_text=o.label_as_region_text, region_crops=o.self_distill, crop_scale=o.crop_scale)

    def region_settings(self) -> str:
        return "method.self_distill, method.region_contrastive"

    def param_rules(self) -> list[ParamRule]:
        if self.options.global_contrastive or self.options.region_contrastive:
            return []
        return [ParamRule("model.clip.logit_scale", trainable=False)]  # no term uses it

    def features(self, model, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        """``image``/``text`` ``(B, D)``; with regions ``roi``, ``crop``, ``region_text`` ``(B, M, D)`` (zero
        rows where invalid) and ``box_valid``/``region_valid`` ``(B, M)`` bool. All L2-normalised."""
        o = self.options
        out = model.forward_tower(batch["image"], dense="v_only" if self.uses_regions else None)
        features = {"image": F.normalize(out.image_embed, dim=-1)}
        if o.global_contrastive:
            features["text"] = self._text(model, batch, "text")
        if not self.uses_regions:
            return features
        box_valid = batch["box_valid"]
        features["box_valid"] = box_valid
        features["roi"] = pool_boxes(out.dense, batch["boxes"], model.patch_size, box_valid)
        if o.self_distill:
            crops = batch["crops"]
            crop_embed = (model.encode_image(crops, normalize=True) if len(crops)
                          else features["roi"].new_zeros(0, features["roi"].shape[-1]))
            features["crop"] = scatter_rows(crop_embed.to(features["roi"].dtype), box_valid)
        if o.region_contrastive:
            region_valid = box_valid & batch["region_text_valid"]
            features["region_valid"] = region_valid
            features["region_text"] = self._region_text(model, batch, region_valid, features["roi"])
        return features

    def _text(self, model, batch, key: str) -> torch.Tensor:
        if f"{key}_embed" in batch:
            return batch[f"{key}_embed"].float()
        return encode_text(model, batch[key], frozen=self.options.lock_text)

    def _region_text(self, model, batch, region_valid: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
        if "region_text_embed" in batch:
            return batch["region_text_embed"].float() * region_valid.unsqueeze(-1)
        if not region_valid.any():
            return torch.zeros_like(roi)
        rows = encode_text(model, batch["region_text"][region_valid], frozen=self.options.lock_text)
        return scatter_rows(rows, region_valid)

    def loss(self, model, features: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        o = self.options
        scale = model.logit_scale.exp()
        losses = {}
        if o.global_contrastive:
            losses["global_contrastive_loss"] = self.global_contrastive(features["image"], features["text"], scale)
        if o.self_distill:
            losses["self_distill_loss"] = o.self_distill_weight * self_distillation_loss(
                features["roi"], features["crop"], features["box_valid"])
        if o.region_contrastive:
            losses["region_contrastive_loss"] = o.region_contrastive_weight * self.region_contrastive(
                features["roi"], features["region_text"], scale, features["region_valid"])
        if self.uses_regions:
            losses["regions_per_image"] = features["box_valid"].float().sum(1).mean()
        losses["logit_scale"] = scale.detach()
        return losses
