"""The FineCLIP / CLIPSelf COCO layout as region-text records.

Three files, as the papers' released code reads them:

- a COCO captions json (``captions_train2017.json``): several captions per image;
- a COCO-format proposals or instances json (``coco_proposals.json``, ``instances_train2017.json``):
  boxes as ``bbox`` ``[x, y, w, h]``; category ids are not used;
- a region-caption json: one object mapping ``f"{file_name}_{int(x)}_{int(y)}_{int(w)}_{int(h)}.jpg"``
  (the bbox values truncated by ``int()``, as the released code builds the key) to a caption.

One record per image of the proposals json (its ``file_name``, ``width``, ``height``), holding every
caption of that image id in the captions json and every box of the proposals json (crowd boxes
included, as in the released code), each with its region caption. Not errors, but counted in the
:class:`LayoutSummary` (and logged): a box whose key is missing from the region-caption json (it keeps
no caption; the released code raises a ``KeyError``), and images of the captions json that the
proposals json does not list (unused, as in the released code). Malformed records (skipped and
counted like every reader's, see :mod:`finegrain.data.readers`): an image that has no caption in the
captions json (the released code fails on it), a malformed ``bbox``, a region caption that is not a
non-empty string.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .readers import Failures, _caption_lists, _Coco, _coco_box, _load_json
from .record_store import PackedRecords
from .records import Record, RecordError, Region, check_pixel_boxes

log = logging.getLogger(__name__)


def region_caption_key(file_name: str, bbox: list[float]) -> str:
    """The region-caption json key of a COCO ``bbox`` ``[x, y, w, h]`` of image ``file_name``."""
    x, y, w, h = (int(v) for v in bbox)
    return f"{file_name}_{x}_{y}_{w}_{h}.jpg"


@dataclass
class LayoutSummary:
    """Counts of one read: records, their regions, regions whose key the region-caption json lacks
    (the first few keys in ``missing_examples``), malformed records skipped (both files), and captioned
    images that the proposals json does not list."""

    images: int = 0
    regions: int = 0
    regions_without_caption: int = 0
    malformed: int = 0
    unlisted_caption_images: int = 0
    missing_examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"{self.images} images, {self.regions} regions, {self.regions_without_caption} regions without a "
                f"region caption, {self.malformed} malformed records skipped, {self.unlisted_caption_images} "
                "captioned images not in the proposals file")
        if self.missing_examples:
            text += f"; missing region-caption keys, e.g. {', '.join(self.missing_examples)}"
        return text


def read_coco_region_text(captions: str | Path, regions: str | Path, region_captions: str | Path,
                          image_dir: str = "", strict: bool = False) -> tuple[PackedRecords, LayoutSummary]:
    """Read the layout (see the module docstring) -> ``(records, summary)``.

    Records are keyed ``"<proposals file>: image <id>"``; ``image`` is ``file_name``, with ``image_dir``
    prefixed when given (paths relative to the dataset root). ``strict=True`` raises at the first
    malformed record; missing region captions are never errors.
    """
    captions, regions, region_captions = Path(captions), Path(regions), Path(region_captions)
    failures = Failures(regions, strict)
    caption_data = _load_json(captions)
    caption_images = _Coco(captions, caption_data, "", failures)
    texts = _caption_lists(caption_images, caption_data)
    region_texts = _load_json(region_captions)
    if not isinstance(region_texts, dict):
        raise RecordError(f"{region_captions}: must be a JSON object mapping region keys "
                          f"'<file_name>_<x>_<y>_<w>_<h>.jpg' to captions, got {type(region_texts).__name__}")
    data = _load_json(regions)
    coco = _Coco(regions, data, "", failures)
    summary = LayoutSummary()
    summary.unlisted_caption_images = len(set(caption_images.images) - set(coco.images) - coco.bad)
    for image_id, image in list(coco.images.items()):
        if image_id in caption_images.bad:  # its malformed entry in the captions json is already counted
            del coco.images[image_id]
            coco.bad.add(image_id)
        elif not texts.get(image_id):
            coco.reject(image, image_id, f"{image['key']}: has no caption in {captions} (field 'annotations')")
    boxes: dict[Any, list[Region]] = {image_id: [] for image_id in coco.images}
    missing: dict[Any, int] = dict.fromkeys(coco.images, 0)
    for ann, image, where in coco.annotations(data):
        image_id = ann["image_id"]
        try:
            box = _coco_box(ann, where)
            key = region_caption_key(image["image"], ann["bbox"])
            text = region_texts.get(key)
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise RecordError(f"{region_captions}: key {key!r} must map to a non-empty caption string, "
                                  f"got {text!r}")
        except RecordError as e:
            coco.reject(image, image_id, str(e))
            continue
        if text is None:
            missing[image_id] += 1
            if len(summary.missing_examples) < 3:
                summary.missing_examples.append(key)
        boxes[image_id].append(Region(box, text.strip() if text else None))
    for image_id, image in list(coco.images.items()):
        try:
            check_pixel_boxes(boxes[image_id], image["width"], image["height"], image["key"])
        except RecordError as e:
            coco.reject(image, image_id, str(e))
    for image_id in coco.images:
        summary.regions += len(boxes[image_id])
        summary.regions_without_caption += missing[image_id]
    summary.images, summary.malformed = len(coco.images), len(failures.items)
    del data, caption_data, region_texts  # the parsed json is the peak memory; only the records are kept
    records = (Record(posixpath.join(image_dir, f["image"]) if image_dir else f["image"], tuple(texts[i]),
                      tuple(boxes[i]), f["width"], f["height"], key=f["key"]) for i, f in coco.images.items())
    packed = PackedRecords.pack(records, f"{regions}: ", failures.report())
    level = logging.WARNING if summary.regions_without_caption or summary.unlisted_caption_images else logging.INFO
    log.log(level, "%s + %s + %s: %s", captions, regions, region_captions, summary)
    return packed, summary
