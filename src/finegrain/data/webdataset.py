"""A minimal reader and writer of WebDataset tar shards (local files; no ``webdataset`` dependency).

A shard is a tar file whose consecutive members sharing a key form one sample: ``dir/000001.jpg``,
``dir/000001.txt``, ``dir/000001.json`` -> ``{"__key__": "dir/000001", "jpg": ..., "txt": ..., "json": ...}``.
The key is the member path up to the first dot of its basename; the extension is the rest, lowercased.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from finegrain.data.dataset import RECORD_FAILURES, sample_seed
from finegrain.data.images import load_image_bytes
from finegrain.data.records import Record, RecordError, parse_record
from finegrain.errors import DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

_BRACE = re.compile(r"\{(?:(\d+)\.\.(\d+)|([^{}]*,[^{}]*))\}")


def _brace_expand(pattern: str) -> list[str]:
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    lo, hi, alternatives = match.groups()
    if alternatives is not None:
        items = alternatives.split(",")
    else:
        padded = (len(lo) > 1 and lo.startswith("0")) or (len(hi) > 1 and hi.startswith("0"))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for item in items for expanded in _brace_expand(head + item + tail)]


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a brace pattern (``train-{000000..000009}.tar``, ``{a,b}.tar``), a
    ``::``-separated string of patterns, or a list of patterns."""
    patterns = str(urls).split("::") if isinstance(urls, (str, Path)) else [str(u) for u in urls]
    expanded = [url for pattern in patterns if pattern for url in _brace_expand(pattern)]
    if not expanded:
        raise DataError(f"no shard paths in {urls!r}")
    return expanded


def _split_name(name: str) -> tuple[str, str] | None:
    """``"dir/000001.seg.png"`` -> ``("dir/000001", "seg.png")``; None for names without an extension
    or hidden files (``._foo.jpg`` from macOS tar)."""
    directory, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_samples(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield one dict per sample, in shard order: ``{"__key__": str, "__url__": str, ext: bytes, ...}``.

    Raises :class:`RecordError` naming the shard for an unreadable tar or a repeated extension in a sample.
    """
    url = str(path)
    sample: dict[str, Any] | None = None
    try:
        with tarfile.open(url, mode="r|*") as tar:
            for member in tar:
                split = _split_name(member.name) if member.isfile() else None
                if split is None:
                    continue
                key, ext = split
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    raise RecordError(f"{url}: sample {key}: member '.{ext}' appears twice")
                data = tar.extractfile(member)
                sample[ext] = data.read() if data is not None else b""
    except tarfile.TarError as e:
        raise RecordError(f"{url}: not a readable tar shard ({e})") from None
    if sample is not None:
        yield sample


def _decode_text(sample: dict[str, Any], ext: str, where: str) -> str:
    try:
        return sample[ext].decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RecordError(f"{where}: member '.{ext}' is not UTF-8 text") from None


def sample_where(sample: dict[str, Any]) -> str:
    """``"<shard>: sample <key>"``, how errors name a sample."""
    return f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"


def sample_image(sample: dict[str, Any]) -> tuple[str, bytes]:
    """``(member name, encoded bytes)`` of a sample's image, the first of ``jpg/jpeg/png/webp``;
    :class:`RecordError` when it has none."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        found = ", ".join(f".{e}" for e in sample if not e.startswith("__")) or "nothing"
        raise RecordError(f"{sample_where(sample)}: no image member (expected one of "
                          f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}; found {found})")
    return f"{sample.get('__key__', '?')}.{ext}", sample[ext]


def sample_to_record(sample: dict[str, Any]) -> tuple[Record, bytes]:
    """Turn one shard sample into ``(record, encoded image bytes)``.

    The image is the first of ``jpg/jpeg/png/webp``. The ``.json`` member is read as a region-text
    record when it has a ``format`` field or there is no ``.txt`` (its ``image`` defaults to the
    member name); otherwise (e.g. img2dataset metadata) the ``.txt`` member is the caption.
    """
    where = sample_where(sample)
    image_name, image_bytes = sample_image(sample)
    obj: Any = None
    if "json" in sample:
        try:
            obj = json.loads(_decode_text(sample, "json", where))
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}: member '.json' is not valid JSON ({e.msg})") from None
    if obj is not None and ("txt" not in sample or (isinstance(obj, dict) and "format" in obj)):
        if isinstance(obj, dict) and "image" not in obj:
            obj = {**obj, "image": image_name}
        record = parse_record(obj, where)
    elif "txt" in sample:
        caption = _decode_text(sample, "txt", where).strip()
        if not caption:
            raise RecordError(f"{where}: field 'txt' is an empty caption")
        record = Record(image_name, (caption,), key=where)
    else:
        raise RecordError(f"{where}: no caption (expected a '.txt' or a region-text '.json' member)")
    return record, image_bytes


