"""``evaluate``: run several protocols on one set of records (``train.eval_tasks``), keys ``task/metric``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain.data.records import Record
from finegrain.errors import DataError

from .encode import Transform, parsed_records
from .protocols import PROTOCOLS, record_protocols, run_protocol


def check_task_data(tasks: Sequence[str], records: Sequence[Record]) -> None:
    """Raise a DataError when a task of ``tasks`` cannot run on ``records`` (parsed: see
    :func:`~finegrain.eval.encode.parsed_records`; no captions for retrieval, no labels for zero_shot, no
    labelled regions for box_classification), before any model runs."""
    _check_known(tasks)
    for task in tasks:
        PROTOCOLS[task].check_records(records)


def _check_known(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in record_protocols()]
    if unknown:
        raise DataError(f"unknown evaluation task(s) {unknown}; known: {record_protocols()}")


def evaluate(model: nn.Module, tasks: Sequence[str], records: Sequence[Record], root: str | Path,
             transform: Transform, tokenizer: Callable[[list[str]], torch.Tensor], batch_size: int = 64,
             device: str | torch.device = "cpu", progress: bool = True,
             options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, float]:
    """Run each task of ``tasks`` (protocols of :mod:`.protocols` that run on records) and merge their metrics
    as ``"task/metric"``.

    ``options[task]`` holds extra keyword arguments for that task's function, e.g.
    ``{"box_classification": {"crop_scale": 1.5, "class_names": [...]}}``. Each task runs the model in
    eval mode without gradients and restores its train/eval mode afterwards.
    """
    options = dict(options or {})
    _check_known([*tasks, *options])
    unused = sorted(set(options) - set(tasks))
    if unused:
        raise DataError(f"options given for task(s) {unused} that are not run (tasks: {list(tasks)})")
    records = parsed_records(records, "evaluate")  # a JSONL index is parsed once, not once per task
    common = {"transform": transform, "tokenizer": tokenizer, "batch_size": batch_size, "device": device,
              "progress": progress}
    results: dict[str, float] = {}
    for task in tasks:
        metrics = run_protocol(PROTOCOLS[task], f"task {task!r}", (model, records, root), options.get(task, {}),
                               common)
        results.update({f"{task}/{name}": value for name, value in metrics.items()})
    return results
