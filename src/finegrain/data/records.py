"""The region-text record: one image, its captions, and its regions (boxes with captions).

This is the one data model shared by the readers, the annotation tools and the evaluators.
On disk it is one JSON object per line (JSONL) or the ``.json`` member of a WebDataset sample::

    {"format": "finegrain.region-text/1", "image": "train/000001.png", "width": 64, "height": 64,
     "captions": ["a large red triangle and a small blue circle on a striped background"],
     "regions": [{"box": [x0, y0, x1, y1], "caption": "a large red triangle", "label": "red triangle",
                  "score": 0.9}],
     "source": {"proposer": "...", "captioner": "..."}}

Boxes are absolute pixels, ``xyxy``, in the image as displayed: after its EXIF orientation is applied
(a photo stored sideways with orientation 6 has its ``width``/``height`` and boxes in the upright frame).
``label``, ``score``, ``regions``, ``width``/``height`` and ``source`` are optional. Fine-tuning data adds a
region ``mask`` (COCO ``segmentation``: polygons or RLE, in the same pixel frame) and a record ``label_map``
(a single-channel PNG of class indices, path relative to the dataset root). A plain
``{"image": ..., "caption": ...}`` line is accepted too. ``label`` at the top level is an image-level class
name (zero-shot classification sets).

Parsing checks what a record *says* (types, finite coordinates, ``x0 <= x1`` and ``y0 <= y1``, pixel and
not normalised boxes; a malformed region is dropped, the rest of the record kept); geometry against the decoded image is :func:`fit_boxes`'s job at training and
evaluation time: boxes partly outside are clipped, boxes wholly outside or with zero area dropped, both
counted. :func:`check_record_size` catches a ``width``/``height`` that disagrees with the image its boxes
are on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError, non_utf8_text

RECORD_FORMAT = "finegrain.region-text/1"


class RecordError(DataError):
    """A record is malformed; the message names the record and the field."""


@dataclass(frozen=True)
class Region:
    """One box of an image. ``box`` is ``(x0, y0, x1, y1)`` in absolute pixels of the displayed image."""

    box: tuple[float, float, float, float]
    caption: str | None = None
    label: str | None = None
    score: float | None = None
    mask: Any = None  # COCO ``segmentation``: polygons ``[[x, y, ...], ...]`` or RLE ``{"size", "counts"}``

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"box": [float(v) for v in self.box]}
        for name in ("caption", "label", "score", "mask"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True)
class Record:
    """One image with its captions and regions. ``key`` names the record in error messages;
    ``bad_regions`` holds the message of each malformed region the reader dropped (the image and its good
    regions are kept; training counts and reports them as it does bad records)."""

    image: str
    captions: tuple[str, ...] = ()
    regions: tuple[Region, ...] = ()
    width: int | None = None
    height: int | None = None
    label: str | None = None
    key: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    bad_regions: tuple[str, ...] = ()
    label_map: str | None = None  # a semantic label map of the image (path relative to the root)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": RECORD_FORMAT, "image": self.image}
        if self.width is not None and self.height is not None:
            out["width"], out["height"] = self.width, self.height
        out["captions"] = list(self.captions)
        out["regions"] = [r.to_json() for r in self.regions]
        if self.label is not None:
            out["label"] = self.label
        if self.label_map is not None:
            out["label_map"] = self.label_map
        if self.source:
            out["source"] = self.source
        return out


def _expect(cond: bool, key: str, field_name: str, message: str) -> None:
    if not cond:
        raise RecordError(f"{key}: field '{field_name}' {message}")


def parse_region(obj: Any, key: str, index: int) -> Region:
    """Validate one region dict: ``box`` is four finite numbers with ``x0 <= x1`` and ``y0 <= y1``."""
    where = f"regions[{index}]"
    _expect(isinstance(obj, dict), key, where, f"must be an object, got {type(obj).__name__}")
    box = obj.get("box")
    _expect(isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box), key, f"{where}.box",
            f"must be four numbers [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    _expect(all(math.isfinite(v) for v in (x0, y0, x1, y1)), key, f"{where}.box",
            f"{box!r} has a NaN or infinite coordinate")
    _expect(x1 >= x0 and y1 >= y0, key, f"{where}.box",
            f"{box!r} has x1 < x0 or y1 < y0: finegrain boxes are corners [x0, y0, x1, y1]; if the data "
            "holds [x, y, width, height], convert it (x1 = x + width, y1 = y + height)")
    caption = obj.get("caption")
    _expect(caption is None or (isinstance(caption, str) and caption.strip() != ""), key,
            f"{where}.caption", "must be a non-empty string")
    label = obj.get("label")
    _expect(label is None or isinstance(label, str), key, f"{where}.label", "must be a string")
    score = obj.get("score")
    _expect(score is None or isinstance(score, (int, float)), key, f"{where}.score", "must be a number")
    mask = obj.get("mask")
    _expect(mask is None or isinstance(mask, (list, dict)), key, f"{where}.mask",
            "must be COCO polygons [[x, y, ...], ...] or an RLE {\"size\": [h, w], \"counts\": ...}")
    return Region((x0, y0, x1, y1), caption, label, None if score is None else float(score), mask)


def check_pixel_boxes(regions: tuple[Region, ...] | list[Region], width: int, height: int, key: str) -> None:
    """Raise :class:`RecordError` when every coordinate is within [-1, 1] on an image larger than 16
    pixels: such boxes are almost surely normalised to [0, 1], while finegrain boxes are absolute pixels."""
    if regions and max(width, height) > 16 and all(abs(v) <= 1.0 for r in regions for v in r.box):
        raise RecordError(f"{key}: field 'regions' has boxes {[list(r.box) for r in regions[:2]]} that look "
                          f"normalised to [0, 1]; boxes must be absolute pixels [x0, y0, x1, y1] in the "
                          f"{width}x{height} image (multiply x by the width and y by the height)")


def parse_record(obj: Any, key: str) -> Record:
    """Validate one JSON object as a :class:`Record`; raise :class:`RecordError` naming the field. A
    malformed region is dropped and its message kept in ``bad_regions``."""
    _expect(isinstance(obj, dict), key, "<record>", f"must be a JSON object, got {type(obj).__name__}")
    fmt = obj.get("format", RECORD_FORMAT)
    _expect(fmt == RECORD_FORMAT, key, "format", f"is {fmt!r}; this reader understands {RECORD_FORMAT!r}")
    image = obj.get("image")
    _expect(isinstance(image, str) and image != "", key, "image", "must be a non-empty path string")
    if "captions" in obj:
        captions = obj["captions"]
        _expect(isinstance(captions, list) and all(isinstance(c, str) for c in captions), key, "captions",
                "must be a list of strings")
    elif "caption" in obj:
        _expect(isinstance(obj["caption"], str), key, "caption", "must be a string")
        captions = [obj["caption"]]
    else:
        captions = []
    captions = tuple(c.strip() for c in captions if c.strip())
    width, height = obj.get("width"), obj.get("height")
    for name, value in (("width", width), ("height", height)):
        _expect(value is None or (isinstance(value, int) and value > 0), key, name,
                f"must be a positive integer, got {value!r}")
    regions_obj = obj.get("regions", [])
    _expect(isinstance(regions_obj, list), key, "regions", "must be a list")
    regions, bad_regions = [], []
    for i, region in enumerate(regions_obj):
        try:
            regions.append(parse_region(region, key, i))
        except RecordError as e:  # one malformed region (e.g. a reversed box) drops that region only
            bad_regions.append(str(e))
    regions = tuple(regions)
    if width is not None and height is not None:
        check_pixel_boxes(regions, width, height, key)
    label = obj.get("label")
    _expect(label is None or isinstance(label, str), key, "label", "must be a string")
    source = obj.get("source", {})
    _expect(isinstance(source, dict), key, "source", "must be an object")
    label_map = obj.get("label_map")
    _expect(label_map is None or (isinstance(label_map, str) and label_map != ""), key, "label_map",
            "must be a non-empty path string")
    return Record(image, captions, regions, width, height, label, key, source, tuple(bad_regions), label_map)


def fit_boxes(regions: tuple[Region, ...], width: int, height: int,
              key: str) -> tuple[list[Region], int, int]:
    """Fit regions to the displayed ``width x height`` image: boxes partly outside are clipped to it, boxes
    wholly outside or with zero area (before or after clipping) are dropped. Returns ``(kept regions,
    clipped count, dropped count)``. Normalised-looking boxes raise (see :func:`check_pixel_boxes`).
    """
    check_pixel_boxes(regions, width, height, key)
    kept, clipped, dropped = [], 0, 0
    for region in regions:
        x0, y0, x1, y1 = region.box
        fit = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width),
               min(max(y1, 0.0), height))
        if fit[2] <= fit[0] or fit[3] <= fit[1]:
            dropped += 1
            continue
        if fit != tuple(region.box):
            clipped += 1
            region = dataclasses.replace(region, box=fit)
        kept.append(region)
    return kept, clipped, dropped


def check_record_size(record: Record, image_size: tuple[int, int]) -> None:
    """Raise :class:`RecordError` when the record has regions and its ``width``/``height`` (the frame of its
    boxes) differ from ``image_size``, the ``(width, height)`` of the displayed (EXIF-oriented) image. The one
    rule for every reader of records (training, evaluation, annotation); a record without regions has no box
    to misplace and passes."""
    width, height = image_size
    if not record.regions or (record.width is None or record.width == width) and (record.height is None or record.height == height):
        return
    hint = ""
    if (record.width, record.height) == (height, width):
        hint = (" (the record matches the stored, un-rotated image: finegrain sizes and boxes refer to the "
                "image after its EXIF orientation)")
    raise RecordError(f"{record.key or record.image}: fields 'width'/'height' say {record.width}x{record.height} "
                      f"but the image is {width}x{height}{hint}; its boxes would be misplaced")


def parse_json_line(line: bytes, key: str) -> Record:
    """One JSONL line (UTF-8 bytes) -> :class:`Record`; :class:`RecordError` naming ``key`` (``file:line``)
    for text that is not UTF-8, not JSON, or not a valid record."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"{key}: {non_utf8_text(line, e)[1]}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"{key}: not valid JSON ({e.msg} at column {e.colno})") from None
    return parse_record(obj, key)


def write_jsonl(records: list[Record], path: str | Path) -> None:
    """Write records as region-text JSONL (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json()) + "\n")
    tmp.replace(path)
