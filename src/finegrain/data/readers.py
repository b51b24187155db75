"""Readers that turn dataset files into compact read-only sequences of :class:`Record` (map-style data).

Image paths in the returned records are relative to the dataset root. Text is read as UTF-8 (a leading
byte-order mark is accepted).

**Malformed records.** A file-level problem (unknown type, missing CSV column, not JSON, not a COCO
file) raises :class:`RecordError` naming the file. A malformed *record* (a CSV row, a COCO image with its
annotations, a JSONL line) is skipped: the sequence holds the good records and its ``failures`` lists
``(key, message)`` per skipped one, each message naming the file, the record (line or image id) and the
field. The training loop counts these against ``data.max_bad_fraction``. With ``strict=True`` the first
malformed record raises instead. JSONL is indexed, not parsed, when read (see
:class:`~finegrain.data.record_store.JsonlIndex`): its bad lines are found, skipped and counted when
used, or all up front with ``strict=True``.

Evaluation layouts: :func:`read_image_folder` (torchvision's ``root/<class>/<image>``, image labels),
:func:`read_karpathy` (Karpathy's COCO / Flickr30k split json) and :func:`read_caption_list` (the
``[{"image": ..., "caption": [...]}]`` lists of FineCLIP's and BLIP's retrieval files).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from ..errors import UTF16_TEXT, looks_utf16, non_utf8_text
from .record_store import JsonlIndex, PackedRecords, RecordSequence
from .records import Record, RecordError, Region, check_pixel_boxes, parse_record

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".tsv", ".json")


class Failures:
    """The malformed records of one file: ``items`` lists ``(key, message)``; ``strict`` raises the first."""

    def __init__(self, path: Path, strict: bool):
        self.path, self.strict = path, strict
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, message: str) -> None:
        if self.strict:
            raise RecordError(message)
        self.items.append((key, message))

    def region(self, message: str) -> str:
        """A malformed region, dropped from its record (``message`` goes into ``Record.bad_regions``);
        ``strict`` raises."""
        if self.strict:
            raise RecordError(message)
        return message

    def report(self) -> list[tuple[str, str]]:
        """Log a summary (count and first messages) and return ``items``."""
        if self.items:
            log.warning("%s: skipped %d malformed record(s); first: %s", self.path, len(self.items),
                        "; ".join(message for _, message in self.items[:3]))
        return self.items


def _utf8_error(path: Path) -> RecordError:
    """A one-line error naming the line and column of the first byte of ``path`` that is not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, problem = non_utf8_text(data, e)
        return RecordError(f"{path}:{line}: {problem}")
    return RecordError(f"{path}: not UTF-8 text")


def read_jsonl(path: str | Path, strict: bool = False) -> JsonlIndex:
    """Region-text JSONL (or plain ``{"image": ..., "caption": ...}`` lines), one record per non-blank
    line, keyed ``file:line``. Lines are parsed when accessed; ``strict=True`` parses them all now and
    raises at the first malformed one (or malformed region)."""
    index = JsonlIndex.build(path)
    if strict:
        for record in index:  # parsing each line raises at the first malformed one
            if record.bad_regions:
                raise RecordError(record.bad_regions[0])
    return index


def _csv_rows(path: Path, image_key: str, caption_key: str, sep: str, failures: Failures) -> Iterator[Record]:
    # undecodable bytes become lone surrogates, so one mis-encoded row is one malformed record
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            columns = next(reader, [])
            missing = [k for k in (image_key, caption_key) if k not in columns]
            if missing and looks_utf16(path.read_bytes()[:2]):
                raise RecordError(f"{path}: {UTF16_TEXT}")
            if missing:
                raise RecordError(f"{path}: no column {', '.join(repr(k) for k in missing)} "
                                  f"(columns found: {columns}; separator {sep!r})")
            end = reader.line_num
            for row in reader:
                start, end = end + 1, reader.line_num
                if not row:  # a blank line
                    continue
                lines = f"{start}-{end}" if end > start else f"{start}"
                key = f"{path}:{lines}"
                try:
                    if len(row) != len(columns):
                        raise RecordError(f"{key}: {len(row)} field(s) where the header has {len(columns)} "
                                          f"(a separator {sep!r} inside an unquoted caption? quote it)")
                    fields = dict(zip(columns, row))
                    image, caption = fields[image_key], fields[caption_key]
                    if end > start:
                        raise RecordError(f"{key}: a quoted field spans lines {lines} (an unterminated quote "
                                          "swallows the rows after it)")
                    if not caption.strip():
                        raise RecordError(f"{key}: field '{caption_key}' must be a non-empty caption")
                    for name, value in ((image_key, image), (caption_key, caption)):
                        try:
                            value.encode("utf-8")
                        except UnicodeEncodeError:
                            raise RecordError(f"{key}: field '{name}' is not UTF-8 text") from None
                    yield parse_record({"image": image, "caption": caption}, key)
                except RecordError as e:
                    failures.add(key, str(e))
        except csv.Error as e:  # e.g. an unterminated quote that makes a field past csv's size limit
            raise RecordError(f"{path}:{reader.line_num}: not readable as CSV ({e})") from None