def _sample_key(image: str) -> str:
    """Image path without its suffix, dots in the basename replaced, so it is a valid sample key."""
    path = Path(image)
    return path.with_name(path.stem.replace(".", "_")).as_posix()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: identical input, identical shard
    tar.addfile(info, io.BytesIO(data))


def _write_sample(tar: tarfile.TarFile, record: Record, image_bytes: bytes, keys: set[str]) -> None:
    ext = Path(record.image).suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTENSIONS:
        raise DataError(f"{record.key or record.image}: field 'image' must end in one of "
                        f"{', '.join('.' + e for e in IMAGE_EXTENSIONS)}, got {record.image!r}")
    key = _sample_key(record.image)
    if key in keys:
        raise DataError(f"{record.key or record.image}: sample key {key!r} is not unique")
    keys.add(key)
    meta = record.to_json()
    del meta["image"]
    _add_member(tar, f"{key}.{ext}", image_bytes)
    if record.captions:
        _add_member(tar, f"{key}.txt", record.captions[0].encode("utf-8"))
    _add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))


def write_shard(path: str | Path, samples: Iterable[tuple[Record, bytes]], keys: set[str] | None = None) -> Path:
    """Write ``(record, encoded image bytes)`` pairs as one tar shard at ``path``, atomically (a temporary
    name, renamed when complete). Each sample holds the image (extension from ``record.image``), a ``.txt``
    with the first caption if any, and the region-text ``.json`` without its ``image`` field; its key is
    ``record.image`` without its suffix, unique within ``keys`` (updated; default: within this shard)."""
    path = Path(path)
    keys = set() if keys is None else keys
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for record, image_bytes in samples:
            _write_sample(tar, record, image_bytes, keys)
    tmp.replace(path)
    return path


def write_shards(samples: Iterable[tuple[Record, bytes]], pattern: str, samples_per_shard: int) -> list[Path]:
    """Write ``(record, encoded image bytes)`` pairs into tar shards of ``samples_per_shard`` samples named
    ``pattern % shard_index`` (e.g. ``"out/train-%06d.tar"``), each by :func:`write_shard`, keys unique
    across shards; return the shard paths."""
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    paths: list[Path] = []
    keys: set[str] = set()
    iterator = iter(samples)
    while chunk := list(islice(iterator, samples_per_shard)):
        paths.append(write_shard(pattern % len(paths), chunk, keys))
    return paths


# Errors that end the reading of one shard (the rest of that shard is lost; the stream goes on).
SHARD_FAILURES = (RecordError, OSError, EOFError, tarfile.TarError, zlib.error)
# Failed samples in a row after which looking ahead for replacements gives up (nothing decodes).
MAX_LOOKAHEAD_FAILURES = 1024


def stable_int(key: str) -> int:
    """A process-independent integer of a sample key (``hash()`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def sample_id(url: str, key: str | None) -> int:
    """The record id of a shard sample (``key``), or of a shard that failed to read (``key`` None)."""
    return stable_int(f"{url}\0{key if key is not None else '<unreadable shard>'}")


class _Raw(NamedTuple):
    """One raw entry of a worker's stream: a tar sample, or (``sample is None``) a shard-level error."""

    epoch: int
    url: str
    sample: dict[str, Any] | None
    error: str | None


class _Lookahead:
    """An iterator with a buffer, so entries can be looked at before they are consumed."""

    def __init__(self, iterator: Iterator[_Raw]):
        self.iterator, self.buffer = iterator, deque()

    def peek(self, i: int) -> _Raw:
        while len(self.buffer) <= i:
            self.buffer.append(next(self.iterator))
        return self.buffer[i]

    def pop(self) -> _Raw:
        return self.buffer.popleft() if self.buffer else next(self.iterator)


