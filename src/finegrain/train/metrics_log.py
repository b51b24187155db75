"""Run logging: one JSON line per training step (and per evaluation) in ``metrics.jsonl``; TensorBoard
scalars too when asked (needs the ``tensorboard`` extra)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, directory: str | Path, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(directory) / "metrics.jsonl"
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
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
                raise ValueError(f"{path}:{i}: not a JSON line ({e.msg}); expected one JSON object per line") from None
            log.warning("%s:%d: dropped a torn last line (the run was stopped mid-write)", path, i)
    return records