def read_csv(path: str | Path, image_key: str = "filepath", caption_key: str = "title", sep: str = ",",
             strict: bool = False) -> PackedRecords:
    """open_clip's CSV convention: a header row, one ``image, caption`` pair per row, keyed ``file:line``.

    Malformed rows (skipped and counted): a row whose field count differs from the header's (e.g. an
    unquoted separator in a caption), a row spanning several lines (a line break inside quotes, most often
    an unterminated quote swallowing the rows after it: keyed ``file:first-last``), an empty caption."""
    path = Path(path)
    failures = Failures(path, strict)
    records = PackedRecords.pack(_csv_rows(path, image_key, caption_key, sep, failures), f"{path}:")
    records.failures = failures.report()
    return records


def _load_json(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8-sig") as f:
            return json.load(f)
    except UnicodeDecodeError:
        raise _utf8_error(path) from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _coco_list(path: Path, data: Any, name: str) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise RecordError(f"{path}: field '{name}' must be a list (is this a COCO annotation file?)")
    return data[name]


def coco_image_file(image: dict[str, Any]) -> str | None:
    """An image entry's file relative to the image root: ``file_name``, or for LVIS (no ``file_name``) the last
    two parts of ``coco_url`` (``val2017/000000397133.jpg``); None when neither is a non-empty string."""
    if isinstance(image.get("file_name"), str) and image["file_name"]:
        return image["file_name"]
    url = image.get("coco_url")
    return posixpath.join(*url.split("/")[-2:]) if isinstance(url, str) and url else None


class _Coco:
    """The images of a COCO file and their annotations, one record per image: an image whose entry or any
    of whose annotations is malformed is a malformed record (skipped, or raised when strict)."""

    def __init__(self, path: Path, data: Any, image_dir: str, failures: Failures):
        self.path, self.failures = path, failures
        self.images: dict[Any, dict[str, Any]] = {}
        self.bad: set[Any] = set()  # ids of images already reported
        for i, image in enumerate(_coco_list(path, data, "images")):
            if not isinstance(image, dict) or "id" not in image:
                failures.add(f"{path}: images[{i}]", f"{path}: images[{i}]: field 'id' is missing")
                continue
            key = f"{path}: image {image['id']}"
            if image["id"] in self.images or image["id"] in self.bad:
                failures.add(f"{key} (images[{i}])", f"{key}: field 'id' is duplicated (images[{i}])")
                continue
            file_name = coco_image_file(image)
            problem = None
            if not file_name:
                problem = "field 'file_name' (or LVIS's 'coco_url') must be a non-empty string"
            for name in ("width", "height"):
                if not isinstance(image.get(name), int) or image[name] <= 0:
                    problem = f"field '{name}' must be a positive integer, got {image.get(name)!r}"
            if problem:
                self.bad.add(image["id"])
                failures.add(key, f"{key}: {problem}")
                continue
            self.images[image["id"]] = {
                "image": posixpath.join(image_dir, file_name) if image_dir else file_name,
                "width": image["width"], "height": image["height"], "key": key}

    def annotations(self, data: Any) -> Iterator[tuple[dict[str, Any], dict[str, Any], str]]:
        """``(annotation, its image's fields, "<image key>: annotation <id>")`` for each annotation of a
        good image; an annotation that is not an object or names no known image is a failure."""
        for i, ann in enumerate(_coco_list(self.path, data, "annotations")):
            if not isinstance(ann, dict):
                self.failures.add(f"{self.path}: annotations[{i}]", f"{self.path}: annotations[{i}] must be an object")
                continue
            image_id = ann.get("image_id")
            if image_id in self.bad:
                continue
            if image_id not in self.images:
                key = f"{self.path}: annotation {ann.get('id', i)}"
                self.failures.add(key, f"{key}: field 'image_id' {image_id!r} is not in 'images'")
                continue
            image = self.images[image_id]
            yield ann, image, f"{image['key']}: annotation {ann.get('id', i)}"

    def reject(self, image: dict[str, Any], image_id: Any, message: str) -> None:
        """Drop a good image because of one of its annotations."""
        del self.images[image_id]
        self.bad.add(image_id)
        self.failures.add(image["key"], message)


def _caption_lists(coco: _Coco, data: Any) -> dict[Any, list[str]]:
    """The captions of each good image of ``coco`` (in file order); an image with a malformed caption
    annotation is rejected (its id leaves ``coco.images``)."""
    captions: dict[Any, list[str]] = {image_id: [] for image_id in coco.images}
    for ann, image, where in coco.annotations(data):
        caption = ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            coco.reject(image, ann["image_id"], f"{where}: field 'caption' must be a non-empty string")
            continue
        captions[ann["image_id"]].append(caption.strip())
    return captions


def _coco_captions(path: Path, data: Any, image_dir: str, failures: Failures) -> PackedRecords:
    coco = _Coco(path, data, image_dir, failures)
    captions = _caption_lists(coco, data)
    records = (Record(f["image"], tuple(captions[i]), (), f["width"], f["height"], key=f["key"])
               for i, f in coco.images.items())
    return PackedRecords.pack(records, f"{path}: ", failures.report())


def _coco_box(ann: dict[str, Any], where: str) -> tuple[float, float, float, float]:
    """COCO ``bbox`` ``[x, y, width, height]`` -> ``xyxy``; zero width or height is kept (dropped, and
    counted, by ``fit_boxes`` where boxes are used)."""
    bbox = ann.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        raise RecordError(f"{where}: field 'bbox' must be [x, y, width, height], got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise RecordError(f"{where}: field 'bbox' {bbox!r} has a NaN or infinite value")
    if w < 0 or h < 0:
        raise RecordError(f"{where}: field 'bbox' {bbox!r} has a negative width or height "
                          "(COCO boxes are [x, y, width, height])")
    return x, y, x + w, y + h


def _coco_instances(path: Path, data: Any, image_dir: str, failures: Failures) -> PackedRecords:
    coco = _Coco(path, data, image_dir, failures)
    categories = {c.get("id"): c.get("name") for c in _coco_list(path, data, "categories") if isinstance(c, dict)}
    regions: dict[Any, list[Region]] = {image_id: [] for image_id in coco.images}
    bad_regions: dict[Any, list[str]] = {image_id: [] for image_id in coco.images}
    for ann, image, where in coco.annotations(data):
        if ann.get("iscrowd", 0):
            continue
        try:
            label = categories.get(ann.get("category_id"))
            if not isinstance(label, str):
                raise RecordError(f"{where}: field 'category_id' {ann.get('category_id')!r} "
                                  f"has no named entry in 'categories'")
            mask = ann.get("segmentation") or None  # polygons or RLE (decoded where masks are used)
            regions[ann["image_id"]].append(Region(_coco_box(ann, where), label=label, mask=mask))
        except RecordError as e:  # a malformed annotation drops that region only
            bad_regions[ann["image_id"]].append(failures.region(str(e)))
    for image_id, image in list(coco.images.items()):
        try:
            check_pixel_boxes(regions[image_id], image["width"], image["height"], image["key"])
        except RecordError as e:
            coco.reject(image, image_id, str(e))
    records = (Record(f["image"], (), tuple(regions[i]), f["width"], f["height"], key=f["key"],
                      bad_regions=tuple(bad_regions[i])) for i, f in coco.images.items())
    return PackedRecords.pack(records, f"{path}: ", failures.report())


def read_coco_captions(path: str | Path, image_dir: str = "", strict: bool = False) -> PackedRecords:
    """COCO captions json -> one record per image holding all its captions (in file order), keyed
    ``"<file>: image <id>"``.

    ``image_dir`` (e.g. ``"train2017"``) is prefixed to ``file_name`` so paths are relative to the root.
    """
    path = Path(path)
    return _coco_captions(path, _load_json(path), image_dir, Failures(path, strict))


def read_coco_instances(path: str | Path, image_dir: str = "", strict: bool = False) -> PackedRecords:
    """COCO instances json -> one record per image whose regions are its boxes (``xywh`` -> ``xyxy``),
    labelled with the category name, without captions. Crowd annotations are skipped. A malformed
    annotation (e.g. a negative width) is a malformed region: dropped (``Record.bad_regions``), the image and
    its other boxes kept. Boxes partly or
    wholly outside the image, or of zero area, are kept: ``fit_boxes`` clips or drops them where they are
    used. Images without boxes keep an empty region list."""
    path = Path(path)
    return _coco_instances(path, _load_json(path), image_dir, Failures(path, strict))


def _folder_images(root: Path, classes: list[str], labels: Sequence[str]) -> Iterator[Record]:
    """The images of each class folder in torchvision's order: classes in ``classes`` order, files by a
    sorted walk of the folder (links followed), kept when their extension is an image one."""
    for name, label in zip(classes, labels, strict=True):
        for folder, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if has_file_allowed_extension(file, IMG_EXTENSIONS):
                    image = Path(folder, file).relative_to(root).as_posix()
                    yield Record(image, label=label, key=f"{root}/{image}")


def read_image_folder(root: str | Path, class_names: Sequence[str] | None = None) -> PackedRecords:
    """torchvision's ImageFolder layout ``root/<class>/**/<image>`` -> one record per image (path relative
    to ``root``, keyed by its full path) whose ``label`` is its class folder's name.

    Records come in the order of ``torchvision.datasets.ImageFolder``: class folders sorted by name (every
    sub-folder of ``root`` is a class, as there), images by a sorted walk of each, with torchvision's image
    extensions. ``class_names`` (one per class folder, in that sorted order) relabels the folders by
    position, as CLIP_benchmark does: ImageNet's ``n01440764`` ... ``n15075141`` folders are the 1000
    classes in index order, which open_clip's ``IMAGENET_CLASSNAMES`` follow.
    """
    root = Path(root)
    if not root.is_dir():
        raise RecordError(f"{root}: not a folder (an ImageFolder root holds one folder per class)")
    try:
        classes, _ = find_classes(root)
    except FileNotFoundError:
        raise RecordError(f"{root}: no class folders (the layout is root/<class>/<image>)") from None
    labels = classes if class_names is None else list(class_names)
    if len(labels) != len(classes):
        raise RecordError(f"{root}: {len(classes)} class folders ({', '.join(classes[:3])}, ...) but "
                          f"{len(labels)} class names; the names map the sorted folders by position")
    return PackedRecords.pack(_folder_images(root, classes, labels), f"{root}/")


def read_image_files(root: str | Path, passed_over: Counter | None = None) -> PackedRecords:
    """Every image under ``root`` (a sorted walk, links followed, torchvision's image extensions) -> one
    record per image, its path relative to ``root``, without captions (images to annotate). The other files
    are counted in ``passed_over`` by lower-case extension (``""``: none)."""
    root = Path(root)
    if not root.is_dir():
        raise RecordError(f"{root}: not a folder")

    def images() -> Iterator[Record]:
        for folder, _, files in sorted(os.walk(root, followlinks=True)):
            for file in sorted(files):
                if has_file_allowed_extension(file, IMG_EXTENSIONS):
                    yield Record(Path(folder, file).relative_to(root).as_posix(), key=str(Path(folder, file)))
                elif passed_over is not None:
                    passed_over[Path(file).suffix.lower()] += 1

    return PackedRecords.pack(images(), f"{root}/")


def _split_images(path: Path, images: list[Any], splits: set[str], failures: Failures) -> Iterator[Record]:
    """The records of the Karpathy ``images`` entries whose split is one of ``splits``."""
    for i, entry in enumerate(images):
        key = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("split"), str):
            failures.add(key, f"{key}: field 'split' must be a string (train, val, test or restval)")
            continue
        if entry["split"] not in splits:
            continue
        try:
            file_name, folder = entry.get("filename"), entry.get("filepath", "")
            if not isinstance(file_name, str) or not file_name:
                raise RecordError(f"{key}: field 'filename' must be a non-empty string")
            if not isinstance(folder, str):
                raise RecordError(f"{key}: field 'filepath' must be a string")
            sentences = entry.get("sentences")
            if not isinstance(sentences, list):
                raise RecordError(f"{key}: field 'sentences' must be a list")
            for j, sentence in enumerate(sentences):
                if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                    raise RecordError(f"{key}: field 'sentences[{j}].raw' must be a string")
            captions = tuple(s["raw"].strip() for s in sentences if s["raw"].strip())
            yield Record(posixpath.join(folder, file_name), captions, key=key)
        except RecordError as e:
            failures.add(key, str(e))


def read_karpathy(path: str | Path, split: str = "test", strict: bool = False) -> PackedRecords:
    """Karpathy's split json (``dataset_coco.json``, ``dataset_flickr30k.json``): ``{"images": [{"filepath",
    "filename", "split", "sentences": [{"raw": ...}, ...]}, ...]}`` -> one record per image of ``split``
    with its sentences as captions, keyed ``"<file>: images[<i>]"``. The image path is ``filepath/filename``
    (COCO: ``val2014/COCO_val2014_....jpg``, relative to the COCO folder; Flickr30k has no ``filepath``).

    ``split``: ``test`` (COCO 5k, Flickr30k 1k), ``val``, ``train``, ``restval``, or several joined by
    ``+`` (``train+restval``). Malformed entries of the split are skipped and counted (see the module doc).
    """
    path = Path(path)
    data, failures = _load_json(path), Failures(path, strict)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise RecordError(f"{path}: field 'images' must be a list (is this a Karpathy split file?)")
    splits = set(split.split("+"))
    found = {e["split"] for e in data["images"] if isinstance(e, dict) and isinstance(e.get("split"), str)}
    if not splits <= found:
        raise RecordError(f"{path}: no image of split {sorted(splits - found)}; the splits found are {sorted(found)}")
    records = PackedRecords.pack(_split_images(path, data["images"], splits, failures), f"{path}: ")
    records.failures = failures.report()
    return records


def _caption_entries(path: Path, data: Any, failures: Failures) -> PackedRecords:
    """The entries of a caption list, merged per image (in order of first appearance)."""
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of {{'image', 'caption'}} entries, "
                          f"got {type(data).__name__}")
    merged: dict[str, Record] = {}
    for i, entry in enumerate(data):
        key = f"{path}: [{i}]"
        try:
            if not isinstance(entry, dict):
                raise RecordError(f"{key}: must be an object with 'image' and 'caption', "
                                  f"got {type(entry).__name__}")
            caption = entry.get("caption")
            if isinstance(caption, list):
                if not all(isinstance(c, str) for c in caption):
                    raise RecordError(f"{key}: field 'caption' must be a string or a list of strings")
                entry = {k: v for k, v in entry.items() if k != "caption"} | {"captions": caption}
            record = parse_record(entry, key)
        except RecordError as e:
            failures.add(key, str(e))
            continue
        first = merged.get(record.image)
        merged[record.image] = record if first is None else Record(
            first.image, first.captions + record.captions, first.regions + record.regions, first.width,
            first.height, first.label, first.key, first.source, first.bad_regions + record.bad_regions)
    return PackedRecords.pack(merged.values(), f"{path}: ", failures.report())


