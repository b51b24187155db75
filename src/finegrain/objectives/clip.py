"""Plain CLIP: global image-caption contrastive loss (the baseline, and FineCLIP's L_GC)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sample_spec import SampleSpec
from .base import Method, Progress
from .contrastive import ContrastiveLoss
from .registry import register_method


@register_method("clip")
class CLIP(Method):
    """``contrastive_loss`` = symmetric InfoNCE of image vs caption embeddings over the global batch."""

    @dataclass
    class Options:
        local_loss: bool = True
        gather_with_grad: bool = True
        augment: str = "open_clip"  # augmentation recipe; "none" (with resize_mode) as FineCLIP's fine-tuning
        resize_mode: str = "squash"  # with augment="none": squash | longest_pad | shortest_crop

    def __init__(self, options: Options, model):
        super().__init__(options, model)
        self.contrastive = ContrastiveLoss(options.local_loss, options.gather_with_grad)

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(augment=self.options.augment, resize_mode=self.options.resize_mode)

    def features(self, model, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        """``image`` ``(B, D)`` and ``text`` ``(B, D)`` L2-normalised embeddings."""
        return {"image": model.encode_image(batch["image"], normalize=True),
                "text": model.encode_text(batch["text"], normalize=True)}

    def loss(self, model, features: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        scale = model.logit_scale.exp()
        return {"contrastive_loss": self.contrastive(features["image"], features["text"], scale),
                "logit_scale": scale.detach()}
