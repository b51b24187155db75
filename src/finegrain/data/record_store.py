"""Compact read-only sequences of records, for map-style datasets of any size.

A list of millions of :class:`Record` objects costs hundreds of bytes of Python objects per record, and
every forked ``DataLoader`` worker ends up with its own copy of the pages that reference counting
touches. These stores keep a dataset in a few numpy arrays instead (untouched by reference counting, so
forked workers share them) and build a :class:`Record` only when one is asked for:

- :class:`JsonlIndex`: the byte span and line number of every non-blank line of a JSONL file; a record
  is read from the file (``os.pread``, in whichever process asks) and parsed on access, so a malformed
  line raises :class:`RecordError` naming ``file:line`` when it is used, not when the file is opened.
- :class:`PackedRecords`: records serialised as compact JSON into one ``uint8`` buffer with ``int64``
  offsets, for formats that must be parsed whole (CSV, COCO).

Both are ``Sequence[Record]`` (``len``, indexing, slicing to a list, iteration), pickle for spawned
workers, and carry ``failures``: the ``(key, message)`` of each malformed record the reader skipped.
"""

from __future__ import annotations

import json
import operator
import os
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from ..errors import UTF16_TEXT, looks_utf16
from .records import Record, RecordError, Region, parse_json_line

UTF8_BOM = b"\xef\xbb\xbf"
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True


class RecordSequence(Sequence[Record]):
    """Base of the stores: indexing (negative indices, slices to lists) on top of ``_get(i)``."""

    failures: list[tuple[str, str]]

    def _get(self, index: int) -> Record:
        raise NotImplementedError

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...

    def __getitem__(self, index: int | slice) -> Record | list[Record]:
        if isinstance(index, slice):
            return [self._get(i) for i in range(*index.indices(len(self)))]
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        return self._get(index)


