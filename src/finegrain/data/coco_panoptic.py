"""COCO panoptic annotations (e.g. ``panoptic_val2017.json`` and its folder of PNGs) as images with segments.

The format is panopticapi's. The json holds three lists:

- ``images``: ``id``, ``file_name`` (relative to the image root), ``width`` and ``height``;
- ``annotations``: one per image, with ``image_id``, ``file_name`` (its PNG) and ``segments_info``, a list
  of ``{id, category_id, bbox [x, y, w, h], area, iscrowd}``;
- ``categories``: ``id``, ``name`` and ``isthing``.

A PNG pixel of colour ``(R, G, B)`` belongs to segment ``R + 256 * G + 256**2 * B``; 0 means unlabelled.

Boxes follow the FineCLIP / CLIPSelf box-classification protocol (their ``COCOPanopticDataset``):

- a thing's box is its annotation ``bbox`` as ``xyxy``, ``[x, y, x + w, y + h]``;
- a stuff segment's box comes from its mask (pycocotools ``toBbox``) as the indices of its first and last
  pixel, ``[x, y, x + w - 1, y + h - 1]``. This is CLIPSelf's ``mask2box``: one pixel short of the
  mask's extent at the right and at the bottom.

Malformed json fields raise :class:`PanopticError` naming the file, the list entry and the field.
:meth:`PanopticData.samples` skips an image whose PNG is missing, cannot be decoded, does not match the
image's size, or has no pixel of one of its stuff segments; it records the reason in the caller's list.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ..errors import DataError
from .images import DECODE_FAILURES
from .readers import _coco_box, _load_json

Box = tuple[float, float, float, float]


class PanopticError(DataError):
    """A panoptic json or PNG is malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class PanopticCategory:
    id: int
    name: str
    isthing: bool


@dataclass(frozen=True)
class PanopticSegment:
    """One segment of an image: its id in the PNG, its category and its protocol box (``xyxy``, pixels)."""

    id: int
    category: str
    isthing: bool
    box: Box

    @property
    def box_area(self) -> float:
        """``(x1 - x0) * (y1 - y0)``: what the protocol's size filter compares (not the mask's pixels)."""
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)


@dataclass(frozen=True)
class PanopticImage:
    """One annotated image: ``image`` is relative to the image root, ``png`` the path of its segment PNG."""

    image: str
    width: int
    height: int
    png: Path
    segments: tuple[PanopticSegment, ...]

    def segment_ids(self) -> np.ndarray:
        """``(height, width)`` int64 segment id of every pixel, decoded from the PNG (again, at each call)."""
        return decode_segment_ids(self.png)

    def masks(self, segments: Sequence[PanopticSegment] | None = None) -> np.ndarray:
        """``(K, height, width)`` bool masks of ``segments`` (default: all of this image's), in order."""
        ids = self.segment_ids()
        chosen = self.segments if segments is None else segments
        return ids[None] == np.array([s.id for s in chosen], dtype=np.int64)[:, None, None]


def decode_segment_ids(png: Path) -> np.ndarray:
    """A panoptic PNG -> ``(H, W)`` int64 segment ids, ``R + 256 G + 256^2 B`` (panopticapi's ``rgb2id``).
    Raises :class:`PanopticError` naming the file when it is missing or cannot be decoded."""
    if not png.is_file():
        raise PanopticError(f"{png}: panoptic PNG not found")
    try:
        with Image.open(png) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    except DECODE_FAILURES as e:
        raise PanopticError(f"{png}: cannot decode the panoptic PNG ({e})") from None
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def mask_box(mask: np.ndarray) -> Box:
    """CLIPSelf's ``mask2box`` of a non-empty ``(H, W)`` bool mask, computed with pycocotools: ``[x0, y0, x1,
    y1]``, the columns and rows of the mask's first and last pixels."""
    x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))).tolist()
    return x, y, x + w - 1, y + h - 1


@dataclass(frozen=True)
class _Annotation:
    image: str
    width: int
    height: int
    png: str
    segments: tuple[tuple[int, PanopticCategory, Box | None], ...]  # (segment id, category, thing box)


