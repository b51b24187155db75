"""Readers that turn dataset files into lists of :class:`Record` (map-style data).

Image paths in the returned records are relative to the dataset root. Every reader raises
:class:`RecordError` on the first malformed record, naming the file, the record (line or image id)
and the field: a malformed annotation file is a bug to fix before training, not noise to skip.
"""

from __future__ import annotations

import csv
import json
import logging
import posixpath
from pathlib import Path
from typing import Any

from finegrain.data.records import Record, RecordError, Region, iter_jsonl, parse_record

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".tsv", ".json")


def read_jsonl(path: str | Path) -> list[Record]:
    """Region-text JSONL (or plain ``{"image": ..., "caption": ...}`` lines), one record per line."""
    return [parse_record(obj, key) for key, obj in iter_jsonl(path)]


def read_csv(path: str | Path, image_key: str = "filepath", caption_key: str = "title",
             sep: str = ",") -> list[Record]:
    """open_clip's CSV convention: a header row, one ``image, caption`` pair per row."""
    path = Path(path)
    with path.open("r", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        columns = reader.fieldnames or []
        missing = [k for k in (image_key, caption_key) if k not in columns]
        if missing:
            raise RecordError(f"{path}: no column {', '.join(repr(k) for k in missing)} "
                              f"(columns found: {columns}; separator {sep!r})")
        records = []
        for row in reader:
            key = f"{path}:{reader.line_num}"
            caption = row[caption_key]
            if caption is None or not caption.strip():
                raise RecordError(f"{key}: field '{caption_key}' must be a non-empty caption")
            records.append(parse_record({"image": row[image_key], "caption": caption}, key))
    return records


def _load_json(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _coco_list(path: Path, data: Any, name: str) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise RecordError(f"{path}: field '{name}' must be a list (is this a COCO annotation file?)")
    return data[name]


def _coco_images(path: Path, data: Any, image_dir: str) -> dict[Any, dict[str, Any]]:
    """COCO ``images`` -> ``{image id: record fields}``, validated."""
    images: dict[Any, dict[str, Any]] = {}
    for i, image in enumerate(_coco_list(path, data, "images")):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict) or "id" not in image:
            raise RecordError(f"{where}: field 'id' is missing")
        key = f"{path}: image {image['id']}"
        if image["id"] in images:
            raise RecordError(f"{key}: field 'id' is duplicated")
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise RecordError(f"{key}: field 'file_name' must be a non-empty string")
        for name in ("width", "height"):
            if not isinstance(image.get(name), int) or image[name] <= 0:
                raise RecordError(f"{key}: field '{name}' must be a positive integer, got {image.get(name)!r}")
        images[image["id"]] = {"image": posixpath.join(image_dir, file_name) if image_dir else file_name,
                               "width": image["width"], "height": image["height"], "key": key}
    return images


def _annotation_image(path: Path, i: int, ann: Any, images: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if not isinstance(ann, dict):
        raise RecordError(f"{path}: annotations[{i}] must be an object")
    if ann.get("image_id") not in images:
        raise RecordError(f"{path}: annotation {ann.get('id', i)}: field 'image_id' "
                          f"{ann.get('image_id')!r} is not in 'images'")
    return images[ann["image_id"]]


def _coco_captions(path: Path, data: Any, image_dir: str) -> list[Record]:
    images = _coco_images(path, data, image_dir)
    captions: dict[Any, list[str]] = {image_id: [] for image_id in images}
    for i, ann in enumerate(_coco_list(path, data, "annotations")):
        image = _annotation_image(path, i, ann, images)
        caption = ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise RecordError(f"{image['key']}: annotation {ann.get('id', i)}: field 'caption' "
                              f"must be a non-empty string")
        captions[ann["image_id"]].append(caption.strip())
    return [Record(f["image"], tuple(captions[i]), (), f["width"], f["height"], key=f["key"])
            for i, f in images.items()]


def _coco_instances(path: Path, data: Any, image_dir: str) -> list[Record]:
    images = _coco_images(path, data, image_dir)
    categories = {c.get("id"): c.get("name") for c in _coco_list(path, data, "categories")
                  if isinstance(c, dict)}
    regions: dict[Any, list[Region]] = {image_id: [] for image_id in images}
    dropped = 0
    for i, ann in enumerate(_coco_list(path, data, "annotations")):
        image = _annotation_image(path, i, ann, images)
        where = f"{image['key']}: annotation {ann.get('id', i)}"
        if ann.get("iscrowd", 0):
            continue
        label = categories.get(ann.get("category_id"))
        if not isinstance(label, str):
            raise RecordError(f"{where}: field 'category_id' {ann.get('category_id')!r} "
                              f"has no named entry in 'categories'")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) for v in bbox)):
            raise RecordError(f"{where}: field 'bbox' must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            dropped += 1
            continue
        width, height = image["width"], image["height"]
        if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:  # 1 px tolerance, as parse_region
            raise RecordError(f"{where}: field 'bbox' {bbox!r} (xywh) lies outside the "
                              f"{width}x{height} image")
        regions[ann["image_id"]].append(Region((x, y, x + w, y + h), label=label))
    if dropped:
        log.warning("%s: dropped %d annotation(s) whose bbox has zero area", path, dropped)
    return [Record(f["image"], (), tuple(regions[i]), f["width"], f["height"], key=f["key"])
            for i, f in images.items()]


def read_coco_captions(path: str | Path, image_dir: str = "") -> list[Record]:
    """COCO captions json -> one record per image holding all its captions (in file order).

    ``image_dir`` (e.g. ``"train2017"``) is prefixed to ``file_name`` so paths are relative to the root.
    """
    path = Path(path)
    return _coco_captions(path, _load_json(path), image_dir)


def read_coco_instances(path: str | Path, image_dir: str = "") -> list[Record]:
    """COCO instances json -> one record per image whose regions are its boxes (``xywh`` -> ``xyxy``),
    labelled with the category name, without captions. Crowd annotations are skipped; zero-area boxes
    are dropped and their number logged as a warning. Images without boxes keep an empty region list."""
    path = Path(path)
    return _coco_instances(path, _load_json(path), image_dir)


def read_records(path: str | Path) -> list[Record]:
    """Read any supported file, chosen by suffix: ``.jsonl`` region-text, ``.csv``/``.tsv`` (tab)
    open_clip CSV, ``.json`` COCO captions (annotations with a ``caption``) or else COCO instances."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    if suffix == ".json":
        data = _load_json(path)
        annotations = _coco_list(path, data, "annotations")
        if any(isinstance(a, dict) and "caption" in a for a in annotations[:1]):
            return _coco_captions(path, data, "")
        return _coco_instances(path, data, "")
    raise RecordError(f"{path}: unknown dataset file type {suffix or '(no suffix)'!r}; "
                      f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
