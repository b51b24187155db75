"""Map-style training data: records -> samples, a resumable sampler, a counter of bad records."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .images import ImageError, load_image
from .records import Record, RecordError

# What makes one record unusable without stopping the run (it is skipped and counted).
RECORD_FAILURES = (ImageError, RecordError, OSError, ValueError)
MAX_CONSECUTIVE_FAILURES = 16


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed that depends only on (run seed, epoch, record index)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class RecordDataset(Dataset):
    """Indexed by ``(record_index, seed)``. A record whose image or fields fail is skipped: the next
    record is used instead, and the failure is reported in the sample's ``bad_records`` list."""

    def __init__(self, records: list[Record], root: str | Path, build: Callable):
        if not records:
            raise ValueError(f"no records to train on (image root {root})")
        self.records = records
        self.root = Path(root)
        self.build = build

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        failures = []
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                sample = self.build(load_image(self.root / record.image), record, seed)
            except RECORD_FAILURES as e:
                failures.append(f"{record.key or record.image}: {e}")
                continue
            sample["bad_records"] = failures
            return sample
        raise RuntimeError(f"{MAX_CONSECUTIVE_FAILURES} consecutive records failed to load; first errors:\n"
                           + "\n".join(failures[:5]))


class ResumableBatchSampler:
    """Yields this rank's micro-batches of ``(index, seed)``, epoch after epoch, forever.

    Epoch ``e`` is a permutation drawn from ``seed + e``; each global batch (``batch_size * world_size``
    records) is split into contiguous per-rank slices, so rank slices of one global batch are exactly the
    batch a single process would see. ``start_batch`` resumes at a micro-batch position.
    """

    def __init__(self, num_records: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0):
        self.num_records, self.batch_size = num_records, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_batch = start_batch
        self.batches_per_epoch = num_records // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_records} records cannot fill one global batch of "
                             f"{batch_size} x {world_size} processes")

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start_batch
        while True:
            epoch, batch = divmod(position, self.batches_per_epoch)
            order = torch.randperm(self.num_records, generator=torch.Generator().manual_seed(self.seed + epoch))
            start = (batch * self.world_size + self.rank) * self.batch_size
            yield [(int(i), sample_seed(self.seed, epoch, int(i))) for i in order[start:start + self.batch_size]]
            position += 1

    def epoch_of(self, position: int) -> float:
        return position / self.batches_per_epoch


class BadRecordCounter:
    """Counts skipped records; raises once their fraction exceeds ``max_fraction`` (after ``min_seen``)."""

    def __init__(self, max_fraction: float, min_seen: int = 200):
        self.max_fraction, self.min_seen = max_fraction, min_seen
        self.seen = self.bad = 0
        self.examples: list[str] = []

    def update(self, batch_size: int, failures: list[str]) -> None:
        self.seen += batch_size + len(failures)
        self.bad += len(failures)
        self.examples.extend(failures[: max(0, 5 - len(self.examples))])
        if self.seen >= self.min_seen and self.bad > self.max_fraction * self.seen:
            raise RuntimeError(
                f"{self.bad} of {self.seen} records failed to load ({self.bad / self.seen:.1%} > "
                f"data.max_bad_fraction={self.max_fraction:.1%}); examples:\n  " + "\n  ".join(self.examples))

    def state_dict(self) -> dict:
        return {"seen": self.seen, "bad": self.bad, "examples": list(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.bad, self.examples = state["seen"], state["bad"], list(state["examples"])
