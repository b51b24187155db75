"""The method interface: what a training objective is to the trainer and the data pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.sample import SampleSpec


@dataclass(frozen=True)
class Progress:
    """Where training is, handed to a method every step (for schedules by step or by epoch)."""

    step: int  # the optimizer step being computed, 0-based
    total_steps: int
    epoch: float  # fractional epoch of the data position

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)


@dataclass
class NoOptions:
    """A method without options."""


class Method(nn.Module):
    """A training objective: ``forward(model, batch, progress) -> {name: tensor}``.

    Keys ending in ``_loss`` are summed (with any weights applied by the method itself) into the
    training loss; other keys are logged metrics. A method may own modules: trainable ones (heads, a
    decoder) join the optimizer; non-trainable state (an EMA teacher, centring buffers) is saved and
    restored with the checkpoint under ``"method"``. :meth:`after_step` runs after every optimizer step.
    """

    Options: type = NoOptions

    def __init__(self, options, model: nn.Module):
        super().__init__()
        self.options = options

    def sample_spec(self) -> SampleSpec:
        """What each training sample must carry; the data pipeline builds exactly this."""
        return SampleSpec()

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, model: nn.Module, progress: Progress) -> None:
        """Update non-trainable state (e.g. an EMA teacher) after the optimizer step."""
