"""``FinegrainCLIP``: an open_clip CLIP with the dense API the fine-grained objectives need."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .roi import Boxes, pool_boxes
from .tower import DenseTower, TowerOutput
from .vit_tower import OpenCLIPViTTower


def build_tower(visual: nn.Module) -> DenseTower:
    """The dense tower implementation for an open_clip vision module."""
    return OpenCLIPViTTower(visual)


class FinegrainCLIP(nn.Module):
    """Wraps an open_clip ``CLIP`` / ``CustomTextCLIP`` (kept as ``self.clip``, parameters untouched).

    ``model.clip.state_dict()`` is an open_clip state dict: open_clip checkpoints load into it unchanged
    and finegrain checkpoints (``checkpoint["state_dict"]``) load in open_clip.

    Global embeddings equal open_clip's; on top of them: :meth:`encode_dense`, :meth:`encode_boxes`,
    :meth:`cls_attention` and :meth:`forward_tower` (kept-token forward, tokens, everything in one pass).
    Any input size that is a multiple of the patch size works (position embeddings are interpolated).
    """

    def __init__(self, clip: nn.Module, name: str = "", output_dict: bool = True):
        super().__init__()
        self.clip = clip
        self.name = name
        self.output_dict = output_dict
        self.tower = build_tower(clip.visual)
        self.text_locked = False

    # ----- open_clip-compatible API -------------------------------------------------------------------
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.image_size)

    @property
    def context_length(self) -> int:
        return self.clip.context_length if hasattr(self.clip, "context_length") else self.clip.text.context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, D)`` global embedding, identical to open_clip's ``encode_image``."""
        features = self.tower.forward(images).image_embed
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """``(B, L)`` token ids -> ``(B, D)`` (open_clip's text tower)."""
        return self.clip.encode_text(text, normalize=normalize)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None):
        """open_clip's forward: normalised features and ``logit_scale.exp()`` (dict if ``output_dict``)."""
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if self.output_dict:
            return {"image_features": image_features, "text_features": text_features,
                    "logit_scale": self.logit_scale.exp()}
        return image_features, text_features, self.logit_scale.exp()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    def lock_text_tower(self) -> None:
        """Freeze the whole text tower (FineCLIP / CLIPSelf); it also stays in eval mode."""
        visual_ids = {id(p) for p in self.clip.visual.parameters()}
        for name, p in self.clip.named_parameters():
            if id(p) not in visual_ids and name != "logit_scale":
                p.requires_grad_(False)
        self.text_locked = True

    def train(self, mode: bool = True) -> FinegrainCLIP:
        super().train(mode)
        if mode and self.text_locked:
            for name, module in self.clip.named_children():
                if name != "visual":
                    module.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """open_clip names (relative to ``self.clip``) that should not be decayed."""
        return set(self.clip.no_weight_decay())

    # ----- dense API ----------------------------------------------------------------------------------
    @property
    def patch_size(self) -> tuple[int, int]:
        return self.tower.patch_size

    def forward_tower(self, images: torch.Tensor, keep: torch.Tensor | None = None, cls_attention: bool = False,
                      dense: str | None = None, tokens: bool = False) -> TowerOutput:
        """One vision pass returning what is asked for (see :class:`finegrain.models.tower.TowerOutput`)."""
        return self.tower.forward(images, keep=keep, cls_attention=cls_attention, dense=dense, tokens=tokens)

    def encode_dense(self, images: torch.Tensor, mode: str = "v_only") -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, D, H/p, W/p)`` projected, L2-normalised patch features.

        ``mode="v_only"`` runs the last block without attention mixing (MaskCLIP / CLIPSelf);
        ``mode="plain"`` projects the ordinary last-block tokens.
        """
        return self.tower.forward(images, dense=mode).dense

    def encode_boxes(self, images: torch.Tensor, boxes: Boxes, valid: torch.Tensor | None = None,
                     mode: str = "v_only", normalize: bool = True) -> torch.Tensor:
        """One embedding per box: RoIAlign (1x1, aligned) of :meth:`encode_dense`.

        ``boxes``: ``xyxy`` in input-tensor pixels, a list of ``(K_i, 4)`` (any K_i, zero included) ->
        ``(sum K_i, D)``; or padded ``(B, M, 4)`` with ``valid`` ``(B, M)`` -> ``(B, M, D)``, zeros where
        invalid.
        """
        return pool_boxes(self.encode_dense(images, mode), boxes, self.patch_size, valid, normalize)

    def cls_attention(self, images: torch.Tensor) -> torch.Tensor:
        """CLS->patch attention of every layer and head, ``(B, L, heads, h, w)``."""
        out = self.tower.forward(images, cls_attention=True)
        return out.cls_attention.unflatten(-1, out.grid_size)
