"""DetailCLIP: CLIP + iBOT self-distillation + MAE reconstruction on attention-guided token removal.

Per step, for two augmented views of each image: the EMA teacher (vision tower + iBOT head) encodes both
views in full; its CLS attention picks the 2x2-patch blocks each view keeps; the student encodes CLS +
kept patches only, and a one-block decoder restores every position. Losses: CLIP (each view's encoder
CLS vs the caption), cross-view CLS distillation (encoder CLS), same-view patch distillation and pixel
reconstruction on the removed patches (decoder tokens). See docs/detailclip.md.

The passes, teacher, decoder and heads are the ``token_removal`` source; the losses are the terms
``two_view_clip``, ``ibot_cls``, ``ibot_patch`` and ``pixel_reconstruction``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from ..models import EMATeacher, FinegrainCLIP, cosine_momentum
from ..models.decoder import MAEDecoder
from ..models.heads import IBOTHead
from ..models.tower import TowerOutput
from ..param_rules import ParamRule
from .base import Progress
from .fineclip import GlobalContrastive
from .ibot import Centre, centred_cls_loss, centred_patch_loss
from .pixel_reconstruction import reconstruction_loss
from .registry import register_method
from .sources import TextSource
from .term import Features, Source, Term, TermOptions, register_source, register_term
from .term_method import TermMethod, TermSpec
from .token_removal import keep_count, kept_indices, mean_cls_attention, removal_mask


def text_part(clip: nn.Module) -> nn.Module:
    """A view of an open_clip model without its vision tower (text tower, logit scale); shares parameters."""
    view = copy.copy(clip)
    view._modules = {name: module for name, module in clip._modules.items() if name != "visual"}
    return view


def per_view(x: torch.Tensor, views: int = 2) -> torch.Tensor:
    """``(V*B, ...)`` rows, every first view then every second, -> ``(V, B, ...)``."""
    return x.unflatten(0, (views, x.shape[0] // views))


@register_source
class TokenRemovalSource(Source):
    """DetailCLIP's passes over two augmented views of each image (``batch["views"]`` beside an
    unaugmented image, else ``batch["image"]``), flattened ``(2B, ...)``, every first view then every
    second: the EMA teacher (tower + iBOT head) on full views gives ``teacher_logits`` ``(2B, 1+N, K)`` and
    the CLS attention that picks the ``removed`` patches ``(2B, N)``; the student's kept-token pass gives
    ``view_image`` ``(2B, D)`` (L2-normalised), ``view_dense`` (its dense map, kept patches only, in the
    same pass), and through the decoder ``pixels`` ``(2B, N, p*p*3)`` and ``student_logits`` (encoder CLS +
    decoder patches through the iBOT head). Holds ``teacher``, ``decoder`` and ``ibot_head``."""

    name = "token_removal"
    order = 4
    provides = frozenset({"views", "removed", "teacher_logits", "student_logits", "pixels", "view_image",
                          "view_dense"})
    per_sample = False

    @dataclass
    class Options:
        keep_ratio: float = 0.5  # keeps floor(n_blocks * keep_ratio) + 1 blocks (released as "mask_ratio")
        ema_momentum: float = 0.996  # teacher momentum at step 0, cosine to 1 at the last step
        out_dim: int = 8192  # iBOT prototypes
        hidden_dim: int = 2048
        bottleneck_dim: int = 256
        decoder_heads: int | None = None  # None: 16 if the tower width allows, else the tower's heads
        decoder_depth: int = 1
        freeze_patch_embed: bool = True  # the patch-embedding conv stays at its initial weights
        ema_text_tower: bool = False  # also keep an EMA text tower (only for evaluating the teacher)

    def __init__(self, options: Options, model: FinegrainCLIP, needed: set[str]):
        super().__init__(options, model, needed)
        grid = model.tower.grid_size(model.image_size)
        if grid[0] % 2 or grid[1] % 2:
            ph, pw = model.patch_size
            raise DataError(f"detailclip removes 2x2-patch blocks and needs an even patch grid: image size "
                            f"{model.image_size} / patch size {model.patch_size} gives {grid}; use an image size "
                            f"that is a multiple of {(2 * ph, 2 * pw)}")
        width = model.tower.width
        heads = options.decoder_heads or (16 if width % 16 == 0 else model.tower.num_heads)
        if width % heads:
            raise ConfigError(f"method.decoder_heads: {heads} heads do not divide the vision width {width}")
        self.patch_embed_prefix = model.tower.patch_embed_prefix
        self.decoder = MAEDecoder(width, heads, model.patch_size, depth=options.decoder_depth)
        self.ibot_head = IBOTHead(width, options.out_dim, options.hidden_dim, options.bottleneck_dim)
        self.teacher = EMATeacher(self.students(model))

    def students(self, model: FinegrainCLIP) -> dict[str, nn.Module]:
        """The modules the teacher tracks: vision tower, iBOT head (and the text tower with ``ema_text_tower``)."""
        modules = {"visual": model.clip.visual, "head": self.ibot_head}
        if self.options.ema_text_tower:
            modules["text"] = text_part(model.clip)
        return modules

    def sample_request(self) -> dict:
        return {"views": 2, "augment": "detailclip"}

    def compute(self, model, batch, out: Features, progress: Progress) -> None:
        images = batch["views"] if "views" in batch else batch["image"]
        if images.ndim != 5 or images.shape[1] != 2:
            raise ValueError(f"detailclip needs two views per image, (B, 2, 3, H, W), got {tuple(images.shape)}")
        views = images.transpose(0, 1).flatten(0, 1)  # (2B, 3, H, W): every first view, then every second
        keep_ratio = self.options.keep_ratio
        with torch.no_grad():
            teacher = self.teacher_pass(model, views)
            teacher_logits = self.teacher["head"](teacher.tokens)
            grid = teacher.grid_size
            removed = removal_mask(mean_cls_attention(teacher.cls_attention, grid), keep_ratio)
        kept = kept_indices(removed, 4 * keep_count(grid[0] * grid[1] // 4, keep_ratio))
        student = model.forward_tower(views, keep=kept, tokens=True,
                                      dense="v_only" if "view_dense" in self.needed else None)
        out.update(views=views, removed=removed, teacher_logits=teacher_logits)
        if self.needed & {"pixels", "student_logits"}:
            decoded, out["pixels"] = self.decoder(student.tokens, student.restore, grid)
            # encoder CLS + decoder patches (the released code overwrites the decoder's CLS in place)
            out["student_logits"] = self.ibot_head(torch.cat([student.tokens[:, :1], decoded[:, 1:]], dim=1))
        out["view_image"] = F.normalize(student.image_embed, dim=-1)
        if "view_dense" in self.needed:
            out["view_dense"] = student.dense

    def teacher_pass(self, model: FinegrainCLIP, views: torch.Tensor) -> TowerOutput:
        """The EMA teacher on full views ``(N, 3, H, W)``: ``tokens`` and ``cls_attention`` (only the CLS
        query's row of each layer's attention is formed; every block runs fused attention)."""
        return model.with_visual(self.teacher["visual"]).forward_tower(views, cls_attention=True, tokens=True)

    def ema_momentum(self, progress: Progress) -> float:
        """The momentum of the teacher update after ``progress.step``: the cosine schedule (``ema_momentum``
        to 1) at the next step. The released code updates at the start of each step with that step's
        momentum, which is the same update."""
        return cosine_momentum(progress.step + 1, progress.total_steps, self.options.ema_momentum)

    def metrics(self, features: Features, progress: Progress) -> dict[str, torch.Tensor]:
        removed = features["removed"]
        return {"removed_fraction": removed.float().mean(),
                "ema_momentum": removed.new_tensor(self.ema_momentum(progress), dtype=torch.float32)}

    @torch.no_grad()
    def after_step(self, model: FinegrainCLIP, progress: Progress) -> None:
        self.teacher.update(self.students(model), self.ema_momentum(progress))

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
        return {"teacher": self.teacher_model(model)}

    @torch.no_grad()
    def removal_maps(self, model: FinegrainCLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's view of normalised ``images`` ``(B, 3, H, W)``: mean CLS attention ``(B, gh, gw)``
        and the removal mask ``(B, gh, gw)`` (True = removed) training would use."""
        out = model.with_visual(self.teacher["visual"]).forward_tower(images, cls_attention=True)
        attention = mean_cls_attention(out.cls_attention, out.grid_size)
        return attention, removal_mask(attention, self.options.keep_ratio).view_as(attention)


