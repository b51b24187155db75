"""Checks a run makes before it spends time on set-up: the data it is told to read exists, and the held-out
data has what ``train.eval_tasks`` need."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import ExperimentConfig
from ..data.loader import folder_of, is_folder_source, is_webdataset, resolve_source
from ..data.records import Record
from ..data.webdataset import expand_urls
from ..errors import ConfigError
from ..eval.encode import parsed_records
from ..eval.tasks import check_task_data
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