def read_caption_list(path: str | Path, strict: bool = False) -> PackedRecords:
    """A JSON list of ``{"image": path, "caption": str | [str, ...]}`` (FineCLIP's ``coco_test.json`` /
    ``flickr30k_test.json``, BLIP's and CLIP_benchmark's caption files; region-text fields are read too)
    -> one record per image, keyed ``"<file>: [<i>]"``. Entries that name an image again add their captions
    (and regions) to its record: BLIP's training files hold one caption per entry."""
    path = Path(path)
    return _caption_entries(path, _load_json(path), Failures(path, strict))


def read_records(path: str | Path, strict: bool = False) -> RecordSequence:
    """Read any supported file, chosen by suffix: ``.jsonl`` region-text, ``.csv``/``.tsv`` (tab)
    open_clip CSV; ``.json`` by its shape: a list is a caption list (:func:`read_caption_list`), else COCO
    captions (annotations with a ``caption``) or COCO instances. A Karpathy split file is refused: its
    split must be chosen (:func:`read_karpathy`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path, strict)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, sep="\t" if suffix == ".tsv" else ",", strict=strict)
    if suffix == ".json":
        data = _load_json(path)
        failures = Failures(path, strict)
        if isinstance(data, list):
            return _caption_entries(path, data, failures)
        if (isinstance(data, dict) and "annotations" not in data and isinstance(data.get("images"), list)
                and any(isinstance(e, dict) and "sentences" in e for e in data["images"][:1])):
            raise RecordError(f"{path}: a Karpathy split file; choose its split: karpathy:{path}@test "
                              "(or @val, @train, @restval, @train+restval)")
        annotations = _coco_list(path, data, "annotations")
        if any(isinstance(a, dict) and "caption" in a for a in annotations[:1]):
            return _coco_captions(path, data, "", failures)
        return _coco_instances(path, data, "", failures)
    raise RecordError(f"{path}: unknown dataset file type {suffix or '(no suffix)'!r}; "
                      f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