@register_term("two_view_clip")
class TwoViewCLIP(GlobalContrastive):
    """DetailCLIP's CLIP loss: the mean over the two views of InfoNCE of the student's kept-token global
    embedding vs the caption."""

    needs = frozenset({"view_image", "text"})
    per_sample = False

    def loss(self, model, features: Features, progress: Progress) -> torch.Tensor:
        image, text, scale = per_view(features["view_image"]), features["text"], model.logit_scale.exp()
        return (self.contrastive(image[0], text, scale) + self.contrastive(image[1], text, scale)) / 2


@register_term("ibot_cls")
class IBOTCls(Term):
    """Cross-view CLS self-distillation: the student's encoder CLS logits of one view against the EMA
    teacher's centred, sharpened CLS targets of the other."""

    @dataclass
    class Options(TermOptions):
        teacher_temp: float = 0.04
        student_temp: float = 0.1
        centre_momentum: float = 0.9

    needs = frozenset({"student_logits", "teacher_logits"})
    per_sample = False

    def __init__(self, options: Options, sources):
        super().__init__(options, sources)
        self.centre = Centre((1, sources["token_removal"].options.out_dim), options.centre_momentum)

    def loss(self, model, features: Features, progress: Progress) -> torch.Tensor:
        o = self.options
        return centred_cls_loss(per_view(features["student_logits"][:, 0]),
                                per_view(features["teacher_logits"][:, 0]), self.centre, o.teacher_temp,
                                o.student_temp)

    def metrics(self, features: Features, progress: Progress) -> dict[str, torch.Tensor]:
        return {"teacher_temp_cls": features["removed"].new_tensor(self.options.teacher_temp, dtype=torch.float32)}


