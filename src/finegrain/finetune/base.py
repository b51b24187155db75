"""What every fine-tuning task shares: a :class:`~finegrain.models.backbone.ViTBackbone` over the model's vision
tower, its parameter rules (text tower frozen, layer-wise learning-rate decay or a frozen backbone) and its dense
sample spec.

A task is a :class:`~finegrain.objectives.Method`: ``forward(model, batch, progress) -> {name: loss}`` on batches
of :class:`~finegrain.sample_spec.DenseTargets` samples, with heads it owns, run by finegrain's trainer (DDP,
precision, accumulation, checkpoints, resume, logging) like any pretraining method; its own evaluations
(:attr:`~finegrain.objectives.Method.evaluations`) score the trained heads on ``data.val``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models import FinegrainCLIP
from ..models.backbone import ViTBackbone, layer_decay_rules
from ..objectives import Method
from ..param_rules import ParamRule

TOWER_PREFIX = "model.clip.visual"  # the vision tower's name in the trainer's module


@dataclass
class BackboneOptions:
    """The backbone of a fine-tuning task (``method.backbone.*``)."""

    blocks: list[int] | None = None  # 0-based blocks read; default 4/6/8/12 of 12 (the same fractions of deeper towers)
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly to this over the blocks
    layer_decay: float = 0.65  # lr of block i: lr * layer_decay ** (L - i); embeddings lowest
    frozen: bool = False  # train the heads only (F-ViT's frozen CLIP)


@dataclass
class TaskOptions:
    """Options every task has; tasks extend it."""

    backbone: BackboneOptions = field(default_factory=BackboneOptions)


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
            raise ValueError(f"method.backbone.layer_decay must lie in (0, 1], got {opts.layer_decay}")
        self.backbone = ViTBackbone(model, opts.blocks, pyramid=self.pyramid,
                                    drop_path_rate=0.0 if opts.frozen else opts.drop_path_rate, own_tower=False,
                                    v_only_last=self.v_only_last)

    def param_rules(self) -> list[ParamRule]:
        """The text tower (and the rest of the CLIP: logit scale, projections) frozen; the vision tower trained
        with layer-wise lr decay, or frozen with ``backbone.frozen``; what follows its blocks always frozen."""
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