class ShardStream(IterableDataset):
    """This rank's training samples from WebDataset shards, epoch after epoch, forever; exactly resumable.

    Use it as ``DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)``;
    every sample is ``build(image, record, seed)`` plus a ``"bad_records"`` list of ``(record id, message)``
    pairs, the id being :func:`sample_id` of the bad entry. With ``strict=True`` a bad entry raises instead.
    When ``build`` has a ``draft_size`` attribute, JPEGs are decoded no larger than needed for it.

    **Shards.** Epoch ``e`` orders the shards by the permutation drawn from
    ``torch.Generator().manual_seed(seed + e)``; shard ``j`` of that order goes to the global worker slot
    ``j % (world_size * W)``, where ``W = max(1, num_workers)`` and the slot of (rank, worker) is
    ``rank * W + worker``. Each worker reads its shards in that order, samples in tar order, and moves on to
    its next epoch by itself (with shard counts not divisible by the slots, workers' epochs drift apart).
    Sample randomness comes from ``sample_seed(seed, epoch, stable_int(key))``: a sample is a pure function
    of (run seed, epoch, sample key).

    **Fixed windows, so that skipping needs no decoding.** A worker's stream of *raw entries* (every tar
    sample, plus one entry for a shard that fails to open or breaks off) is cut into windows of exactly
    ``batch_size`` entries, and window ``b`` becomes the worker's ``b``-th batch. A bad entry (undecodable
    image, bad json, no caption, anything in ``RECORD_FAILURES`` raised by decoding or ``build``) keeps its
    slot: it is replaced by the next good sample *after* the window (looked ahead at, not consumed, and built
    with a different seed, ``stable_int(key + "#refill")``), and its message, naming url and key, goes into
    that replacement's ``bad_records``. So a replacement comes from a later batch of the same worker, never
    duplicates a sample inside the batch, and each batch consumes exactly ``batch_size`` raw entries whether
    or not any were bad. (The alternative, skipping bad entries and taking more, makes the number of raw
    entries behind ``S`` batches depend on which entries failed to decode, which a resume can only learn by
    decoding them all again.) The price: a sample after a bad one is seen twice (once as a replacement,
    with another augmentation). A bad entry fills a slot of the batch, so ``BadRecordCounter`` counts it
    among the ``batch_size`` records seen, once however many epochs it fails in.

    **Resume.** ``DataLoader`` takes batches from its workers round-robin, batch ``b`` from worker
    ``b % W``, so after ``start_batch = S`` batches, worker ``w`` had delivered ``ceil((S - w) / W)`` of them
    (0 if ``S <= w``). On resume worker ``w'`` plays original worker ``(w' + S) % W`` (the first batch after
    resume comes from the worker whose turn it was) and drops ``batch_size`` raw entries per batch that
    worker delivered: it reads the tar members (same reader, hence the same shard errors at the same
    places) but decodes no image and calls no ``build``. A batch depends only on its window and the
    entries after it, so the batches from ``S`` on are exactly those of the uninterrupted run, bad entries,
    replacements and ``bad_records`` included.

    **Exact** when the shard list, ``seed``, ``batch_size``, ``world_size`` and ``num_workers`` are the
    same as in the interrupted run (and ``build`` is deterministic in its seed). **Approximate** when
    ``num_workers`` or ``world_size`` changes: the shard-to-slot assignment changes, and each new worker
    skips about ``start_batch / W`` batches of its own new shard sequence, so the run resumes at about the
    same point of the epoch, but which samples of the interrupted epoch are repeated or never seen is not
    controlled.
    """

    def __init__(self, urls: list[str], build: Callable, seed: int, rank: int, world_size: int,
                 batch_size: int, num_workers: int, start_batch: int = 0, strict: bool = False):
        if not urls:
            raise DataError("no shards to train on")
        if batch_size <= 0 or start_batch < 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad stream layout: batch_size={batch_size}, start_batch={start_batch}, "
                             f"rank={rank}, world_size={world_size}")
        self.urls, self.build, self.seed = [str(u) for u in urls], build, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.num_workers, self.start_batch, self.strict = num_workers, start_batch, strict
        self.draft_size = getattr(build, "draft_size", None)
        self.workers = max(1, num_workers)
        self.slots = world_size * self.workers
        if len(self.urls) < self.slots:
            raise DataError(
                f"{len(self.urls)} shards cannot feed {world_size} ranks x {self.workers} data workers "
                f"({self.slots} readers, each needs at least one shard per epoch): write more, smaller "
                f"shards or use fewer data.num_workers")

    def shards_of(self, slot: int, epoch: int) -> list[str]:
        """Shards read by global worker slot ``slot`` in epoch ``epoch``, in reading order."""
        order = torch.randperm(len(self.urls), generator=torch.Generator().manual_seed(self.seed + epoch))
        return [self.urls[int(i)] for j, i in enumerate(order) if j % self.slots == slot]

    def role_of(self, worker: int) -> tuple[int, int]:
        """``(original worker played, batches it had delivered)`` for loader worker ``worker``."""
        role = (worker + self.start_batch) % self.workers
        done = -(-(self.start_batch - role) // self.workers) if self.start_batch > role else 0
        return role, done

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is None:
            if self.num_workers > 0:
                raise RuntimeError(f"ShardStream was made for {self.num_workers} DataLoader workers but is "
                                   f"iterated in the main process; use worker_samples(worker)")
            return self.worker_samples(0)
        if info.num_workers != self.workers:
            raise RuntimeError(f"ShardStream was made for num_workers={self.num_workers} but runs in a "
                               f"DataLoader with {info.num_workers} workers")
        return self.worker_samples(info.id)

    def worker_samples(self, worker: int) -> Iterator[dict]:
        """The samples of loader worker ``worker`` (``0 <= worker < W``), resumed at ``start_batch``."""
        role, done = self.role_of(worker)
        raw = _Lookahead(self._raw_entries(self.rank * self.workers + role))
        for _ in range(done * self.batch_size):
            raw.pop()
        while True:
            window = [raw.pop() for _ in range(self.batch_size)]
            built = [self._build(entry, refill=False) for entry in window]
            refills = self._refills(raw, sum(sample is None for sample, _ in built))
            for entry, (sample, error) in zip(window, built):
                if sample is None:
                    sample = refills.pop(0)
                    key = entry.sample["__key__"] if entry.sample is not None else None
                    sample["bad_records"] = [(sample_id(entry.url, key), error)]
                else:
                    sample["bad_records"] = []
                yield sample

    def _raw_entries(self, slot: int) -> Iterator[_Raw]:
        epoch = 0
        while True:
            entries = 0
            for url in self.shards_of(slot, epoch):
                try:
                    for sample in iter_tar_samples(url):
                        entries += 1
                        yield _Raw(epoch, url, sample, None)
                except SHARD_FAILURES as e:
                    entries += 1
                    message = str(e) if url in str(e) else f"{url}: {e}"
                    yield _Raw(epoch, url, None, f"{message} (rest of the shard skipped)")
            if entries == 0:
                raise DataError(f"the shards of data worker slot {slot} hold no samples: "
                                f"{self.shards_of(slot, epoch)}")
            epoch += 1

    def _build(self, entry: _Raw, refill: bool) -> tuple[dict | None, str | None]:
        """``(sample, None)``, or ``(None, message naming url and key)`` for a bad entry (raised when
        ``strict``)."""
        if entry.sample is None:
            if self.strict:
                raise RecordError(entry.error)
            return None, entry.error
        key = entry.sample["__key__"]
        where = f"{entry.url}: sample {key}"
        try:
            record, image_bytes = sample_to_record(entry.sample)
            if self.strict and record.bad_regions:
                raise RecordError(record.bad_regions[0])
            image = load_image_bytes(image_bytes, where, self.draft_size)
            seed = sample_seed(self.seed, entry.epoch, stable_int(key + "#refill" if refill else key))
            sample = dict(self.build(image, record, seed))
        except RECORD_FAILURES as e:
            message = str(e) if where in str(e) else f"{where}: {e}"
            if self.strict:
                raise RecordError(message) from e
            return None, message
        return sample, None

    def _refills(self, raw: _Lookahead, count: int) -> list[dict]:
        """The next ``count`` good samples after the current window, looked at but not consumed."""
        refills: list[dict] = []
        failures: list[str] = []
        i = 0
        while len(refills) < count:
            sample, error = self._build(raw.peek(i), refill=True)
            i += 1
            if sample is None:
                failures.append(error)
                if len(failures) >= MAX_LOOKAHEAD_FAILURES:
                    raise DataError(f"{len(failures)} samples in a row failed to load; first errors:\n"
                                    + "\n".join(failures[:5]))
            else:
                refills.append(sample)
                failures.clear()
        return refills
