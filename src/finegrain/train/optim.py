"""AdamW over parameter groups built from weight-decay exemptions and :class:`ParamRule` s, a per-step
warmup + cosine / poly / step learning-rate schedule, and step counts derived from epoch counts."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..config import EPOCH_COUNTS, ExperimentConfig, OptimConfig
from ..errors import ConfigError, DataError
from ..models.clip import open_clip_no_decay
from ..param_rules import ParamRule


def no_decay_names(module: nn.Module) -> set[str]:
    """Parameter names of ``module`` exempt from weight decay: those open_clip's trainer rule exempts
    (:func:`open_clip_no_decay`: rank < 2, norms, biases, logit scale), and those a submodule lists in its
    own ``no_weight_decay()`` (names relative to it, e.g. a head's ``mask_token``; timm's convention). The
    outermost module with a list speaks for everything below it: ``FinegrainCLIP``'s list (open_clip's
    trainer rule) stands for the open_clip model inside it, whose own list would exempt position
    embeddings that open_clip's trainer decays."""
    names = {n for n, p in module.named_parameters() if open_clip_no_decay(n, p)}

    def visit(prefix: str, mod: nn.Module) -> None:
        if callable(getattr(mod, "no_weight_decay", None)):
            names.update(f"{prefix}{n}" for n in mod.no_weight_decay())
            return
        for child_name, child in mod.named_children():
            visit(f"{prefix}{child_name}.", child)

    visit("", module)
    return names


def apply_trainable_rules(module: nn.Module, rules: Sequence[ParamRule]) -> None:
    """Freeze / unfreeze parameters per the rules' ``trainable`` field (the last matching rule wins).
    A rule that matches no parameter is an error naming it."""
    names = [n for n, _ in module.named_parameters()]
    for rule in rules:
        if not any(rule.matches(n) for n in names):
            raise DataError(f"parameter rule prefix {rule.prefix!r} matches no parameter; names look like "
                            f"{names[:3]}")
    for name, p in module.named_parameters():
        for rule in rules:
            if rule.trainable is not None and rule.matches(name):
                p.requires_grad_(rule.trainable)


def create_optimizer(module: nn.Module, cfg: OptimConfig, rules: Sequence[ParamRule] = (),
                     fused: bool = False) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``module``, one group per (weight decay, lr scale).

    A parameter's decay is 0 when exempt (:func:`no_decay_names`; nothing is with ``cfg.decay_all``), else the
    last matching rule's ``weight_decay`` or ``cfg.weight_decay``; its ``lr_scale`` (group key) multiplies the
    scheduled lr.
    """
    exempt = set() if cfg.decay_all else no_decay_names(module)
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay, scale = cfg.weight_decay, 1.0
        for rule in rules:
            if rule.matches(name):
                decay = rule.weight_decay if rule.weight_decay is not None else decay
                scale = rule.lr_scale if rule.lr_scale is not None else scale
        groups.setdefault((0.0 if name in exempt else decay, scale), []).append(p)
    param_groups = [{"params": params, "weight_decay": decay, "lr_scale": scale}
                    for (decay, scale), params in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def scheduled_lr(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning rate of ``cfg.schedule`` at ``step``, ignoring warmup. ``cosine``: from ``lr`` to ``min_lr``
    over the steps after ``warmup_steps``; ``poly``: ``(lr - min_lr) (1 - step / total_steps) ** poly_power +
    min_lr`` over the whole run (mmcv's ``PolyLrUpdaterHook``); ``step``: ``lr`` times ``step_gamma`` for each
    of ``step_milestones`` (fractions of the run) reached; ``constant``: ``lr``."""
    if cfg.schedule == "poly":
        return (cfg.lr - cfg.min_lr) * (1 - step / max(1, total_steps)) ** cfg.poly_power + cfg.min_lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** sum(step >= round(m * total_steps) for m in cfg.step_milestones)
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0, step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def learning_rate(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps``, then :func:`scheduled_lr`.

    The warmup goes from ``lr/warmup_steps`` at step 0 to ``lr`` at step ``warmup_steps - 1``; with
    ``warmup_start_lr`` from that value at step 0 to ``lr`` at step ``warmup_steps - 1`` (DetailCLIP's
    ``np.linspace(start, lr, warmup_steps)``, so ``lr`` is reached at the last warmup step and again at the
    first cosine step); with ``warmup_ratio`` as mmcv's linear warmup of the mmseg / mmdet recipes: the
    scheduled rate times ``1 - (1 - step / warmup_steps) (1 - warmup_ratio)``.
    """
    if step < cfg.warmup_steps:
        if cfg.warmup_ratio is not None:
            factor = 1 - (1 - step / cfg.warmup_steps) * (1 - cfg.warmup_ratio)
            return scheduled_lr(step, total_steps, cfg) * factor
        if cfg.warmup_start_lr is None:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / max(1, cfg.warmup_steps - 1)
    return scheduled_lr(step, total_steps, cfg)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def steps_for_epochs(epochs: float, epochs_per_step: float, keys: str) -> int:
    """The fewest optimizer steps after which the epoch counter (``Progress.epoch``) reaches ``epochs``:
    ``ceil(epochs / epochs_per_step)`` (rounded to 1e-6 first, so float error never adds a step).
    ``epochs_per_step`` is the share of an epoch one step consumes; 0 means the epoch size is unknown."""
    if epochs_per_step <= 0:
        raise ConfigError(f"{keys} needs the size of an epoch, which WebDataset shards do not tell: set "
                          "data.train.samples_per_epoch (samples in one pass over the shards)")
    return math.ceil(round(epochs / epochs_per_step, 6))


def derive_epoch_schedule(cfg: ExperimentConfig, epochs_per_step: float) -> ExperimentConfig:
    """``cfg`` with ``train.steps`` / ``optim.warmup_steps`` counted from ``train.epochs`` /
    ``optim.warmup_epochs`` where those are set (:func:`steps_for_epochs`); unchanged otherwise. A step
    count that was given too must equal the derived one, else a :class:`ConfigError` names both keys."""
    counts = {}
    for section, steps_key, epochs_key in EPOCH_COUNTS:
        part = getattr(cfg, section)
        epochs, given = getattr(part, epochs_key), getattr(part, steps_key)
        if epochs is None:
            continue
        derived = steps_for_epochs(epochs, epochs_per_step, f"{section}.{epochs_key}")
        if given is not None and given != derived:
            raise ConfigError(f"{section}.{steps_key}={given} disagrees with {section}.{epochs_key}={epochs}, "
                              f"which is {derived} steps here ({1 / epochs_per_step:.6g} steps per epoch): set "
                              f"only one ({section}.{steps_key}=null counts by epochs)")
        counts[section] = dataclasses.replace(part, **{steps_key: derived})
    return dataclasses.replace(cfg, **counts)
