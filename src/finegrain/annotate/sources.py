"""Images to annotate, split into work units that map one-to-one onto output shards.

A source is one of:

- a folder: every image under it (a sorted walk, torchvision's image extensions), without captions; the other
  files are counted by extension (``passed_over``) and named in the command's summary;
- a records file or spec that finegrain trains on (:func:`finegrain.data.loader.resolve_source`): region-text
  JSONL, open_clip CSV/TSV, a COCO captions or instances json, a caption list, ``imagefolder:DIR``,
  ``karpathy:FILE@SPLIT``, ``demo:train``; image paths are relative to ``root`` (default: the file's
  folder). Their captions pass through, and their regions (COCO instances boxes) are what the ``gt``
  proposer proposes;
- WebDataset shards (a ``.tar`` path or brace pattern): the ``.txt`` caption or region-text ``.json`` of each
  sample passes through; a sample with only an image is annotated without captions.

Work units are fixed by the source alone, so that every process, every resume and every shard count agree
on them: ``images_per_shard`` consecutive records of a records source, or one input tar shard of a WebDataset
source. Unit ``k`` becomes output shard ``k``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from finegrain.config import DataSourceConfig
from finegrain.data.images import load_image, load_image_bytes
from finegrain.data.loader import is_webdataset, resolve_source
from finegrain.data.readers import read_image_files
from finegrain.data.record_store import RecordSequence
from finegrain.data.records import Record, RecordError
from finegrain.data.webdataset import (
    expand_urls,
    iter_tar_samples,
    sample_image,
    sample_to_record,
    sample_where,
)
from finegrain.errors import DataError


@dataclass(frozen=True)
class SourceImage:
    """One image to annotate: its record (``image`` relative to the source root; captions and regions as the
    source has them) and, for WebDataset sources, its encoded bytes."""

    record: Record
    data: bytes | None = None

    def load(self, root: Path) -> Image.Image:
        """The image as finegrain reads it everywhere (EXIF orientation applied, RGB); :class:`ImageError`
        naming the file when it cannot be decoded."""
        if self.data is not None:
            return load_image_bytes(self.data, self.record.key or self.record.image)
        return load_image(root / self.record.image)

    def encoded(self, root: Path) -> bytes:
        """The image file's bytes as stored (for WebDataset output)."""
        return self.data if self.data is not None else (root / self.record.image).read_bytes()


class ImageSource:
    """The work units of a source (see the module docstring). ``units`` is their count; ``images(k)``
    streams unit ``k``; ``root`` is the folder image paths are relative to (None for WebDataset)."""

    def __init__(self, spec: str, root: str | None = None, images_per_shard: int = 1000):
        if images_per_shard < 1:
            raise DataError(f"images_per_shard must be >= 1, got {images_per_shard}")
        self.spec = spec
        self.images_per_shard = images_per_shard
        self.records: RecordSequence | None = None
        self.shards: list[str] = []
        self.passed_over: Counter[str] = Counter()  # a folder's files that are not images, by extension
        if is_webdataset(spec):
            if root:
                raise DataError(f"source {spec!r}: WebDataset shards hold their images; --root does not apply")
            self.shards = expand_urls(spec)
            missing = [url for url in self.shards if not Path(url).is_file()]
            if missing:
                raise FileNotFoundError(f"source {spec!r}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
            self.root = None
        elif Path(spec).is_dir():
            if root and Path(root) != Path(spec):
                raise DataError(f"source {spec!r} is a folder: its images are relative to it; --root does not apply")
            self.records, self.root = read_image_files(spec, self.passed_over), Path(spec)
        else:
            self.records, self.root = resolve_source(DataSourceConfig(path=spec, root=root))
        if self.records is not None and not len(self.records):
            raise DataError(f"source {spec!r} has no images")

    def passed_over_summary(self) -> str | None:
        """``"3 file(s) that are not images it reads: 2 .gif, 1 .txt"`` for a folder source, None if none."""
        if not self.passed_over:
            return None
        by_count = sorted(self.passed_over.items(), key=lambda item: (-item[1], item[0]))
        counts = ", ".join(f"{n} {ext or '(no extension)'}" for ext, n in by_count)
        return f"{self.passed_over.total()} file(s) that are not images it reads: {counts}"

    @property
    def units(self) -> int:
        if self.records is None:
            return len(self.shards)
        return -(-len(self.records) // self.images_per_shard)

    @property
    def size(self) -> int | None:
        """Images in the source (None for WebDataset: unknown until read)."""
        return None if self.records is None else len(self.records)

    def unit_size(self, unit: int) -> int | None:
        if self.records is None:
            return None
        return min(self.images_per_shard, len(self.records) - unit * self.images_per_shard)

    def images(self, unit: int, malformed: list[str]) -> Iterator[SourceImage]:
        """The images of work unit ``unit``, in order. A malformed record (a bad JSONL line, a tar sample
        without an image) is left out and its message appended to ``malformed``; an unreadable tar ends its
        unit there, with a message."""
        if not 0 <= unit < self.units:
            raise IndexError(f"work unit {unit} out of range for {self.units}")
        if self.records is None:
            yield from self._shard_images(self.shards[unit], malformed)
            return
        start = unit * self.images_per_shard
        for i in range(start, min(start + self.images_per_shard, len(self.records))):
            try:
                yield SourceImage(self.records[i])
            except RecordError as e:
                malformed.append(str(e))

    @staticmethod
    def _shard_images(url: str, malformed: list[str]) -> Iterator[SourceImage]:
        try:
            for sample in iter_tar_samples(url):
                try:
                    if "txt" in sample or "json" in sample:
                        record, data = sample_to_record(sample)
                    else:  # an image alone: nothing to pass through
                        name, data = sample_image(sample)
                        record = Record(name, key=sample_where(sample))
                except RecordError as e:
                    malformed.append(str(e))
                    continue
                yield SourceImage(record, data)
        except RecordError as e:
            malformed.append(str(e))
