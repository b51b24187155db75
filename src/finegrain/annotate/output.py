"""The output folder of ``finegrain annotate``: sharded region-text records, resumable, and an export to the
FineCLIP release's layout.

Layout of ``OUT/``::

    annotate.json               the settings that make the records (source, proposer, filter, captioner, ...)
    regions-000000.jsonl        shard k: the records of work unit k (``--format jsonl``), or
    regions-000000.tar          a WebDataset shard with the images (``--format wds``)
    regions-000000.stats.json   shard k's counts; its presence marks shard k finished
    regions.jsonl               (jsonl) every shard's records in order, written when the last shard is done
    summary.json                the counts of all shards (and every image or record left out, with the reason),
                                written when the last shard is done

Shards and stats are written atomically (temporary name, then rename), the shard first: a process killed at
any moment leaves finished shards, which ``--resume`` skips, and nothing half-written that a reader could
take for data (``--resume`` removes the temporary files a killed run left). ``--overwrite`` deletes exactly
the files the manifest names (and their temporary files), nothing else in the folder. The records are written
through :mod:`finegrain.data.records` (JSONL) and :mod:`finegrain.data.webdataset` (tar), the code that training
reads them with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from finegrain.data.coco_regions import region_caption_key
from finegrain.data.readers import read_jsonl
from finegrain.data.records import Record, write_jsonl
from finegrain.data.webdataset import iter_tar_samples, sample_to_record, write_shard
from finegrain.errors import DataError

FORMATS = ("jsonl", "wds")
MANIFEST = "annotate.json"
SUMMARY = "summary.json"
MERGED = "regions.jsonl"
PAPER_FILES = ("captions.json", "proposals.json", "region_captions.json")
TEMP_RE = re.compile(r"^(?P<name>.+?)(\.\d+)?\.tmp$")  # a temporary file of NAME: NAME.tmp or NAME.<pid>.tmp


def _write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON at ``path`` through a temporary file of this process, then rename."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


class AnnotationOutput:
    """The shards of one annotation run in ``folder`` (see the module docstring).

    Args:
        folder: the output folder (created).
        fmt: ``"jsonl"`` or ``"wds"``.
        settings: what determines the records; written to ``annotate.json``. A folder made with other
            settings is never reused or deleted.
        units: the number of shards of the whole run.
        mine: the shards this process writes (default: all).
        resume: continue the run in ``folder``: its settings must be ``settings``; finished shards are skipped.
            Without it, a finished shard of ``mine`` is an error (processes of one run may start at
            different moments, so other processes' shards do not count).
        overwrite: first delete the files that ``folder``'s manifest names (:func:`own_files`; nothing else;
            single process only).
    """

    def __init__(self, folder: str | Path, fmt: str, settings: Mapping[str, Any], units: int,
                 mine: Iterable[int] | None = None, resume: bool = False, overwrite: bool = False):
        if fmt not in FORMATS:
            raise DataError(f"output format must be one of {FORMATS}, got {fmt!r}")
        if resume and overwrite:
            raise DataError("--resume continues the run in the output folder, --overwrite deletes it: choose one")
        self.folder, self.fmt, self.units = Path(folder), fmt, units
        self.settings = {**settings, "format": fmt, "units": units}
        mine = set(range(units) if mine is None else mine)
        manifest = self.folder / MANIFEST
        if overwrite:
            for path in own_files(self.folder):  # raises before deleting anything when the folder is no annotation
                path.unlink()
        elif manifest.is_file():
            previous = json.loads(manifest.read_text(encoding="utf-8"))
            if previous != json.loads(json.dumps(self.settings)):
                changed = sorted(k for k in set(previous) | set(self.settings)
                                 if previous.get(k) != json.loads(json.dumps(self.settings)).get(k))
                raise DataError(f"{self.folder} holds an annotation made with other settings (differing: "
                                f"{', '.join(changed)}); choose another --output, or --overwrite to replace it")
            finished = sorted(set(self.finished()) & mine)
            if finished and not resume:
                raise DataError(f"{self.folder} already holds {len(finished)} finished shard(s) of this annotation; "
                                "--resume continues it, --overwrite starts over")
        elif self.folder.is_dir() and any(self.folder.iterdir()):
            raise DataError(f"{self.folder} is not empty and holds no annotation ({MANIFEST} is missing); "
                            "choose an empty or new --output folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(manifest, self.settings)
        # temporary files a killed writer left: of this process's unfinished shards, and of every file when this
        # process writes all shards (other processes may be writing the merged file and summary right now)
        stale = (own_names(fmt, units) if mine == set(range(units)) else
                 {name for k in mine - set(self.finished()) for name in (shard_name(k, fmt), stats_name(k))})
        for leftover in self.folder.iterdir():
            if (match := TEMP_RE.match(leftover.name)) and match["name"] in stale:
                leftover.unlink()

    def shard_path(self, unit: int) -> Path:
        return self.folder / shard_name(unit, self.fmt)

    def stats_path(self, unit: int) -> Path:
        return self.folder / stats_name(unit)

    def finished(self) -> list[int]:
        """The shards whose stats file (written last) exists."""
        return [k for k in range(self.units) if self.stats_path(k).is_file()]

    def write(self, unit: int, records: list[Record], stats: Mapping[str, int | list[str]],
              images: Iterable[bytes] | None = None) -> None:
        """Write shard ``unit`` (``images``: each record's encoded image, for ``wds``), then its stats."""
        if self.fmt == "wds":
            write_shard(self.shard_path(unit), zip(records, images, strict=True))
        else:
            write_jsonl(records, self.shard_path(unit))
        _write_json_atomic(self.stats_path(unit), dict(stats))

    def finish(self) -> dict[str, int | list[str]] | None:
        """When every shard is finished: sum their stats into ``summary.json``, write ``regions.jsonl``
        (jsonl) and return the sums; None while shards are missing (other processes still at work)."""
        if len(self.finished()) < self.units:
            return None
        total: dict[str, int] = {}
        for k in range(self.units):
            for name, value in json.loads(self.stats_path(k).read_text(encoding="utf-8")).items():
                total[name] = total[name] + value if name in total else value  # counts add, lists join
        if self.fmt == "jsonl":
            merged = self.folder / MERGED
            tmp = merged.with_name(merged.name + f".{os.getpid()}.tmp")
            with tmp.open("wb") as out:
                for k in range(self.units):
                    with self.shard_path(k).open("rb") as shard:
                        shutil.copyfileobj(shard, out)
            tmp.replace(merged)
        _write_json_atomic(self.folder / SUMMARY, total)
        return total

    def training_source(self) -> str:
        """The ``data.train.path`` that reads this output."""
        if self.fmt == "jsonl":
            return str(self.folder / MERGED)
        return str(self.folder / f"regions-{{{0:06d}..{self.units - 1:06d}}}.tar")


def shard_name(unit: int, fmt: str) -> str:
    return f"regions-{unit:06d}.{'jsonl' if fmt == 'jsonl' else 'tar'}"


def stats_name(unit: int) -> str:
    return f"regions-{unit:06d}.stats.json"


def own_names(fmt: str, units: int) -> set[str]:
    """The names of the files an annotation of ``units`` shards in format ``fmt`` writes."""
    names = {MANIFEST, SUMMARY, *([MERGED] if fmt == "jsonl" else [])}
    return names | {name for k in range(units) for name in (shard_name(k, fmt), stats_name(k))}


def own_files(folder: str | Path) -> list[Path]:
    """The files in ``folder`` that the annotation its manifest describes wrote (and their temporary files):
    what ``--overwrite`` deletes; none for an empty or missing folder. A folder holding other files but no
    manifest is an error (it is no annotation)."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        return []
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise DataError(f"--overwrite: {folder} holds no annotation ({MANIFEST} is missing); it is left alone: "
                        "choose an empty or new --output folder")
    try:
        settings = json.loads(manifest.read_text(encoding="utf-8"))
        names = own_names(settings["format"], int(settings["units"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"--overwrite: {manifest} is not a manifest of finegrain annotate ({e!r}); {folder} is "
                        "left alone: choose an empty or new --output folder") from None
    return sorted(path for path in folder.iterdir()
                  if path.name in names or ((match := TEMP_RE.match(path.name)) and match["name"] in names))


def read_output(folder: str | Path) -> Iterable[Record]:
    """The records of a finished annotation folder, in shard order."""
    folder = Path(folder)
    settings = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    for k in range(settings["units"]):
        if settings["format"] == "jsonl":
            yield from read_jsonl(folder / shard_name(k, "jsonl"), strict=True)
        else:
            for sample in iter_tar_samples(folder / shard_name(k, "wds")):
                yield sample_to_record(sample)[0]


def check_paper_layout(folder: str | Path, overwrite: bool) -> None:
    """Refuse a ``--paper-layout`` folder already holding one of the layout's files, unless ``overwrite``."""
    found = [name for name in PAPER_FILES if (Path(folder) / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"--paper-layout {folder} already holds {', '.join(found)}; choose another folder, "
                              "move them away, or pass --overwrite (without --resume) to replace them")


def export_paper_layout(records: Iterable[Record], folder: str | Path) -> dict[str, int]:
    """Write records as the FineCLIP release reads its COCO data (see :mod:`finegrain.data.coco_regions`):
    ``captions.json`` (COCO captions), ``proposals.json`` (COCO instances: ``bbox`` ``[x, y, w, h]``, one
    category ``region``, the proposer's ``score`` when known) and ``region_captions.json`` (``"<file_name>_<x>_
    <y>_<w>_<h>.jpg"`` -> caption, the bbox truncated by ``int()`` as the release builds the key).

    Returns counts: ``images``, ``regions``, ``captions``, and ``duplicate_keys``: regions whose key another
    region of the same image already has (same truncated box; the release can keep one caption per key, the
    first is kept).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, captions, proposals, region_captions = [], [], [], {}
    duplicates = 0
    for image_id, record in enumerate(records):
        if record.width is None or record.height is None:
            raise DataError(f"{record.key or record.image}: the paper layout needs 'width'/'height'")
        images.append({"id": image_id, "file_name": record.image, "width": record.width, "height": record.height})
        captions.extend({"id": len(captions), "image_id": image_id, "caption": c} for c in record.captions)
        for region in record.regions:
            x0, y0, x1, y1 = region.box
            bbox = [x0, y0, x1 - x0, y1 - y0]
            ann = {"id": len(proposals), "image_id": image_id, "category_id": 1, "bbox": bbox,
                   "area": bbox[2] * bbox[3], "iscrowd": 0}
            if region.score is not None:
                ann["score"] = region.score
            proposals.append(ann)
            key = region_caption_key(record.image, bbox)
            if region.caption is not None:
                if key in region_captions:
                    duplicates += 1
                else:
                    region_captions[key] = region.caption
    categories = [{"id": 1, "name": "region", "supercategory": "region"}]
    contents = ({"images": images, "annotations": captions},
                {"images": images, "annotations": proposals, "categories": categories}, region_captions)
    for name, content in zip(PAPER_FILES, contents, strict=True):
        _write_json_atomic(folder / name, content, indent=None)
    return {"images": len(images), "regions": len(proposals), "captions": len(captions),
            "duplicate_keys": duplicates}
