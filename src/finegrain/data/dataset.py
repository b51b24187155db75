"""Map-style training data: records -> samples, a resumable sampler, a counter of bad records."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .images import ImageError, load_image
from .records import Record, RecordError

log = logging.getLogger(__name__)

# What makes one record unusable without stopping the run (it is skipped and counted).
RECORD_FAILURES = (ImageError, RecordError, OSError, ValueError)
MIN_FAILURE_STREAK = 16


class FailureStreak(DataError, RuntimeError):
    """:func:`failure_streak_limit` records in a row failed to load: more than ``data.max_bad_fraction`` of the
    data is bad; the message gives the first errors."""


def failure_streak_limit(max_bad_fraction: float, num_records: int) -> int:
    """Consecutive failing records that stop the run: ``max(16, floor(max_bad_fraction x records) + 1)``,
    at most ``num_records``. A longer run of failures alone is more than ``data.max_bad_fraction`` of the data
    (16 at least, so that a small data set is judged by the fraction, after ``min_records_before_bad_check``)."""
    return min(max(MIN_FAILURE_STREAK, math.floor(max_bad_fraction * num_records) + 1), num_records)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed that depends only on (run seed, epoch, record index)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class RecordDataset(Dataset):
    """Indexed by ``(record_index, seed)``; a sample is ``build(image, record, seed)`` plus ``bad_records``
    and ``records_tried``.

    ``records`` is any ``Sequence[Record]`` (a list, or a compact store from the readers whose items may
    raise :class:`RecordError` for a malformed line). A record whose fields or image fail is skipped: the
    next record is used instead, ``(record index, message)`` of each failure goes into the sample's
    ``bad_records`` list and ``records_tried`` counts the records looked at; with ``strict`` the first
    failure (or malformed region) raises instead. :func:`failure_streak_limit` consecutive failures (of
    ``max_bad_fraction``) stop the run. When ``build`` has a ``draft_size`` attribute (``(H, W)`` or None),
    JPEGs are decoded no larger than needed for it (see :func:`~finegrain.data.images.load_image`); with a
    ``for_root(root)`` method, ``build.for_root(root)`` builds the samples (it reads files beside the image).
    """

    def __init__(self, records: Sequence[Record], root: str | Path, build: Callable, strict: bool = False,
                 max_bad_fraction: float = 0.0):
        if not records:
            raise DataError(f"no records to train on (image root {root})")
        self.records = records
        self.root = Path(root)
        self.build = build
        self.strict = strict
        self.max_bad_fraction = max_bad_fraction
        self.max_streak = failure_streak_limit(max_bad_fraction, len(records))
        self.draft_size = getattr(build, "draft_size", None)
        if hasattr(build, "for_root"):  # a builder that reads more files of a record (label maps)
            self.build = build.for_root(self.root)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        failures: list[tuple[int, str]] = []
        for attempt in range(self.max_streak):
            record_index = (index + attempt) % len(self.records)
            record = None
            try:
                record = self.records[record_index]
                if self.strict and record.bad_regions:
                    raise RecordError(record.bad_regions[0])
                image = load_image(self.root / record.image, self.draft_size)
                sample = self.build(image, record, seed)
            except RECORD_FAILURES as e:
                if self.strict:
                    raise
                name = (record.key or record.image) if record is not None else ""
                message = str(e) if name in str(e) else f"{name}: {e}"
                failures.append((record_index, message))
                continue
            sample["bad_records"], sample["records_tried"] = failures, attempt + 1
            return sample
        raise FailureStreak(
            f"{self.max_streak} consecutive records failed to load (records {index}..{record_index} of "
            f"{len(self.records)}): more than data.max_bad_fraction={self.max_bad_fraction:g} of the data (a streak "
            f"of max(16, max_bad_fraction x records + 1) failures stops the run); first errors:\n"
            + "\n".join(message for _, message in failures[:5]))


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
            raise DataError(f"{num_records} records cannot fill one global batch of "
                            f"{batch_size} x {world_size} processes")

    def order(self, epoch: int) -> torch.Tensor:
        """``(num_records,)`` int64: the record order of ``epoch``."""
        return torch.randperm(self.num_records, generator=torch.Generator().manual_seed(self.seed + epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start_batch
        order_epoch, order = -1, torch.zeros(0, dtype=torch.long)
        while True:
            epoch, batch = divmod(position, self.batches_per_epoch)
            if epoch != order_epoch:  # drawn once per epoch: a micro-batch costs O(batch_size), not O(records)
                order_epoch, order = epoch, self.order(epoch)
            start = (batch * self.world_size + self.rank) * self.batch_size
            yield [(i, sample_seed(self.seed, epoch, i)) for i in order[start:start + self.batch_size].tolist()]
            position += 1

    def epoch_of(self, position: int) -> float:
        return position / self.batches_per_epoch


class BadRecordCounter:
    """Counts distinct bad records against distinct records seen, and stops the run when too many fail.

    A record is identified by an id: its index for map-style data, ``stable_int(url + key)`` for shard
    samples, its key for a malformed record the reader skipped. Two sources feed it:

    - :meth:`set_source` (once the data is read): its name, ``num_records`` in the source (map-style: the
      length of the record sequence; shards: ``samples_per_epoch`` if known, else None) and
      ``read_failures``, the ``(key, message)`` pairs the reader skipped (``records.failures``);
    - :meth:`update` (each micro-batch): the records the loader looked at for it (its samples, plus the
      failing records a map-style dataset replaced), its ``bad_records``, ``(record id, message)`` pairs,
      and its ``bad_regions``, messages of malformed regions dropped from records that were used. A record
      or region failing again (later epochs, replacement attempts) is not counted again.

    ``loaded`` is the number of distinct records the loader has looked at, at most ``num_records`` (after
    an epoch every record has been seen). ``bad = len(read_failures) + distinct load failures`` and ``seen =
    len(read_failures) + loaded`` (so ``bad <= seen``). ``fraction`` estimates the share of bad records in
    the source: the read share plus the good rows' share times the load failure rate so far, which equals
    ``bad / seen`` once every record has been loaded. Once ``loaded >= min_seen`` (or every record is
    loaded) a ``fraction`` above ``max_fraction`` raises a DataError with examples. Skips are logged as
    they are found: the first ten, then at most one line per ``log_interval`` seconds; every one goes into
    :meth:`take_entries` (the trainer writes them to ``bad_records.jsonl``). Malformed regions are counted
    (``bad_regions``), logged and listed alike, but not against ``max_fraction``: their records are used.
    """

    def __init__(self, max_fraction: float, min_seen: int = 200, num_records: int | None = None,
                 read_failures: Iterable[tuple[str, str]] = (), log_interval: float = 30.0):
        self.max_fraction, self.min_seen, self.log_interval = max_fraction, min_seen, log_interval
        self.slots = 0  # records looked at by the loader (with repeats)
        self.bad_ids: set = set()
        self.bad_region_messages: set[str] = set()
        self.examples: list[str] = []  # the first load failures' messages
        self.entries: list[dict] = []  # skips not yet taken by take_entries()
        self._logged, self._last_log = 0, -math.inf
        self.set_source(num_records, read_failures)

    def set_source(self, num_records: int | None, read_failures: Iterable[tuple[str, str]] = (),
                   name: str = "") -> None:
        """Describe the data: its name (e.g. the path), records it holds (None: unknown) and the reader's
        ``(key, message)`` skips."""
        self.name, self.num_records = name, num_records
        self.read_failures = dict(read_failures)
        self.entries += [self._entry("record", message, key) for key, message in self.read_failures.items()]
        self.check()

    def _entry(self, skipped: str, reason: str, record_id: Hashable | None = None) -> dict:
        record = {} if record_id is None else {"record": record_id}
        return {"source": self.name, "skipped": skipped, **record, "reason": reason}

    @property
    def loaded(self) -> int:
        return self.slots if self.num_records is None else min(self.slots, self.num_records)

    @property
    def bad(self) -> int:
        return len(self.read_failures) + len(self.bad_ids)

    @property
    def seen(self) -> int:
        return len(self.read_failures) + self.loaded

    @property
    def bad_regions(self) -> int:
        return len(self.bad_region_messages)

    @property
    def fraction(self) -> float:
        if self.num_records is None:
            return self.bad / self.seen if self.seen else 0.0
        load_rate = len(self.bad_ids) / self.loaded if self.loaded else 0.0
        rows = len(self.read_failures) + self.num_records
        return (len(self.read_failures) + load_rate * self.num_records) / rows if rows else 0.0

    def update(self, looked_at: int, failures: list[tuple[Hashable, str]], bad_regions: Iterable[str] = ()) -> None:
        """Count a micro-batch: ``looked_at`` records (each failure among them), its ``(record id, message)``
        failures and the messages of its malformed regions."""
        self.slots += looked_at
        for record_id, message in failures:
            if record_id in self.bad_ids:
                continue
            self.bad_ids.add(record_id)
            if len(self.examples) < 5:
                self.examples.append(message)
            self.entries.append(self._entry("record", message, record_id))
            self._log("skipped a bad record", message)
        for message in bad_regions:
            if message not in self.bad_region_messages:
                self.bad_region_messages.add(message)
                self.entries.append(self._entry("region", message))
                self._log("dropped a malformed region", message)

    def _log(self, what: str, message: str) -> None:
        now = time.monotonic()
        if self._logged < 10 or now - self._last_log >= self.log_interval:
            log.warning("%s (%d bad records of %d seen, %d bad regions so far): %s", what, self.bad, self.seen,
                        self.bad_regions, message)
            self._logged += 1
            self._last_log = now
            if self._logged == 10:
                log.warning("further bad records are logged at most every %.0f s (all of them go to "
                            "bad_records.jsonl in the run folder)", self.log_interval)

    def take_entries(self) -> list[dict]:
        """The skips found since the last call, one dict each: ``source``, ``skipped`` (``record`` or
        ``region``), ``record`` (its id; records only) and ``reason``."""
        entries, self.entries = self.entries, []
        return entries

    def first_examples(self, count: int = 3) -> list[str]:
        """Messages of the first bad records: the reader's, then the loader's."""
        return ([*self.read_failures.values()] + self.examples)[:count]

    def over_limit(self) -> str | None:
        """Why the run must stop (too many bad records, with examples), or None."""
        enough = self.loaded >= self.min_seen or (self.num_records is not None and self.loaded >= self.num_records)
        if not enough or self.fraction <= self.max_fraction:
            return None
        examples = [*self.read_failures.values()][:3] + self.examples[:5]
        return (f"{self.bad} of {self.seen} records are bad ({len(self.read_failures)} malformed in the file, "
                f"{len(self.bad_ids)} of {self.loaded} loaded failed): an estimated {self.fraction:.1%} of the "
                f"data > data.max_bad_fraction={self.max_fraction:.1%}; examples:\n  " + "\n  ".join(examples))

    def check(self) -> None:
        """Raise a DataError when :meth:`over_limit` says so. The trainer checks at log steps, after the
        ranks agree (:meth:`update` only counts)."""
        reason = self.over_limit()
        if reason is not None:
            raise DataError(reason)

    def state_dict(self) -> dict:
        """Records looked at, distinct bad ids, bad regions and examples of the loader (read failures are
        read again)."""
        return {"slots": self.slots, "bad_ids": list(self.bad_ids), "examples": list(self.examples),
                "bad_regions": sorted(self.bad_region_messages)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a checkpoint of an older layout (``seen``/``bad`` counts, no ids)
        resumes with its slots and examples, its bad records counted again as they recur."""
        self.slots = state.get("slots", state.get("seen", 0))
        self.bad_ids, self.examples = set(state.get("bad_ids", ())), list(state.get("examples", ()))
        self.bad_region_messages = set(state.get("bad_regions", ()))
