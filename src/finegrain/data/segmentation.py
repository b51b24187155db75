"""Semantic-segmentation folders: images beside single-channel label maps of the same file stem.

A folder is ``root/<images>/<stem>.<jpg|png|...>`` with ``root/<labels>/<stem>.png`` (any name Pillow reads
as mode ``L``, ``P`` or ``I``), a class list (a built-in list name or a file, resolved by the evaluator), and
optionally a split file listing the stems to use, one per line; without one, every label map is used.

Label values are class indices ``0..C-1``; ``ignore_index`` (default 255) marks unlabelled pixels. With
``reduce_zero_label`` (mmsegmentation's option) value 0 means "other / background" and is ignored, and
``1..C`` become ``0..C-1``.

Presets for mmsegmentation's layouts (:data:`PRESETS`, :meth:`SegmentationFolder.preset`):

- ``ade20k-150``: ``ADEChallengeData2016/images/<split>`` + ``annotations/<split>`` (split ``validation`` or
  ``training``), the 150 classes, 0 ("other") ignored, 1..150 -> 0..149.
- ``pascal-context-59``: ``VOCdevkit/VOC2010/JPEGImages`` + ``SegmentationClassContext``, stems from
  ``ImageSets/SegmentationContext/<split>.txt`` (``val`` or ``train``), the 59 classes, 0 (background)
  ignored, 1..59 -> 0..58.

``root`` may be the folder holding ``ADEChallengeData2016`` / ``VOCdevkit`` or that folder itself.

A pair whose image or label map is missing or cannot be decoded raises :class:`ImageError` when it is read
(evaluators skip and count such pairs); a label map whose size differs from its image's is a ``DataError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from .images import DECODE_FAILURES, ImageError, load_image
from .record_store import PackedRecords
from .records import Record

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")


@dataclass(frozen=True)
class SegmentationSample:
    """One image and its label map. ``label``: ``(H, W)`` int64 class indices, ``ignore_index`` where
    unlabelled; ``image``: RGB, EXIF-oriented, the same ``H x W``."""

    stem: str
    image: Image.Image
    label: torch.Tensor
    label_path: Path


@dataclass(frozen=True)
class Preset:
    """A standard layout: folders relative to ``base`` (``{split}`` is filled in), its class list."""

    base: str
    images: str
    labels: str
    split_file: str | None
    default_split: str
    class_names: str
    reduce_zero_label: bool


PRESETS: dict[str, Preset] = {
    "ade20k-150": Preset("ADEChallengeData2016", "images/{split}", "annotations/{split}", None, "validation",
                         "ade20k-150", True),
    "pascal-context-59": Preset("VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext",
                                "ImageSets/SegmentationContext/{split}.txt", "val", "pascal-context-59", True),
}


def read_label_map(path: Path) -> np.ndarray:
    """A single-channel label image -> ``(H, W)`` int64 values (palette indices for mode ``P``); raises
    :class:`ImageError` naming the file when it is missing, undecodable or not single-channel."""
    if not path.is_file():
        raise ImageError(f"{path}: label map not found")
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in LABEL_MODES:
                raise ImageError(f"{path}: a label map must be single-channel (mode L, P or I) class indices, got "
                                 f"mode {image.mode!r}" + (" (a colour-coded label map? map its colours to class "
                                                           "indices)" if image.mode in ("RGB", "RGBA") else ""))
            return np.asarray(image).astype(np.int64)
    except ImageError:
        raise
    except DECODE_FAILURES as e:
        raise ImageError(f"{path}: cannot decode label map ({type(e).__name__}: {e})") from None


class SegmentationFolder:
    """Image / label-map pairs of one split (see the module docstring); ``dataset[i]`` loads pair ``i``.

    Args:
        root: dataset root; the other paths are relative to it.
        images, labels: the image and label-map folders.
        class_names: a built-in class list name or a file (see ``finegrain.eval.prompts.load_class_names``),
            or the names themselves, in label order.
        split: a file listing the stems to use (one per line); None uses every label map in ``labels``.
        reduce_zero_label: label 0 is ignored and ``1..C`` become ``0..C-1``.
        ignore_index: the label of unlabelled pixels (in the files and in the returned labels).
        label_suffix: the label maps' file suffix.
    """

    def __init__(self, root: str | Path, images: str, labels: str, class_names: str | list[str],
                 split: str | None = None, reduce_zero_label: bool = False, ignore_index: int = 255,
                 label_suffix: str = ".png"):
        self.root = Path(root)
        self.images_dir = self.root / images
        self.labels_dir = self.root / labels
        self.class_names = class_names
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.label_suffix = label_suffix
        self.split = split
        for field, folder in (("images", self.images_dir), ("labels", self.labels_dir)):
            if not folder.is_dir():
                raise DataError(f"segmentation folder: {field} directory {folder} does not exist")
        self.stems = self._split_stems(self.root / split) if split else sorted(
            p.name[:-len(label_suffix)] for p in self.labels_dir.iterdir() if p.name.endswith(label_suffix))
        if not self.stems:
            raise DataError(f"segmentation folder: no label maps (*{label_suffix}) in {self.labels_dir}"
                            if split is None else f"segmentation folder: split file {self.root / split} is empty")
        self._images = self._image_files()

    @classmethod
    def preset(cls, name: str, root: str | Path, split: str | None = None, **overrides) -> SegmentationFolder:
        """The folder of a standard layout (:data:`PRESETS`); ``split`` defaults to the preset's validation
        split; ``overrides`` replace constructor arguments (e.g. ``class_names``)."""
        if name not in PRESETS:
            raise DataError(f"unknown segmentation preset {name!r}; expected one of {sorted(PRESETS)}")
        preset = PRESETS[name]
        root = Path(root)
        if (root / preset.base).is_dir():
            root = root / preset.base
        split = split or preset.default_split
        options = {"images": preset.images.format(split=split), "labels": preset.labels.format(split=split),
                   "class_names": preset.class_names, "reduce_zero_label": preset.reduce_zero_label,
                   "split": preset.split_file.format(split=split) if preset.split_file else None}
        return cls(root, **{**options, **overrides})

    def _split_stems(self, path: Path) -> list[str]:
        if not path.is_file():
            raise DataError(f"segmentation folder: split file {path} does not exist")
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]

    def _image_files(self) -> dict[str, Path]:
        """Stem -> image file in the images folder (a stem with two image files is an error)."""
        files: dict[str, Path] = {}
        for path in self.images_dir.iterdir():
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if path.stem in files:
                    raise DataError(f"segmentation folder: two images with stem {path.stem!r}: "
                                    f"{files[path.stem]} and {path}")
                files[path.stem] = path
        return files

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> SegmentationSample:
        stem = self.stems[index]
        label_path = self.labels_dir / f"{stem}{self.label_suffix}"
        if stem not in self._images:
            raise ImageError(f"{self.images_dir}: no image file for stem {stem!r} (label map {label_path})")
        image = load_image(self._images[stem])
        values = read_label_map(label_path)
        if values.shape != (image.height, image.width):
            raise DataError(f"{label_path}: label map is {values.shape[1]}x{values.shape[0]} (WxH) but its image "
                            f"{self._images[stem]} is {image.width}x{image.height}; they must be the same size")
        label = torch.from_numpy(values)
        if self.reduce_zero_label:
            label = torch.where((label == 0) | (label == self.ignore_index), self.ignore_index, label - 1)
        return SegmentationSample(stem, image, label, label_path)


def segmentation_records(folder: SegmentationFolder) -> PackedRecords:
    """One record per image / label-map pair of ``folder`` (``image`` and ``label_map`` relative to its root,
    keyed ``"<labels dir>/<stem>"``), for training on it: the label maps are read, and checked, per sample
    (``reduce_zero_label`` is the training targets' setting, :class:`~finegrain.sample_spec.DenseTargets`).
    A stem without an image file, and without a split file an image without a label map, is a failure of the
    reader (skipped and counted)."""
    root, failures, records = folder.root, [], []
    if folder.split is None:  # every label map is used: an image beside them without one is left out, counted
        labelled = set(folder.stems)
        for stem, image in sorted(folder._images.items()):
            if stem not in labelled:
                label = folder.labels_dir / f"{stem}{folder.label_suffix}"
                failures.append((str(image), f"{image}: no label map {label} for this image"))
    for stem in folder.stems:
        key = f"{folder.labels_dir}/{stem}"
        if stem not in folder._images:
            failures.append((key, f"{key}: no image file for stem {stem!r} in {folder.images_dir}"))
            continue
        label = (folder.labels_dir / f"{stem}{folder.label_suffix}").relative_to(root).as_posix()
        records.append(Record(folder._images[stem].relative_to(root).as_posix(), key=key, label_map=label))
    return PackedRecords.pack(records, failures=failures)
