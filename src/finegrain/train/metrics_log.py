"""Run logging: one JSON line per training step (and per evaluation) in ``metrics.jsonl``; TensorBoard
scalars (the ``tensorboard`` extra) and Weights & Biases (the ``wandb`` extra) too when asked."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import DataError

log = logging.getLogger(__name__)


WANDB_ID_FILE = "wandb_id.txt"


def start_wandb(directory: Path, options, config: Mapping[str, Any], resumed: bool):
    """A W&B run for the run folder ``directory`` (``options``: :class:`finegrain.config.WandbConfig`). A
    resumed training run continues the W&B run whose id ``wandb_id.txt`` keeps; a fresh one starts a new id."""
    try:
        import wandb
    except ImportError as e:
        raise ImportError("train.wandb.project needs `pip install 'finegrain[wandb]'`") from e
    id_file = directory / WANDB_ID_FILE
    if resumed and id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]  # W&B run ids: 8 lower-case letters and digits
        id_file.write_text(run_id + "\n")
    return wandb.init(project=options.project, entity=options.entity, name=options.name or directory.name,
                      tags=list(options.tags) or None, mode=options.mode, config=dict(config), dir=str(directory),
                      id=run_id, resume="allow")


class BadRecordsFile:
    """``bad_records.jsonl`` in the run folder: one JSON line per skipped record or dropped region (see
    :meth:`finegrain.data.dataset.BadRecordCounter.take_entries`), written by rank 0 only. ``resume`` keeps the
    file and never writes a line it already holds; else it starts anew."""

    def __init__(self, directory: str | Path, resume: bool = False):
        self.path = Path(directory) / "bad_records.jsonl"
        if not resume:
            self.path.unlink(missing_ok=True)
        self.written = set(self.path.read_text(encoding="utf-8").splitlines()) if self.path.exists() else set()

    def write(self, entries: list[dict]) -> None:
        lines = []
        for entry in entries:
            line = json.dumps(entry, sort_keys=True)
            if line not in self.written:
                self.written.add(line)
                lines.append(line + "\n")
        if lines:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(lines))


class MetricsLog:
    """``write(step, values)`` appends to ``metrics.jsonl`` (and TensorBoard / a W&B run when given);
    ``resume_step`` keeps the lines up to that step, None starts the file anew."""

    def __init__(self, directory: str | Path, tensorboard: bool = False, resume_step: int | None = None,
                 wandb_run=None):
        self.path = Path(directory) / "metrics.jsonl"
        self.wandb = wandb_run
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            self._truncate_after(resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("train.tensorboard=true needs `pip install finegrain[tensorboard]`") from e
            self.writer = SummaryWriter(str(Path(directory) / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run wrote after its last checkpoint, so the log has no repeated steps."""
        records = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def write(self, step: int, values: dict) -> None:
        record = {"step": step, **{k: (float(v) if not isinstance(v, (str, int)) else v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            evaluation = sorted(k for k in scalars if k.startswith("eval/"))
            if evaluation:  # an evaluation: its metrics also as one table, as the terminal prints them
                import wandb

                rows = [[k.removeprefix("eval/").rpartition("/")[0], k.rpartition("/")[2], scalars[k]]
                        for k in evaluation]
                scalars["eval_table"] = wandb.Table(columns=["task", "metric", "value"], data=rows)
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``. A torn last line (the run was killed mid-write) is dropped with a
    log line; an unreadable line elsewhere is an error naming the file and line."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    records = []
    for i, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i != lines[-1][0]:
                raise DataError(f"{path}:{i}: not a JSON line ({e.msg}); expected one JSON object per line") from None
            log.warning("%s:%d: dropped a torn last line (the run was stopped mid-write)", path, i)
    return records