def _line_spans(path: Path, chunk_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(starts, ends, lines)``, int64 ``(N,)`` each: byte span (end exclusive, newline excluded) and
    1-based line number of every line holding a non-whitespace byte. A leading UTF-8 BOM is skipped; UTF-16
    text raises :class:`RecordError`.

    Two passes over the file in chunks: the first counts newlines, so the arrays are allocated once at
    their final size (no per-chunk pieces to concatenate, which would double the peak memory)."""
    with path.open("rb") as f:
        capacity = 1 + sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(chunk_bytes), b""))
        spans = np.empty((3, capacity), dtype=np.int64)  # starts, ends, lines
        count = 0
        f.seek(0)
        head = f.read(len(UTF8_BOM))
        if looks_utf16(head):
            raise RecordError(f"{path}: {UTF16_TEXT}")
        base = len(UTF8_BOM) if head == UTF8_BOM else 0
        f.seek(base)
        pending_start, pending_content, line = base, False, 0  # the line running into the next chunk
        while chunk := f.read(chunk_bytes):
            data = np.frombuffer(chunk, dtype=np.uint8)
            content = ~_WHITESPACE[data]
            newlines = np.flatnonzero(data == 10)
            if len(newlines):
                seg_starts = np.concatenate(([0], newlines[:-1] + 1))
                has_content = np.logical_or.reduceat(content[:newlines[-1] + 1], seg_starts)
                has_content[0] |= pending_content
                seg_starts += base
                seg_starts[0] = pending_start
                keep = np.flatnonzero(has_content)
                spans[:, count:count + len(keep)] = seg_starts[keep], newlines[keep] + base, keep + line + 1
                count += len(keep)
                line += len(newlines)
                pending_start = base + int(newlines[-1]) + 1
                pending_content = bool(content[newlines[-1] + 1:].any())
            else:
                pending_content |= bool(content.any())
            base += len(chunk)
        if pending_content:
            spans[:, count] = pending_start, base, line + 1
            count += 1
    return spans[0, :count], spans[1, :count], spans[2, :count]


class JsonlIndex(RecordSequence):
    """Records of a region-text JSONL file, indexed by line: ``starts``/``ends`` (byte spans) and
    ``lines`` (1-based line numbers), int64 ``(N,)`` each, one entry per non-blank line. Record ``i`` is
    parsed on access and keyed ``file:line``; a malformed line raises :class:`RecordError`."""

    def __init__(self, path: str | Path, starts: np.ndarray, ends: np.ndarray, lines: np.ndarray,
                 failures: Iterable[tuple[str, str]] = ()):
        self.path = str(path)
        self.starts, self.ends, self.lines = starts, ends, lines
        self.failures = list(failures)
        self._file = None  # opened on first access; not pickled, so a spawned worker opens its own

    @classmethod
    def build(cls, path: str | Path, chunk_bytes: int = 1 << 22) -> JsonlIndex:
        """Index a JSONL file (one pass over its bytes; no line is parsed)."""
        return cls(path, *_line_spans(Path(path), chunk_bytes))

    def __len__(self) -> int:
        return len(self.starts)

    def _get(self, index: int) -> Record:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 (kept open for the index's lifetime)
        start, end = int(self.starts[index]), int(self.ends[index])
        data = os.pread(self._file.fileno(), end - start, start)  # no shared file position: fork-safe
        return parse_json_line(data, f"{self.path}:{int(self.lines[index])}")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}

    def __del__(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()


def _encode(record: Record, key_prefix: str) -> bytes:
    if not record.key.startswith(key_prefix):
        raise ValueError(f"record key {record.key!r} does not start with the store's key prefix {key_prefix!r}")
    regions = [[*r.box, r.caption, r.label, r.score, r.mask] for r in record.regions]
    row = [record.image, record.captions, regions, record.width, record.height, record.label,
           record.key[len(key_prefix):], record.source, record.bad_regions, record.label_map]
    return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class PackedRecords(RecordSequence):
    """Records serialised as compact JSON rows in ``data`` (uint8 ``(bytes,)``); row ``i`` is
    ``data[offsets[i]:offsets[i + 1]]`` (``offsets``: int64 ``(N + 1,)``). Keys are stored without
    ``key_prefix`` (e.g. the file path), which every key starts with."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, key_prefix: str = "",
                 failures: Iterable[tuple[str, str]] = ()):
        self.data, self.offsets, self.key_prefix = data, offsets, key_prefix
        self.failures = list(failures)

    @classmethod
    def pack(cls, records: Iterable[Record], key_prefix: str = "",
             failures: Iterable[tuple[str, str]] = ()) -> PackedRecords:
        """Serialise ``records`` (consumed lazily: a generator never materialises a list of them)."""
        buffer, offsets = bytearray(), array("q", [0])
        for record in records:
            buffer += _encode(record, key_prefix)
            offsets.append(len(buffer))
        data = np.frombuffer(buffer, dtype=np.uint8) if buffer else np.zeros(0, np.uint8)
        data.flags.writeable = False
        return cls(data, np.frombuffer(offsets, dtype=np.int64).copy(), key_prefix, failures)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _get(self, index: int) -> Record:
        row = json.loads(self.data[self.offsets[index]:self.offsets[index + 1]].tobytes())
        image, captions, regions, width, height, label, key, source, bad_regions, label_map = row
        return Record(image, tuple(captions), tuple(Region(tuple(r[:4]), *r[4:]) for r in regions),
                      width, height, label, self.key_prefix + key, source, tuple(bad_regions), label_map)


class RecordSubset(RecordSequence):
    """The records of ``records`` at ``indices`` (int64 ``(N,)``), in that order; ``failures`` are the source's."""

    def __init__(self, records: Sequence[Record], indices: np.ndarray):
        self.records, self.indices = records, np.asarray(indices, dtype=np.int64)
        self.failures = list(getattr(records, "failures", []))

    def __len__(self) -> int:
        return len(self.indices)

    def _get(self, index: int) -> Record:
        return self.records[int(self.indices[index])]
