"""``FinegrainCLIP``: an open_clip CLIP with the dense API the fine-grained objectives need."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from torch import nn

from .roi import Boxes, pool_boxes
from .timm_tower import TimmTower
from .tower import DenseTower, TowerOutput
from .vit_tower import OpenCLIPViTTower


def open_clip_no_decay(name: str, param: torch.Tensor) -> bool:
    """open_clip's trainer rule: no weight decay for rank < 2 tensors, norms (``ln``/``bn``), biases and
    the logit scale."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_tower(visual: nn.Module) -> DenseTower:
    """The dense tower implementation for an open_clip vision module, picked by its type (a timm-trunk
    ``TimmModel`` or open_clip's ``VisionTransformer``); others raise ``UnsupportedModelError``."""
    if isinstance(visual, TimmModel):
        return TimmTower(visual)
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

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """Freeze the vision tower except its last ``unlocked_groups`` layer groups (open_clip's
        ``lock_image_tower``; for a ViT the groups are [patch embedding, class and position embeddings,
        ln_pre], each block but the last, [last block, ln_post], proj)."""
        self.clip.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the text tower except its last ``unlocked_layers`` blocks (open_clip's
        ``lock_text_tower``). Wholly frozen (0, FineCLIP / CLIPSelf), it also stays in eval mode."""
        if unlocked_layers:
            self.clip.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm)
            return
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
        """Names (relative to this module) exempt from weight decay, by open_clip's training rule: gains,
        biases, norms, logit scale and other tensors of rank < 2 (position embeddings *are* decayed)."""
        return {name for name, p in self.named_parameters() if open_clip_no_decay(name, p)}

    def with_visual(self, visual: nn.Module) -> FinegrainCLIP:
        """A model sharing this one's text tower and logit scale, with ``visual`` as its vision tower
        (e.g. an EMA teacher's copy of it); no weights are copied."""
        clip = copy.copy(self.clip)
        clip._modules = {**self.clip._modules, "visual": visual}
        model = FinegrainCLIP(clip, name=self.name, output_dict=self.output_dict)
        model.model_cfg = getattr(self, "model_cfg", None)
        model.text_locked = self.text_locked
        return model

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

    def forward_intermediates(self, images: torch.Tensor, indices: int | Sequence[int] = 1,
                              norm: bool = False) -> list[torch.Tensor]:
        """Chosen blocks' patch tokens as ``(B, W, h, w)`` maps, unprojected (e.g. blocks ``[3, 5, 7, 11]`` for
        segmentation probes). ``indices``: an int n = the last n blocks, or 0-based block indices (negative
        from the end), as timm; ``norm`` applies the final LayerNorm."""
        return self.tower.forward_intermediates(images, indices, norm)

    def cls_attention(self, images: torch.Tensor) -> torch.Tensor:
        """CLS->patch attention of every layer and head, ``(B, L, heads, h, w)``."""
        out = self.tower.forward(images, cls_attention=True)
        return out.cls_attention.unflatten(-1, out.grid_size)
