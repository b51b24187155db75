"""The method interface: what a training objective is to the trainer and the data pipeline.

Every hook has a default that gives plain CLIP; a method overrides only what it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import FinegrainCLIP
from ..param_rules import ParamRule
from ..sample_spec import SampleSpec


@dataclass(frozen=True)
class Progress:
    """Where training is, handed to a method every step (for schedules by step or by epoch)."""

    step: int  # the optimizer step being computed, 0-based
    total_steps: int
    epoch: float  # fractional epoch of the data position

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)


@dataclass(frozen=True)
class EvalContext:
    """What a method's own evaluation (:meth:`Method.evaluate`) is given: the held-out records (parsed), their
    image root, ``data.val.path`` (e.g. the COCO json holding the ground truth), where to run and how, and the
    run's eval folder for files an evaluation writes (e.g. a detections json); None outside a run; ``skipped``: the
    held-out records the reader left out (malformed), counted with the images that cannot be read."""

    records: Sequence
    root: Path
    path: str
    device: torch.device
    batch_size: int
    progress: bool = False
    output_dir: Path | None = None
    skipped: int = 0


@dataclass
class NoOptions:
    """A method without options."""


class Method(nn.Module):
    """A training objective: ``forward(model, batch, progress) -> {name: tensor}``.

    Keys ending in ``_loss`` are summed (with any weights applied by the method itself) into the
    training loss; other keys are logged metrics (scalars). A method may own modules: trainable ones
    (heads, a decoder) join the optimizer; all of them (an EMA teacher, centring buffers too) are saved
    and restored with the checkpoint under ``"method"``.

    A method either overrides :meth:`forward`, or splits it into :meth:`features` (per-sample tensors,
    first dimension = samples or regions of the batch) and :meth:`loss` (features -> losses). The split
    lets gradient accumulation cache features so that contrastive negatives span the whole accumulated
    batch (open_clip's ``accum_freq``); without it each micro-batch is its own batch.
    """

    Options: type = NoOptions
    # evaluation tasks this method brings (e.g. a fine-tuned head's mIoU), usable in train.eval_tasks
    evaluations: tuple[str, ...] = ()

    def __init__(self, options, model: FinegrainCLIP):
        super().__init__()
        self.options = options

    # ----- the objective ------------------------------------------------------------------------------
    def sample_spec(self) -> SampleSpec:
        """What each training sample must carry; the data pipeline builds exactly this."""
        return SampleSpec()

    def region_settings(self) -> str:
        """The options that make this method train on the records' regions (a spec with ``regions``), named
        when the training data turns out to have none."""
        return "its region options"

    def forward(self, model: FinegrainCLIP, batch: dict[str, torch.Tensor],
                progress: Progress) -> dict[str, torch.Tensor]:
        return self.loss(model, self.features(model, batch, progress), progress)

    def features(self, model: FinegrainCLIP, batch: dict[str, torch.Tensor],
                 progress: Progress) -> dict[str, torch.Tensor]:
        """Per-sample tensors the loss needs; concatenated along dim 0 across accumulated micro-batches."""
        raise NotImplementedError(f"{type(self).__name__} implements neither forward nor features/loss")

    def loss(self, model: FinegrainCLIP, features: dict[str, torch.Tensor],
             progress: Progress) -> dict[str, torch.Tensor]:
        """Named losses (and metrics) from :meth:`features` of one or more micro-batches."""
        raise NotImplementedError

    @property
    def caches_features(self) -> bool:
        """Whether :meth:`features`/:meth:`loss` are implemented (cached-feature accumulation works)."""
        return type(self).features is not Method.features

    @torch.no_grad()
    def after_step(self, model: FinegrainCLIP, progress: Progress) -> None:
        """Update non-trainable state (e.g. an EMA teacher) after the optimizer step."""

    # ----- what the trainer asks ----------------------------------------------------------------------
    def param_rules(self) -> list[ParamRule]:
        """Freezing / per-module lr and weight decay (e.g. a frozen patch embedding); the config's
        ``optim.param_groups`` rules come after these and win."""
        return []

    def ddp_options(self) -> dict:
        """Extra ``DistributedDataParallel`` keyword arguments, e.g. ``{"find_unused_parameters": True}``
        when some trainable parameter does not take part in every step."""
        return {}

    def eval_model(self, model: FinegrainCLIP) -> FinegrainCLIP:
        """The model evaluated during training and kept as ``best.pt`` (e.g. an EMA teacher's)."""
        return model

    def extra_eval_models(self, model: FinegrainCLIP) -> dict[str, FinegrainCLIP]:
        """More models evaluated at each evaluation with the same tasks, by name (e.g. ``{"teacher":
        model.with_visual(teacher)}``); their metrics are logged and printed as ``<name>/<task>/<metric>``.
        ``best.pt`` is still chosen by :meth:`eval_model`'s metrics."""
        return {}

    def evaluate(self, task: str, model: FinegrainCLIP, context: EvalContext) -> dict[str, float]:
        """Metrics of the evaluation task ``task`` (one of :attr:`evaluations`) on the held-out data, by name."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation {task!r}")

    def check_held_out(self, task: str, context: EvalContext) -> None:
        """Raise a ``DataError`` naming the file, record and field when the evaluation ``task`` (one of
        :attr:`evaluations`) cannot score the held-out data; called before the first step. Default: nothing."""

    def result_options(self, task: str) -> dict:
        """What the result of the evaluation ``task`` records besides its data and step (e.g. the head it
        scored), in ``<run>/eval/results.jsonl``."""
        return {}

    def export_model(self, model: FinegrainCLIP) -> FinegrainCLIP:
        """The model written as the checkpoint's ``state_dict`` and by ``finegrain export`` (e.g. weights
        ensembled from student and teacher). Training resumes from the trained weights either way."""
        return self.eval_model(model)
