"""A teacher: a frozen copy of some modules, optionally tracking them by exponential moving average.

``teacher = EMATeacher({"visual": model.clip.visual})`` deep-copies the modules (parameters with
``requires_grad=False``: outside the optimizer, always in eval mode). ``teacher.update({"visual":
model.clip.visual}, momentum)`` moves every parameter ``theta <- m * theta + (1 - m) * phi`` with one
foreach kernel and copies buffers. Kept as a submodule of a method, it is saved and restored with the
checkpoint; DDP broadcasts it from rank 0 at start, and the update is deterministic, so it is identical
on all ranks. Never updated, it is a frozen teacher (CLIPSelf).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """``final - (final - base) * (1 + cos(pi * step / total_steps)) / 2``: ``base`` at step 0, ``final`` at
    the end (DINO / iBOT / DetailCLIP's per-step schedule)."""
    progress = min(1.0, step / max(1, total_steps))
    return final - (final - base) * (1 + math.cos(math.pi * progress)) / 2


class EMATeacher(nn.Module):
    """Frozen copies of named modules, ``self.copies[name]``, updated by :meth:`update`."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.copies = nn.ModuleDict({name: copy.deepcopy(module) for name, module in modules.items()})
        self.requires_grad_(False)
        super().train(False)

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    def train(self, mode: bool = True) -> EMATeacher:
        """A teacher stays in eval mode whatever its parent's mode."""
        return super().train(False)

    @torch.no_grad()
    def update(self, students: dict[str, nn.Module], momentum: float) -> None:
        """``theta <- momentum * theta + (1 - momentum) * phi`` for every parameter; buffers are copied."""
        if set(students) != set(self.copies):
            raise ValueError(f"teacher holds {sorted(self.copies)}, got students {sorted(students)}")
        teacher, student = [], []
        for name, module in self.copies.items():
            t_params, s_params = dict(module.named_parameters()), dict(students[name].named_parameters())
            if t_params.keys() != s_params.keys():
                raise ValueError(f"teacher {name!r} and its student have different parameters")
            teacher += list(t_params.values())
            student += [s_params[k].detach().to(t_params[k].dtype) for k in t_params]
            for t_buf, s_buf in zip(module.buffers(), students[name].buffers()):
                t_buf.copy_(s_buf)
        if momentum < 1.0:
            torch._foreach_lerp_(teacher, student, 1.0 - momentum)
