"""Checks a run makes before it spends time on set-up: the data it is told to read exists, the held-out data has
what ``train.eval_tasks`` need, and settings that cannot work on this machine or in this run are said once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import ExperimentConfig
from ..data.loader import folder_of, is_folder_source, is_webdataset, resolve_source
from ..data.records import Record
from ..data.webdataset import expand_urls
from ..errors import ConfigError
from ..eval.encode import parsed_records
from ..eval.tasks import check_task_data
from ..models.factory import checkpoint_model_name
from ..objectives import get_method_class


def check_data_paths(cfg: ExperimentConfig) -> None:
    """Raise a :class:`ConfigError` naming each ``data.train`` / ``data.val`` file or root that does not exist.

    ``demo:`` sources are generated on demand and pass; for WebDataset shards the first shard of the
    expanded brace pattern is checked. Not part of :func:`finegrain.config.build_config`, so a config whose
    data is not there yet still loads and prints (``finegrain config`` shows these as warnings).
    """
    problems = []
    for split in ("train", "val"):
        src = getattr(cfg.data, split)
        if src is None or src.path.startswith("demo:"):
            continue
        if is_folder_source(src.path):
            folder = folder_of(src.path)
            if not folder.is_dir():
                problems.append(f"data.{split}.path={src.path!r}: {folder} is not a folder")
            continue
        shards = is_webdataset(src.path)
        first = Path(expand_urls(src.path)[0] if shards else src.path)
        if not first.is_file():
            what = f"its first shard {first}" if shards else "the file"
            problems.append(f"data.{split}.path={src.path!r}: {what} does not exist")
        for name in ("regions", "region_captions"):
            value = getattr(src, name)
            if value is not None and not Path(value).is_file():
                problems.append(f"data.{split}.{name}={value!r}: the file does not exist")
        if src.root is not None and not Path(src.root).is_dir():
            problems.append(f"data.{split}.root={src.root!r} is not a folder")
    if problems:
        raise ConfigError("; ".join(problems))


def check_eval_data(cfg: ExperimentConfig, records: Sequence[Record] | None = None) -> None:
    """Raise a :class:`ConfigError` when a task of ``train.eval_tasks`` cannot run on the records of
    ``data.val`` (``records``, parsed, else read and parsed here): e.g. box_classification on records without
    labelled regions. Runs before the first step, not at the first evaluation; nothing to check without
    ``data.val``."""
    if cfg.data.val is None:
        return
    own = get_method_class(cfg.method.name).evaluations  # the method's own tasks check their data themselves
    tasks = [task for task in cfg.train.eval_tasks if task not in own]
    if not tasks:
        return
    if records is None:
        records = parsed_records(resolve_source(cfg.data.val, cfg.data.strict)[0], "data.val")
    try:
        check_task_data(tasks, records)
    except ValueError as e:
        raise ConfigError(f"train.eval_tasks={cfg.train.eval_tasks} on data.val.path={cfg.data.val.path!r}: {e}; "
                          "choose tasks its records support") from None


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def loader_workers(cfg: ExperimentConfig, world_size: int = 1) -> int:
    """``data.num_workers``, capped so that the loader workers of all processes on this machine fit its cores."""
    return min(cfg.data.num_workers, max(available_cores() // max(world_size, 1), 0))


def setting_warnings(cfg: ExperimentConfig, device: torch.device, world_size: int = 1) -> list[str]:
    """Settings that cannot do what they say here, one sentence each: fp16 on a CPU, a warm-up as long as the run,
    more loader workers than cores (capped: :func:`loader_workers`), an evaluation interval past the last step."""
    problems = []
    for key in ("precision", "eval_precision"):
        if getattr(cfg.train, key) == "fp16" and device.type == "cpu":
            problems.append(f"train.{key}=fp16 on a CPU runs many times slower than fp32 (CPUs have no fast fp16 "
                            f"kernels): set train.{key}=bf16 or fp32")
    steps = cfg.train.steps
    if cfg.optim.warmup_steps and cfg.optim.warmup_steps >= steps:
        problems.append(f"optim.warmup_steps={cfg.optim.warmup_steps} is not shorter than the run ({steps} steps): the "
                        f"learning rate never reaches optim.lr={cfg.optim.lr:g}; set optim.warmup_steps below "
                        f"train.steps")
    workers = loader_workers(cfg, world_size)
    if workers < cfg.data.num_workers:
        problems.append(f"data.num_workers={cfg.data.num_workers} is more than the {available_cores()} cores here "
                        f"allow{f' for {world_size} processes' if world_size > 1 else ''}: using {workers}")
    if cfg.train.eval_every and cfg.train.eval_every > steps and cfg.data.val is not None:
        problems.append(f"train.eval_every={cfg.train.eval_every} is past the last step ({steps}): the held-out data is "
                        "evaluated once, at the end")
    return problems


def adopt_checkpoint_model(cfg: ExperimentConfig, forced: bool = False) -> tuple[ExperimentConfig, str | None]:
    """A finegrain checkpoint given as ``model.pretrained`` says which model it holds: ``cfg`` with that
    ``model.name`` (a recipe's is for the release's tower), and the line saying so; unchanged when the names agree,
    when the file is not a finegrain checkpoint, or when ``forced`` (the user named ``model.name``: a model that
    cannot load the weights is then one error naming both)."""
    held = checkpoint_model_name(cfg.model.pretrained) if cfg.model.pretrained else None
    if held is None or held == cfg.model.name or forced:
        return cfg, None
    message = (f"model: {cfg.model.pretrained} holds a {held} model; using it instead of {cfg.model.name} "
               f"(model.name=... forces another)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=held)), message
