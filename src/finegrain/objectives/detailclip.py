"""DetailCLIP: CLIP + iBOT self-distillation + MAE reconstruction on attention-guided token removal.

Per step, for two augmented views of each image: the EMA teacher (vision tower + iBOT head) encodes both
views in full; its CLS attention picks the 2x2-patch blocks each view keeps; the student encodes CLS +
kept patches only, and a one-block decoder restores every position. Losses: CLIP (each view's encoder
CLS vs the caption), cross-view CLS distillation (encoder CLS), same-view patch distillation and pixel
reconstruction on the removed patches (decoder tokens). See docs/detailclip.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import EMATeacher, FinegrainCLIP, cosine_momentum
from ..models.decoder import MAEDecoder
from ..models.heads import IBOTHead
from ..models.tower import TowerOutput
from ..param_rules import ParamRule
from ..sample_spec import SampleSpec
from .base import Method, Progress
from .contrastive import ContrastiveLoss
from .ibot import IBOTClsLoss, IBOTPatchLoss
from .pixel_reconstruction import reconstruction_loss
from .registry import register_method
from .token_removal import keep_count, kept_indices, mean_cls_attention, removal_mask


def text_part(clip: nn.Module) -> nn.Module:
    """A view of an open_clip model without its vision tower (text tower, logit scale); shares parameters."""
    view = copy.copy(clip)
    view._modules = {name: module for name, module in clip._modules.items() if name != "visual"}
    return view


@register_method("detailclip")
class DetailCLIP(Method):
    """``clip_loss``, ``cls_loss``, ``patch_loss``, ``rec_loss`` (each times its weight), plus metrics."""

    @dataclass
    class Options:
        keep_ratio: float = 0.5  # keeps floor(n_blocks * keep_ratio) + 1 blocks (released as "mask_ratio")
        ema_momentum: float = 0.996  # teacher momentum at step 0, cosine to 1 at the last step
        teacher_temp_cls: float = 0.04
        warmup_teacher_temp_patch: float = 0.04  # patch teacher temperature in the warmup epochs ...
        teacher_temp_patch: float = 0.07  # ... and after them
        patch_temp_warmup_epochs: int = 1
        student_temp: float = 0.1
        centre_momentum: float = 0.9
        out_dim: int = 8192  # iBOT prototypes
        hidden_dim: int = 2048
        bottleneck_dim: int = 256
        decoder_heads: int | None = None  # None: 16 if the tower width allows, else the tower's heads
        decoder_depth: int = 1
        norm_pix_loss: bool = True
        clip_weight: float = 1.0
        cls_weight: float = 1.0
        patch_weight: float = 1.0
        rec_weight: float = 1.0
        freeze_patch_embed: bool = True  # the patch-embedding conv stays at its initial weights
        ema_text_tower: bool = False  # also keep an EMA text tower (only for evaluating the teacher)
        local_loss: bool = True
        gather_with_grad: bool = True

        def __post_init__(self):
            checks = {
                "keep_ratio": (0 <= self.keep_ratio < 1, "in [0, 1) (at 1 nothing would be removed)"),
                "ema_momentum": (0 <= self.ema_momentum <= 1, "in [0, 1]"),
                "centre_momentum": (0 <= self.centre_momentum <= 1, "in [0, 1]"),
                "patch_temp_warmup_epochs": (self.patch_temp_warmup_epochs >= 0, ">= 0"),
                "decoder_heads": (self.decoder_heads is None or self.decoder_heads >= 1, ">= 1 or null"),
                "decoder_depth": (self.decoder_depth >= 1, ">= 1"),
            }
            for key in ("teacher_temp_cls", "warmup_teacher_temp_patch", "teacher_temp_patch", "student_temp"):
                checks[key] = (getattr(self, key) > 0, "> 0")
            for key in ("out_dim", "hidden_dim", "bottleneck_dim"):
                checks[key] = (getattr(self, key) >= 1, ">= 1")
            for key in ("clip_weight", "cls_weight", "patch_weight", "rec_weight"):
                checks[key] = (getattr(self, key) >= 0, ">= 0")
            for key, (ok, expected) in checks.items():
                if not ok:
                    raise ConfigError(f"method.{key}: expected a value {expected}, got {getattr(self, key)!r}")

    def __init__(self, options: Options, model: FinegrainCLIP):
        super().__init__(options, model)
        grid = model.tower.grid_size(model.image_size)
        if grid[0] % 2 or grid[1] % 2:
            ph, pw = model.patch_size
            raise ValueError(f"detailclip removes 2x2-patch blocks and needs an even patch grid: image size "
                             f"{model.image_size} / patch size {model.patch_size} gives {grid}; use an image size "
                             f"that is a multiple of {(2 * ph, 2 * pw)}")
        width = model.tower.width
        heads = options.decoder_heads or (16 if width % 16 == 0 else model.tower.num_heads)
        if width % heads:
            raise ConfigError(f"method.decoder_heads: {heads} heads do not divide the vision width {width}")
        self.patch_size = model.patch_size
        self.patch_embed_prefix = model.tower.patch_embed_prefix
        self.decoder = MAEDecoder(width, heads, self.patch_size, depth=options.decoder_depth)
        self.ibot_head = IBOTHead(width, options.out_dim, options.hidden_dim, options.bottleneck_dim)
        self.cls_loss = IBOTClsLoss(options.out_dim, options.student_temp, options.centre_momentum)
        self.patch_loss = IBOTPatchLoss(options.out_dim, options.student_temp, options.centre_momentum)
        self.contrastive = ContrastiveLoss(options.local_loss, options.gather_with_grad)
        self.teacher = EMATeacher(self.students(model))

    def students(self, model: FinegrainCLIP) -> dict[str, nn.Module]:
        """The modules the teacher tracks: vision tower, iBOT head (and the text tower with ``ema_text_tower``)."""
        modules = {"visual": model.clip.visual, "head": self.ibot_head}
        if self.options.ema_text_tower:
            modules["text"] = text_part(model.clip)
        return modules

    # ----- schedules ----------------------------------------------------------------------------------
    def patch_teacher_temp(self, epoch: float) -> float:
        """The patch teacher temperature in (integer) ``epoch``: linear from the warmup to the final value
        over ``patch_temp_warmup_epochs`` epochs (one epoch: the warmup value in epoch 0), then the final."""
        o, e = self.options, int(epoch)
        if e >= o.patch_temp_warmup_epochs:
            return o.teacher_temp_patch
        if o.patch_temp_warmup_epochs == 1:
            return o.warmup_teacher_temp_patch
        return o.warmup_teacher_temp_patch + (o.teacher_temp_patch - o.warmup_teacher_temp_patch) * e / (
            o.patch_temp_warmup_epochs - 1)

    # ----- the objective ------------------------------------------------------------------------------
    def sample_spec(self) -> SampleSpec:
        return SampleSpec(views=2, augment="detailclip", caption="required")

    def forward(self, model: FinegrainCLIP, batch: dict[str, torch.Tensor],
                progress: Progress) -> dict[str, torch.Tensor]:
        o = self.options
        images = batch["image"]
        if images.ndim != 5 or images.shape[1] != 2:
            raise ValueError(f"detailclip needs batch['image'] of shape (B, 2, 3, H, W), got {tuple(images.shape)}")
        batch_size = images.shape[0]
        views = images.transpose(0, 1).flatten(0, 1)  # (2B, 3, H, W): every first view, then every second

        with torch.no_grad():
            teacher = self.teacher_pass(model, views)
            teacher_logits = self.teacher["head"](teacher.tokens)
            grid = teacher.grid_size
            removed = removal_mask(mean_cls_attention(teacher.cls_attention, grid), o.keep_ratio)
        kept = kept_indices(removed, 4 * keep_count(grid[0] * grid[1] // 4, o.keep_ratio))
        student = model.forward_tower(views, keep=kept, tokens=True)
        decoded, pixels = self.decoder(student.tokens, student.restore, grid)
        # encoder CLS + decoder patches (the released code overwrites the decoder's CLS in place)
        student_logits = self.ibot_head(torch.cat([student.tokens[:, :1], decoded[:, 1:]], dim=1))

        def per_view(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(0, (2, batch_size))

        student_logits, teacher_logits = per_view(student_logits), per_view(teacher_logits)
        removed_v = per_view(removed)
        patch_temp = self.patch_teacher_temp(progress.epoch)
        cls = self.cls_loss(student_logits[:, :, 0], teacher_logits[:, :, 0], o.teacher_temp_cls)
        patch = self.patch_loss(student_logits[:, :, 1:], teacher_logits[:, :, 1:], removed_v, patch_temp)
        rec = torch.stack([reconstruction_loss(p, x, m, self.patch_size, o.norm_pix_loss)
                           for p, x, m in zip(per_view(pixels), per_view(views), removed_v)]).mean()

        image = per_view(F.normalize(student.image_embed, dim=-1))
        text = model.encode_text(batch["text"], normalize=True)
        scale = model.logit_scale.exp()
        clip = (self.contrastive(image[0], text, scale) + self.contrastive(image[1], text, scale)) / 2

        metric = views.new_tensor
        return {"clip_loss": o.clip_weight * clip, "cls_loss": o.cls_weight * cls,
                "patch_loss": o.patch_weight * patch, "rec_loss": o.rec_weight * rec,
                "logit_scale": scale.detach(), "removed_fraction": removed.float().mean(),
                "teacher_temp_cls": metric(o.teacher_temp_cls), "teacher_temp_patch": metric(patch_temp),
                "ema_momentum": metric(self.ema_momentum(progress))}

    def teacher_pass(self, model: FinegrainCLIP, views: torch.Tensor) -> TowerOutput:
        """The EMA teacher on full views ``(N, 3, H, W)``: ``tokens`` and ``cls_attention`` (only the CLS
        query's row of each layer's attention is formed; every block runs fused attention)."""
        return model.with_visual(self.teacher["visual"]).forward_tower(views, cls_attention=True, tokens=True)

    def ema_momentum(self, progress: Progress) -> float:
        """The momentum of the teacher update after ``progress.step``: the cosine schedule (``ema_momentum``
        to 1) at the next step. The released code updates at the start of each step with that step's
        momentum, which is the same update."""
        return cosine_momentum(progress.step + 1, progress.total_steps, self.options.ema_momentum)

    @torch.no_grad()
    def after_step(self, model: FinegrainCLIP, progress: Progress) -> None:
        self.teacher.update(self.students(model), self.ema_momentum(progress))

    # ----- what the trainer asks ----------------------------------------------------------------------
    def param_rules(self) -> list[ParamRule]:
        return ([ParamRule(f"model.clip.visual.{self.patch_embed_prefix}", trainable=False)]
                if self.options.freeze_patch_embed else [])

    def teacher_model(self, model: FinegrainCLIP) -> FinegrainCLIP:
        """The EMA teacher as a model: its vision tower, with its EMA text tower when ``ema_text_tower``
        (else the student's text tower)."""
        teacher = model.with_visual(self.teacher["visual"])
        if self.options.ema_text_tower:
            text = self.teacher["text"]
            teacher.clip._parameters = text._parameters
            teacher.clip._buffers = text._buffers
            teacher.clip._modules = {name: text._modules.get(name, self.teacher["visual"])
                                     for name in model.clip._modules}
        return teacher

    def extra_eval_models(self, model: FinegrainCLIP) -> dict[str, FinegrainCLIP]:
        """Models evaluated besides :meth:`eval_model` (the student, which chooses ``best.pt``)."""
        return {"teacher": self.teacher_model(model)}

    @torch.no_grad()
    def removal_maps(self, model: FinegrainCLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's view of normalised ``images`` ``(B, 3, H, W)``: mean CLS attention ``(B, gh, gw)``
        and the removal mask ``(B, gh, gw)`` (True = removed) training would use."""
        out = model.with_visual(self.teacher["visual"]).forward_tower(images, cls_attention=True)
        attention = mean_cls_attention(out.cls_attention, out.grid_size)
        return attention, removal_mask(attention, self.options.keep_ratio).view_as(attention)