@register_term("ibot_patch")
class IBOTPatch(Term):
    """Same-view patch self-distillation on the removed patches: decoder patch logits against the EMA
    teacher's centred targets, the teacher temperature warming up by epoch."""

    @dataclass
    class Options(TermOptions):
        warmup_teacher_temp: float = 0.04  # teacher temperature in the warmup epochs ...
        teacher_temp: float = 0.07  # ... and after them
        warmup_epochs: int = 1
        student_temp: float = 0.1
        centre_momentum: float = 0.9

    needs = frozenset({"student_logits", "teacher_logits", "removed"})
    per_sample = False

    def __init__(self, options: Options, sources):
        super().__init__(options, sources)
        self.centre = Centre((1, 1, sources["token_removal"].options.out_dim), options.centre_momentum)

    def teacher_temp(self, epoch: float) -> float:
        """The teacher temperature in (integer) ``epoch``: linear from the warmup to the final value over
        ``warmup_epochs`` epochs (one epoch: the warmup value in epoch 0), then the final."""
        o, e = self.options, int(epoch)
        if e >= o.warmup_epochs:
            return o.teacher_temp
        if o.warmup_epochs == 1:
            return o.warmup_teacher_temp
        return o.warmup_teacher_temp + (o.teacher_temp - o.warmup_teacher_temp) * e / (o.warmup_epochs - 1)

    def loss(self, model, features: Features, progress: Progress) -> torch.Tensor:
        return centred_patch_loss(per_view(features["student_logits"][:, 1:]),
                                  per_view(features["teacher_logits"][:, 1:]), per_view(features["removed"]),
                                  self.centre, self.teacher_temp(progress.epoch), self.options.student_temp)

    def metrics(self, features: Features, progress: Progress) -> dict[str, torch.Tensor]:
        return {"teacher_temp_patch": features["removed"].new_tensor(self.teacher_temp(progress.epoch),
                                                                     dtype=torch.float32)}


@register_term("pixel_reconstruction")
class PixelReconstruction(Term):
    """MAE pixel reconstruction of the removed patches of each view, per-patch normalised targets."""

    @dataclass
    class Options(TermOptions):
        norm_pix_loss: bool = True

    needs = frozenset({"pixels", "views", "removed"})
    per_sample = False

    def loss(self, model, features: Features, progress: Progress) -> torch.Tensor:
        return torch.stack([reconstruction_loss(p, x, m, model.patch_size, self.options.norm_pix_loss)
                            for p, x, m in zip(per_view(features["pixels"]), per_view(features["views"]),
                                               per_view(features["removed"]))]).mean()


@register_method("detailclip")
class DetailCLIP(TermMethod):
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
        lock_text: bool = False  # freeze the text tower (as FineCLIP's fine-tuning; the paper trains it)
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

    @classmethod
    def parts_of(cls, o: Options) -> tuple[list[TermSpec], dict]:
        terms = [TermSpec(TwoViewCLIP, "clip", TwoViewCLIP.Options(o.clip_weight, o.local_loss, o.gather_with_grad)),
                 TermSpec(IBOTCls, "cls", IBOTCls.Options(o.cls_weight, o.teacher_temp_cls, o.student_temp,
                                                          o.centre_momentum)),
                 TermSpec(IBOTPatch, "patch", IBOTPatch.Options(o.patch_weight, o.warmup_teacher_temp_patch,
                                                                o.teacher_temp_patch, o.patch_temp_warmup_epochs,
                                                                o.student_temp, o.centre_momentum)),
                 TermSpec(PixelReconstruction, "rec", PixelReconstruction.Options(o.rec_weight, o.norm_pix_loss))]
        sources = {"token_removal": TokenRemovalSource.Options(o.keep_ratio, o.ema_momentum, o.out_dim, o.hidden_dim,
                                                               o.bottleneck_dim, o.decoder_heads, o.decoder_depth,
                                                               o.freeze_patch_embed, o.ema_text_tower),
                   "text": TextSource.Options(lock_text=o.lock_text)}
        return terms, sources

    # ----- DetailCLIP's parts by their old names (tests, viz) -----------------------------------------
    @property
    def token_removal(self) -> TokenRemovalSource:
        return self.sources["token_removal"]

    def students(self, model: FinegrainCLIP) -> dict[str, nn.Module]:
        return self.token_removal.students(model)

    def patch_teacher_temp(self, epoch: float) -> float:
        return self.terms["patch"].teacher_temp(epoch)

    def teacher_model(self, model: FinegrainCLIP) -> FinegrainCLIP:
        return self.token_removal.teacher_model(model)

    def removal_maps(self, model: FinegrainCLIP, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_removal.removal_maps(model, images)
