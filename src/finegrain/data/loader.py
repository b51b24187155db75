"""Build training / evaluation data from a :class:`~finegrain.config.DataSourceConfig`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import DataConfig, DataSourceConfig
from ..errors import DataError
from ..sample_spec import MIN_IMAGE_SIDE
from .coco_regions import read_coco_region_text
from .collate import collate
from .dataset import BadRecordCounter, FailureStreak, RecordDataset, ResumableBatchSampler
from .demo import ensure_demo_dataset
from .readers import read_csv, read_image_folder, read_karpathy, read_records
from .record_store import RecordSequence, RecordSubset
from .records import RecordError
from .segmentation import PRESETS as SEGMENTATION_PRESETS
from .segmentation import SegmentationFolder, segmentation_records


def is_webdataset(path: str) -> bool:
    return ".tar" in path


def _karpathy_spec(spec: str) -> tuple[Path, str]:
    """``FILE@SPLIT`` (or ``FILE``: the test split) -> ``(FILE, SPLIT)``."""
    file, at, split = spec.rpartition("@")
    return (Path(file), split) if at and split and "/" not in split else (Path(spec), "test")


FOLDER_SOURCES = (*SEGMENTATION_PRESETS, "segfolder", "imagefolder")


def is_folder_source(path: str) -> bool:
    """A source naming a folder (``imagefolder:DIR``, ``segfolder:DIR``, ``ade20k-150:DIR@training``, ...)."""
    return path.split(":", 1)[0] in FOLDER_SOURCES


def _folder_and_split(path: str) -> tuple[str, str | None]:
    spec = path.split(":", 1)[1]
    root, at, split = spec.rpartition("@")
    return (root, split) if at and split and "/" not in split else (spec, None)


def folder_of(path: str) -> Path:
    """The folder of a :func:`is_folder_source` source."""
    return Path(_folder_and_split(path)[0])


def _segmentation_source(path: str) -> SegmentationFolder:
    """``PRESET:ROOT[@SPLIT]`` (a preset of :data:`~finegrain.data.segmentation.PRESETS`) or
    ``segfolder:ROOT`` (``ROOT/images`` beside ``ROOT/labels``) -> the folder."""
    kind = path.split(":", 1)[0]
    root, split = _folder_and_split(path)
    if not Path(root).is_dir():
        raise FileNotFoundError(f"data source {path!r}: {root} is not a folder")
    if kind == "segfolder":
        return SegmentationFolder(root, "images", "labels", class_names=[], split=split and f"{split}.txt")
    return SegmentationFolder.preset(kind, root, split)


def resolve_source(src: DataSourceConfig, strict: bool = False,
                   class_names: Sequence[str] | None = None) -> tuple[RecordSequence, Path]:
    """Records and image root of a map-style source (``demo:<split>``, JSONL, CSV/TSV, COCO json, a
    caption list json, ``imagefolder:DIR``, ``karpathy:FILE@SPLIT``, a segmentation folder
    (``ade20k-150:ROOT@training``, ``pascal-context-59:ROOT@train``, ``segfolder:ROOT[@SPLIT]`` with ``images/`` and
    ``labels/`` and optionally ``SPLIT.txt`` listing stems: records with ``label_map``), or the FineCLIP COCO layout when ``regions`` is set: see
    :mod:`finegrain.data.coco_regions`).

    ``imagefolder:DIR`` is torchvision's ``DIR/<class>/<image>`` with image labels, its root ``DIR``;
    ``class_names`` (only for it) relabel the sorted class folders by position (see
    :func:`~finegrain.data.readers.read_image_folder`). ``karpathy:FILE@SPLIT`` is a Karpathy split json
    (``@test`` when no split is given). The records are a compact read-only sequence whose ``failures``
    lists the ``(key, message)`` of the malformed records skipped while reading (``strict=True``: the first
    one raises instead; JSONL lines are checked when used unless ``strict``); see
    :mod:`finegrain.data.readers`."""
    if class_names is not None and not src.path.startswith("imagefolder:"):
        raise DataError(f"data source {src.path!r}: class names relabel the folders of an imagefolder:DIR "
                        "source only")
    if src.path.split(":", 1)[0] in (*SEGMENTATION_PRESETS, "segfolder"):
        if src.root:
            raise DataError(f"data source {src.path!r}: paths are relative to its folder; leave root unset")
        folder = _segmentation_source(src.path)
        return segmentation_records(folder), folder.root
    if src.path.startswith("imagefolder:"):
        folder = Path(src.path.split(":", 1)[1])
        if src.root and Path(src.root) != folder:
            raise DataError(f"data source {src.path!r}: the image root of an ImageFolder is its folder; "
                            f"root {src.root!r} must be left unset")
        return read_image_folder(folder, class_names), folder
    if src.path.startswith("karpathy:"):
        path, split = _karpathy_spec(src.path.split(":", 1)[1])
        if not path.is_file():
            raise FileNotFoundError(f"data source {src.path!r}: {path} does not exist")
        return read_karpathy(path, split, strict), Path(src.root) if src.root else path.parent
    if src.path.startswith("demo:"):
        path = ensure_demo_dataset() / f"{src.path.split(':', 1)[1]}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"data source {src.path!r}: the demo dataset has splits 'train' and 'val'")
    else:
        path = Path(src.path)
        if path.is_dir():
            raise FileNotFoundError(f"data source {src.path!r} is a folder, not a records file: name the file in it "
                                    "(region-text JSONL, CSV/TSV, COCO json), or a folder format "
                                    "(imagefolder:DIR, segfolder:DIR, ade20k-150:DIR@SPLIT)")
        if not path.is_file():
            raise FileNotFoundError(f"data source {src.path!r} does not exist")
    if src.regions is not None:
        records, _ = read_coco_region_text(path, src.regions, src.region_captions, strict=strict)
    elif path.suffix in (".csv", ".tsv"):
        records = read_csv(path, src.csv_image_key, src.csv_caption_key, sep="\t" if path.suffix == ".tsv" else ",",
                           strict=strict)
    else:
        records = read_records(path, strict)
    return records, Path(src.root) if src.root else path.parent


def kept_records(records: RecordSequence, build, name: str, announce: bool = False) -> RecordSequence:
    """The records a dense builder trains on (``build.keeps``; a malformed one is kept: the dataset skips and
    counts it); with ``announce``, one line saying how many were left out. A ``DataError`` naming what was
    expected when no record has the task's targets (``build.has_targets``) or, for instances with masks, when no
    region has a mask: nothing is trained on silently. With ``announce`` a class of the task that labels no region
    of any record (a name that is not the data's: it would never be learned) is said once."""
    dense = getattr(build, "dense", None)
    names = dense.class_names if dense is not None and dense.kind == "instances" else ()
    indices, usable, labels, masked = [], 0, set(), 0
    for i in range(len(records)):
        try:
            record = records[i]
        except RecordError:
            indices.append(i)
            continue
        usable += build.has_targets(record)
        labels.update(region.label for region in record.regions)
        masked += any(region.mask is not None for region in record.regions)
        if build.keeps(record):
            indices.append(i)
    if not usable:
        raise DataError(f"data.train.path={name!r}: none of its {len(records)} records has {build.targets}")
    if names and dense.masks and not masked:
        raise DataError(f"data.train.path={name!r}: none of its {len(records)} records has a region with a mask "
                        "(field 'mask'; COCO's 'segmentation'), so every instance would be dropped; method.masks=false "
                        "trains boxes only")
    unseen = [n for n in names if n not in labels]
    if unseen and announce:
        print(f"warning: data.train: the task's classes {unseen[:5]}{' ...' if len(unseen) > 5 else ''} ({len(unseen)} "
              f"of {len(names)}) label no region of its {len(records)} records and will not be learned (does the class "
              f"list name the data's labels? e.g. {sorted(label for label in labels if label)[:3]})", file=sys.stderr)
    if len(indices) == len(records):
        return records
    if not indices:
        raise DataError(f"data.train.path={name!r}: all its {len(records)} records are left out (none has an instance "
                        f"of the task's classes on an image with both sides of {MIN_IMAGE_SIDE} px or more); "
                        "method.drop_empty=false trains on them")
    if announce:
        print(f"data.train: {len(records) - len(indices)} of {len(records)} records have no instance of the task's "
              f"classes (or an image side under {MIN_IMAGE_SIDE} px) and are left out of training, as mmdet does")
    return RecordSubset(records, np.array(indices))


def check_first_sample(dataset: RecordDataset, name: str) -> None:
    """Build the first sample of ``dataset`` before training, as the loader would (its RNG state is left as it
    was): when the records tried in a row all fail (the streak that stops a run: every label map in RGB, every
    image missing under a wrong root), one ``ValueError`` naming the source says so now, not at the first step."""
    try:
        dataset[(0, 0)]
    except FailureStreak as e:
        raise ValueError(f"data.train.path={name!r}: {e}") from None


def build_train_loader(cfg: DataConfig, build, seed: int, rank: int, world_size: int, start_batch: int = 0,
                       pin_memory: bool = False, bad_records: BadRecordCounter | None = None,
                       announce: bool = False) -> tuple[DataLoader, Callable[[int], float]]:
    """A loader of this rank's micro-batches starting at micro-batch ``start_batch``, and a function
    mapping a micro-batch position to the (fractional) epoch. ``pin_memory`` (for CUDA; ``data.pin_memory``
    overrides) lets batches be copied to the device without blocking. ``bad_records`` is told the size of
    the source and the records its reader skipped; a dense builder (``has_targets`` / ``keeps``) chooses the
    records trained on (:func:`kept_records`, which says how many it left out when ``announce``). The loader
    seeds its workers from its own generator, so starting it draws nothing from torch's global RNG (which a resumed run has restored for the method)."""
    src = cfg.train
    workers = cfg.num_workers
    common = {"collate_fn": collate, "num_workers": workers, "generator": torch.Generator().manual_seed(seed + rank),
              "persistent_workers": cfg.persistent_workers and workers > 0,
              "pin_memory": pin_memory if cfg.pin_memory is None else cfg.pin_memory,
              "prefetch_factor": cfg.prefetch_factor if workers else None}
    if is_webdataset(src.path):
        from .webdataset import ShardStream, expand_urls

        stream = ShardStream(expand_urls(src.path), build, seed=seed, rank=rank, world_size=world_size,
                             batch_size=cfg.batch_size, num_workers=cfg.num_workers, start_batch=start_batch,
                             strict=cfg.strict)
        per_epoch = src.samples_per_epoch
        if bad_records is not None:
            bad_records.set_source(per_epoch, name=src.path)

        def epoch_of(position: int) -> float:
            return position * cfg.batch_size * world_size / per_epoch if per_epoch else 0.0

        return DataLoader(stream, batch_size=cfg.batch_size, **common), epoch_of
    records, root = resolve_source(src, cfg.strict)
    if callable(getattr(build, "has_targets", None)):
        records = kept_records(records, build, src.path, announce)
    if bad_records is not None:
        bad_records.set_source(len(records), records.failures, src.path)
    sampler = ResumableBatchSampler(len(records), cfg.batch_size, seed, rank, world_size, start_batch)
    dataset = RecordDataset(records, root, build, cfg.strict, cfg.max_bad_fraction)
    if callable(getattr(build, "has_targets", None)):
        check_first_sample(dataset, src.path)
    loader = DataLoader(dataset, batch_sampler=sampler, **common)
    return loader, sampler.epoch_of