@dataclass(frozen=True)
class PanopticData:
    """A parsed panoptic json: ``categories`` sorted by id, and one entry per annotated image, in json order.

    ``len(data)`` counts the annotated images; :meth:`sample` decodes one image's PNG.
    """

    path: Path
    png_root: Path
    categories: tuple[PanopticCategory, ...]
    annotations: tuple[_Annotation, ...]

    def __len__(self) -> int:
        return len(self.annotations)

    @property
    def class_names(self) -> list[str]:
        """Every category's name, sorted by category id (the protocol's class list)."""
        return [c.name for c in self.categories]

    def samples(self, skipped: list[str]) -> Iterator[PanopticImage]:
        """Each annotated image with its segments and their boxes (:meth:`sample`). An image whose PNG cannot
        be used is left out; the reason is appended to ``skipped``."""
        for index in range(len(self)):
            try:
                yield self.sample(index)
            except PanopticError as e:
                skipped.append(str(e))

    def sample(self, index: int) -> PanopticImage:
        """Annotated image ``index`` with its segments and their boxes (a stuff box needs the PNG: it is decoded
        here and not kept); :class:`PanopticError` when its PNG cannot be used."""
        ann = self.annotations[index]
        return self._sample(ann, self.png_root / ann.png)

    def _sample(self, ann: _Annotation, png: Path) -> PanopticImage:
        ids = decode_segment_ids(png)
        if ids.shape != (ann.height, ann.width):
            raise PanopticError(f"{png}: the PNG is {ids.shape[1]}x{ids.shape[0]} but {self.path} says image "
                                f"{ann.image} is {ann.width}x{ann.height}")
        segments = []
        for i, (segment_id, category, box) in enumerate(ann.segments):
            if box is None:
                mask = ids == segment_id
                if not mask.any():
                    raise PanopticError(f"{png}: no pixel has the id {segment_id} of segments_info[{i}] "
                                        f"({self.path}, annotation of {ann.image})")
                box = mask_box(mask)
            segments.append(PanopticSegment(segment_id, category.name, category.isthing, box))
        return PanopticImage(ann.image, ann.width, ann.height, png, tuple(segments))


def read_panoptic(path: str | Path, png_root: str | Path | None = None) -> PanopticData:
    """Parse a COCO panoptic json. ``png_root`` defaults to the folder named as the json without ``.json``
    (COCO's layout: ``annotations/panoptic_val2017.json`` beside ``annotations/panoptic_val2017/``)."""
    path = Path(path)
    data = _load_json(path)
    lists = {}
    for name in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(name), list):
            raise PanopticError(f"{path}: field '{name}' must be a list (is this a COCO panoptic json?)")
        lists[name] = data[name]
    categories = _categories(path, lists["categories"])
    images = _images(path, lists["images"])
    annotations = tuple(_annotation(path, i, ann, images, categories)
                        for i, ann in enumerate(lists["annotations"]))
    return PanopticData(path, Path(png_root) if png_root is not None else path.with_suffix(""),
                        tuple(sorted(categories.values(), key=lambda c: c.id)), annotations)


def _field(path: Path, where: str, entry: Any, name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = entry.get(name) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PanopticError(f"{path}: {where}: field '{name}' must be {what}, got {value!r}")
    return value


def _categories(path: Path, entries: list[Any]) -> dict[int, PanopticCategory]:
    categories: dict[int, PanopticCategory] = {}
    for i, entry in enumerate(entries):
        where = f"categories[{i}]"
        category_id = _field(path, where, entry, "id", int, "an integer")
        name = _field(path, where, entry, "name", str, "a string")
        isthing = entry.get("isthing")
        if isthing not in (0, 1):
            raise PanopticError(f"{path}: {where}: field 'isthing' must be 0 or 1, got {isthing!r}")
        if category_id in categories:
            raise PanopticError(f"{path}: {where}: field 'id' {category_id} is repeated")
        categories[category_id] = PanopticCategory(category_id, name, bool(isthing))
    if not categories:
        raise PanopticError(f"{path}: field 'categories' is empty")
    return categories


def _images(path: Path, entries: list[Any]) -> dict[Any, tuple[str, int, int]]:
    images = {}
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        image_id = _field(path, where, entry, "id", (int, str), "an integer or string")
        file_name = _field(path, where, entry, "file_name", str, "a file name")
        width, height = (_field(path, where, entry, name, int, "an integer") for name in ("width", "height"))
        if width <= 0 or height <= 0:
            raise PanopticError(f"{path}: {where}: fields 'width'/'height' must be positive, got "
                                f"{width}x{height}")
        images[image_id] = (file_name, width, height)
    return images


def _annotation(path: Path, i: int, entry: Any, images: dict[Any, tuple[str, int, int]],
                categories: dict[int, PanopticCategory]) -> _Annotation:
    where = f"annotations[{i}]"
    image_id = _field(path, where, entry, "image_id", (int, str), "an image id")
    if image_id not in images:
        raise PanopticError(f"{path}: {where}: field 'image_id' {image_id!r} is not in 'images'")
    png = _field(path, where, entry, "file_name", str, "a PNG file name")
    segments = []
    for j, info in enumerate(_field(path, where, entry, "segments_info", list, "a list")):
        at = f"{where}.segments_info[{j}]"
        segment_id = _field(path, at, info, "id", int, "a positive integer")
        category_id = _field(path, at, info, "category_id", int, "a category id")
        if segment_id <= 0:
            raise PanopticError(f"{path}: {at}: field 'id' must be a positive integer, got {segment_id}")
        if category_id not in categories:
            raise PanopticError(f"{path}: {at}: field 'category_id' {category_id} is not in 'categories'")
        category = categories[category_id]
        box = _coco_box(info, f"{path}: {at}") if category.isthing else None
        segments.append((segment_id, category, box))
    return _Annotation(*images[image_id], png, tuple(segments))
