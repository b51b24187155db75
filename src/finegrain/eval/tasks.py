"""``evaluate``: run several named evaluation tasks on one set of records, keys ``task/metric``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain.data.records import Record

from .box_classification import evaluate_box_classification, labelled_regions
from .encode import Transform, parsed_records
from .retrieval import captioned_records, evaluate_retrieval
from .zero_shot import evaluate_zero_shot, labelled_records

TASKS: dict[str, Callable[..., dict[str, float]]] = {
    "retrieval": evaluate_retrieval,
    "box_classification": evaluate_box_classification,
    "zero_shot": evaluate_zero_shot,
}

# what each task needs of the records: raises ValueError saying what is missing
TASK_DATA: dict[str, Callable[[Sequence[Record]], object]] = {
    "retrieval": lambda records: captioned_records(records, "retrieval"),
    "box_classification": labelled_regions,
    "zero_shot": lambda records: labelled_records(records, None, "zero_shot"),
}


def check_task_data(tasks: Sequence[str], records: Sequence[Record]) -> None:
    """Raise a ValueError when a task of ``tasks`` cannot run on ``records`` (parsed: see
    :func:`~finegrain.eval.encode.parsed_records`; no captions for retrieval, no labels for zero_shot, no
    labelled regions for box_classification), before any model runs."""
    _check_known(tasks)
    for task in tasks:
        TASK_DATA[task](records)


def _check_known(names: Sequence[str]) -> None:
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; known: {sorted(TASKS)}")


def evaluate(model: nn.Module, tasks: Sequence[str], records: Sequence[Record], root: str | Path,
             transform: Transform, tokenizer: Callable[[list[str]], torch.Tensor], batch_size: int = 64,
             device: str | torch.device = "cpu", progress: bool = True,
             options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, float]:
    """Run each task of ``tasks`` (names in :data:`TASKS`) and merge their metrics as ``"task/metric"``.

    ``options[task]`` holds extra keyword arguments for that task's function, e.g.
    ``{"box_classification": {"crop_scale": 1.5, "class_names": [...]}}``. Each task runs the model in
    eval mode without gradients and restores its train/eval mode afterwards.
    """
    options = dict(options or {})
    _check_known([*tasks, *options])
    unused = sorted(set(options) - set(tasks))
    if unused:
        raise ValueError(f"options given for task(s) {unused} that are not run (tasks: {list(tasks)})")
    records = parsed_records(records, "evaluate")  # a JSONL index is parsed once, not once per task
    results: dict[str, float] = {}
    for task in tasks:
        metrics = TASKS[task](model, records, root, transform, tokenizer, batch_size=batch_size,
                              device=device, progress=progress, **options.get(task, {}))
        results.update({f"{task}/{name}": value for name, value in metrics.items()})
    return results
