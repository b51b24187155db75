"""What every fine-tuning task shares: a :class:`~finegrain.models.backbone.ViTBackbone` over the model's vision
tower, its parameter rules (text tower frozen, layer-wise learning-rate decay or a frozen backbone) and its dense
sample spec.

A task is a :class:`~finegrain.objectives.Method`: ``forward(model, batch, progress) -> {name: loss}`` on batches
of :class:`~finegrain.sample_spec.DenseTargets` samples, with heads it owns, run by finegrain's trainer (DDP,
precision, accumulation, checkpoints, resume, logging) like any pretraining method; its own evaluations
(:attr:`~finegrain.objectives.Method.evaluations`) score the trained heads on ``data.val``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import DataError
from ..models import FinegrainCLIP
from ..models.backbone import ViTBackbone, layer_decay_rules
from ..objectives import Method
from ..param_rules import ParamRule

TOWER_PREFIX = "model.clip.visual"  # the vision tower's name in the trainer's module
NORMS = ("sync_batch", "batch", "group")


def convert_norms(module: nn.Module, kind: str) -> nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` by the ``kind`` of :data:`NORMS`: ``sync_batch`` (the releases'
    SyncBN; needs CUDA when distributed), ``batch`` (per-process statistics) or ``group`` (32 groups or fewer;
    per sample, so any process layout gives the same result)."""
    if kind not in NORMS:
        raise DataError(f"method.norm must be one of {NORMS}, got {kind!r}")
    if kind == "sync_batch":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if kind == "group":
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.GroupNorm(math.gcd(32, child.num_features), child.num_features))
            else:
                convert_norms(child, kind)
    return module


def zero_padding(images: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """``(B, 3, H, W)`` normalised images with the pixels outside each image's ``(h, w)`` set to 0 (mmseg and
    mmdet pad normalised images with 0: the mean colour)."""
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    h = torch.tensor([s[0] for s in sizes], device=images.device)
    w = torch.tensor([s[1] for s in sizes], device=images.device)
    inside = (rows[None, :, None] < h[:, None, None]) & (cols[None, None, :] < w[:, None, None])
    return images * inside[:, None].to(images.dtype)


@dataclass
class BackboneOptions:
    """The backbone of a fine-tuning task (``method.backbone.*``)."""

    # blocks read: 0-based indices (ints, negative from the end) or fractions of the depth (floats in (0, 1]:
    # [0.34, 0.5, 0.67, 1.0] is [3, 5, 7, 11] of 12 blocks, [0, 1, 2, 3] of 4); default those fractions
    blocks: list[int | float] | None = None
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly to this over the blocks
    layer_decay: float = 0.65  # lr of block i: lr * layer_decay ** (L - i); embeddings lowest
    frozen: bool = False  # train the heads only (F-ViT's frozen CLIP)
    final_norm: bool = False  # block maps through the tower's final norm, trained with the heads (iBOT's out_with_norm)


@dataclass
class TaskOptions:
    """Options every task has; tasks extend it."""

    backbone: BackboneOptions = field(default_factory=BackboneOptions)
    norm: str = "batch"  # the heads' and pyramid's BatchNorm2d: sync_batch | batch | group (convert_norms)


class DenseTask(Method):
    """Base of the fine-tuning tasks: builds :attr:`backbone` (the model's tower, not re-registered: the
    checkpoint keeps it once, under ``state_dict``) and the parameter rules. ``pyramid`` says whether the task
    reads four block maps through the simple feature pyramid; ``v_only_last`` whether the last block's map is
    its attention-free (v-only) output."""

    Options = TaskOptions
    pyramid = True
    v_only_last = False

    def __init__(self, options: TaskOptions, model: FinegrainCLIP):
        super().__init__(options, model)
        opts = options.backbone
        if not 0 < opts.layer_decay <= 1:
            raise DataError(f"method.backbone.layer_decay must lie in (0, 1], got {opts.layer_decay}")
        self.backbone = ViTBackbone(model, opts.blocks, pyramid=self.pyramid,
                                    drop_path_rate=0.0 if opts.frozen else opts.drop_path_rate, own_tower=False,
                                    v_only_last=self.v_only_last, final_norm=opts.final_norm)

    def param_rules(self) -> list[ParamRule]:
        """The text tower (and the rest of the CLIP: logit scale, projections) frozen; the vision tower trained
        with layer-wise lr decay, or frozen with ``backbone.frozen``; what follows its blocks frozen (but its final
        norm with ``backbone.final_norm``, at the heads' learning rate)."""
        opts = self.options.backbone
        rules = [ParamRule("model", trainable=False), ParamRule(TOWER_PREFIX, trainable=not opts.frozen)]
        rules += [ParamRule(f"{TOWER_PREFIX}.{prefix}", trainable=False) for prefix in self.backbone.post_prefixes]
        if not opts.frozen:
            rules += layer_decay_rules(self.backbone, TOWER_PREFIX, opts.layer_decay)
        return rules

    def train(self, mode: bool = True) -> DenseTask:
        """A frozen backbone stays in eval mode (no dropout, no drop path) while the heads train."""
        super().train(mode)
        if self.options.backbone.frozen:
            self.backbone.tower_module.eval()
        return self
