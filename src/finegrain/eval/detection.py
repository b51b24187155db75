"""COCO-style detection and instance-segmentation metrics by pycocotools, with class groups (the base and
novel classes of open-vocabulary detection).

Detections are COCO result records (what a detector writes as ``detections.json``)::

    {"image_id": 397133, "category_id": 44, "bbox": [x, y, w, h], "score": 0.93}      # + "segmentation" (RLE)

:func:`detection_metrics` returns, in percent: ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``
(pycocotools' summary at the largest ``max_dets``) and, per class group, ``AP50_<group>``: the mean over the
group's classes of each class's AP at IoU 0.5 (all areas, largest ``max_dets``), classes without ground truth
left out (NaN when none of the group has any). ``AP50_all`` is that mean over every evaluated class. This is the OV-COCO rule of the F-ViT release
(CLIPSelf / FineCLIP): ``max_dets`` 100 / 300 / 1000 (mmdetection's), novel / base / all AP50 as means of
per-class AP50. The standard split ships as ``ov-coco-base`` (48 classes) and ``ov-coco-novel`` (17).

:func:`lvis_metrics` scores LVIS v1 (OV-LVIS: the rare classes are the novel ones) by the ``lvis`` package (the
``finetune`` extra), which honours each image's ``neg_category_ids`` and ``not_exhaustive_category_ids``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finegrain.data.dense import decode_mask
from finegrain.data.readers import _load_json, coco_image_file
from finegrain.data.records import Record, RecordError, fit_boxes
from finegrain.errors import DataError

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm")
LVIS_NAMES = {"AP": "map", "APr": "map_r", "APc": "map_c", "APf": "map_f", "AP50": "ap50"}
OV_COCO_GROUPS = {"novel": "ov-coco-novel", "base": "ov-coco-base"}
SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def load_coco(annotations: str | dict) -> COCO:
    """A pycocotools ``COCO`` index of an instances json (path or loaded dict), without its prints; a file is
    read as finegrain's readers read it (a leading byte-order mark accepted, invalid JSON named)."""
    if isinstance(annotations, str):
        annotations = _load_json(Path(annotations))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = annotations
        coco.createIndex()
    return coco


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Binary ``(N, H, W)`` masks as COCO RLEs with JSON-ready string ``counts``."""
    if not len(masks):
        return []
    rles = mask_utils.encode(np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0)))
    return [{"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def coco_from_records(records: Sequence[Record], class_names: Sequence[str], sizes: Sequence[tuple[int, int]],
                      masks: bool = False) -> tuple[dict, list[str]]:
    """A COCO instances dict of ``records``' regions labelled with one of ``class_names`` (image ids 1.., in
    record order; category ids 1.., in ``class_names`` order), for scoring data that has no COCO json (the demo,
    JSONL records). ``sizes`` are the images' ``(width, height)``. Boxes are fitted to the image as in training
    (clipped; dropped without area). With ``masks`` each annotation carries its region's mask as RLE; a region
    whose mask does not decode is left out. Returns the dict and the messages of the regions left out."""
    index = {name: i + 1 for i, name in enumerate(class_names)}
    images, annotations, left_out = [], [], []
    for image_id, (record, (width, height)) in enumerate(zip(records, sizes), start=1):
        key = record.key or record.image
        images.append({"id": image_id, "file_name": record.image, "width": width, "height": height})
        listed = tuple(r for r in record.regions if r.label in index)
        for i, region in enumerate(fit_boxes(listed, width, height, key)[0]):
            x0, y0, x1, y1 = region.box
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": index[region.label],
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
            if masks:
                try:
                    pixels = decode_mask(region.mask, width, height, f"{key}: regions[{i}]") if region.mask else None
                    if pixels is None:
                        raise RecordError(f"{key}: regions[{i}]: field 'mask' is missing")
                except RecordError as e:
                    left_out.append(str(e))
                    continue
                ann["segmentation"], ann["area"] = encode_masks(pixels[None])[0], float(pixels.sum())
            annotations.append(ann)
    categories = [{"id": i, "name": name} for name, i in index.items()]
    return {"images": images, "annotations": annotations, "categories": categories}, left_out


def is_xywh(box) -> bool:
    """Whether ``box`` is a COCO box: four finite numbers ``[x, y, width, height]`` with width, height >= 0."""
    return (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                            for v in box) and box[2] >= 0 and box[3] >= 0)


def check_ground_truth_file(path: str | Path, class_names: Sequence[str], masks: bool = False,
                            lvis: bool = False) -> dict | None:
    """:func:`check_ground_truth` of ``path`` when it is a json file, returning its content (None otherwise:
    held-out records without one build their ground truth from their own checked regions)."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        data = _load_json(path)
        check_ground_truth(data, str(path), class_names, masks, lvis)
        return data
    return None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _outside(start: float, length: float, size: int) -> bool:
    """Whether ``[start, start + length]`` misses ``[0, size]`` (shares no length with it; a point: lies off it)."""
    return min(start + length, size) <= max(start, 0) if length > 0 else not 0 <= start <= size


def _entries(data: dict, path: str, key: str) -> list[dict]:
    bad = next((i for i, entry in enumerate(data[key]) if not isinstance(entry, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: {key}[{bad}] must be an object, got {type(data[key][bad]).__name__}")
    return data[key]


def _check_categories(data: dict, path: str, lvis: bool) -> set:
    """The category ids; ``DataError`` for a category without a name, or with an id or name already used."""
    ids: dict = {}
    names: dict = {}
    for i, category in enumerate(_entries(data, path, "categories")):
        where = f"{path}: categories[{i}] (id {category.get('id')!r})"
        name = category.get("name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: field 'name' must be a non-empty string, got {name!r}")
        if category.get("id") in ids:
            raise DataError(f"{where}: field 'id' is also categories[{ids[category.get('id')]}]'s")
        if name in names:
            raise DataError(f"{where}: field 'name' {name!r} is also categories[{names[name]}]'s (classes are "
                            "matched by name)")
        if lvis and category.get("frequency") not in ("r", "c", "f"):
            raise DataError(f"{where}: field 'frequency' must be 'r', 'c' or 'f' (LVIS's rare / common / frequent "
                            f"groups), got {category.get('frequency')!r}")
        ids[category.get("id")], names[name] = i, i
    return set(ids)


def _check_images(data: dict, path: str, lvis: bool) -> dict:
    """Image id -> image; ``DataError`` for an image without a positive integer id (or one already used), a file
    or a size, and for LVIS without its lists of negative and not-exhaustive categories."""
    images: dict = {}
    for i, image in enumerate(_entries(data, path, "images")):
        where = f"{path}: images[{i}] (id {image.get('id')!r})"
        if not _positive_int(image.get("id")):
            raise DataError(f"{where}: field 'id' must be a positive integer")
        if image["id"] in images:
            raise DataError(f"{where}: field 'id' is duplicated (pycocotools would keep one of the two images)")
        if not coco_image_file(image):
            raise DataError(f"{where}: field 'file_name' (or LVIS's 'coco_url') must be a non-empty string")
        for name in ("width", "height"):
            if not _positive_int(image.get(name)):
                raise DataError(f"{where}: field '{name}' must be a positive integer, got {image.get(name)!r}")
        lists = ("neg_category_ids", "not_exhaustive_category_ids") if lvis else ()
        missing = [name for name in lists if not isinstance(image.get(name), list)]
        if missing:
            raise DataError(f"{where}: field '{missing[0]}' must be a list (the lvis package reads it for every "
                            "image; [] when there is none)")
        images[image["id"]] = image
    return images


def check_ground_truth(data: dict, path: str, class_names: Sequence[str], masks: bool = False,
                       lvis: bool = False) -> None:
    """Raise ``DataError`` naming ``path``, the entry and the field when a COCO / LVIS instances dict cannot
    be scored as it is (checked before training, where pycocotools or lvis would fail, or score wrongly, after it):

    - ``class_names`` missing from its categories; a category without a name, or whose id or name is another's;
      with ``lvis`` one without a ``frequency`` of ``r`` / ``c`` / ``f``;
    - an image without a positive integer id (or with another's), a file name (``file_name`` or LVIS's
      ``coco_url``) or a positive width and height; with ``lvis`` one without ``neg_category_ids`` and
      ``not_exhaustive_category_ids``;
    - an annotation without a positive integer id (the libraries take 0 for "unmatched": its matches would count
      as false positives) or with another's (pycocotools would score one of the two twice), of an unknown image or
      category, whose box is not ``[x, y, w, h]`` with ``w, h >= 0`` or lies wholly outside its image, without
      a numeric ``area``, without an ``iscrowd`` of 0 or 1 (pycocotools; not ``lvis``); with ``masks`` a
      segmentation that is empty, a polygon of fewer than 3 points, or an RLE that does not cover its image.

    Boxes without area are kept (pycocotools scores them as misses no detection can match) and said once."""
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(f"{path}: field(s) {missing} missing or not lists (a COCO instances json has images, "
                        "annotations and categories)")
    categories = _check_categories(data, path, lvis)
    names = {c["name"] for c in data["categories"]}
    missing = [name for name in class_names if name not in names]
    if missing:
        raise DataError(f"{path}: classes {missing[:5]} are not among its {len(names)} categories (the class list "
                        f"must name the json's categories)")
    images = _check_images(data, path, lvis)
    ids: dict = {}
    no_area = []
    for i, ann in enumerate(_entries(data, path, "annotations")):
        where = f"{path}: annotations[{i}] (id {ann.get('id')!r})"
        if not _positive_int(ann.get("id")):
            raise ValueError(f"{where}: field 'id' must be a positive integer (pycocotools and lvis take an id of "
                             "0 for 'unmatched')")
        if ann["id"] in ids:
            raise ValueError(f"{where}: field 'id' is also annotations[{ids[ann['id']]}]'s (pycocotools indexes "
                             "annotations by id: it would score one of them twice and the other never)")
        ids[ann["id"]] = i
        if ann.get("image_id") not in images:
            raise DataError(f"{where}: field 'image_id' {ann.get('image_id')!r} is not an image of the json")
        if ann.get("category_id") not in categories:
            raise DataError(f"{where}: field 'category_id' {ann.get('category_id')!r} is not a category of the json")
        box = ann.get("bbox")
        if not is_xywh(box):
            raise DataError(f"{where}: field 'bbox' must be [x, y, width, height] with width, height >= 0, got "
                            f"{box!r}")
        image = images[ann["image_id"]]
        x, y, w, h = box
        if _outside(x, w, image["width"]) or _outside(y, h, image["height"]):
            raise DataError(f"{where}: field 'bbox' {box!r} lies wholly outside its {image['width']}x"
                            f"{image['height']} image (images[] 'width' / 'height', or the box's frame, is wrong): "
                            "no detection could match it")
        if w == 0 or h == 0:
            no_area.append(where)
        area = ann.get("area")
        if not isinstance(area, (int, float)) or isinstance(area, bool) or not math.isfinite(area) or area < 0:
            raise DataError(f"{where}: field 'area' must be a number >= 0 (pycocotools and lvis sort the ground "
                            f"truth into small / medium / large by it), got {area!r}")
        if not lvis and ann.get("iscrowd") not in (0, 1):
            raise DataError(f"{where}: field 'iscrowd' must be 0 or 1 (pycocotools reads it for every annotation), "
                            f"got {ann.get('iscrowd')!r}")
        if masks:
            segmentation = ann.get("segmentation")
            if not segmentation:
                raise DataError(f"{where}: field 'segmentation' is empty or missing: mask AP needs a mask per "
                                "annotation (method.masks=false scores boxes only)")
            try:
                decode_mask(segmentation, image["width"], image["height"], where)
            except RecordError as e:
                raise DataError(str(e)) from None
    if no_area:
        log.warning("%s: %d annotation(s) have a box without area; pycocotools scores them as misses that no "
                    "detection can match; first: %s", path, len(no_area), "; ".join(no_area[:3]))


def check_detections(detections: Sequence[dict], ground_truth: COCO, iou_type: str) -> None:
    """Raise ``ValueError`` naming the first detection whose image, category, box, mask or score is unusable."""
    images, categories = set(ground_truth.getImgIds()), set(ground_truth.getCatIds())
    for i, det in enumerate(detections):
        where = f"detection {i}"
        missing = [k for k in ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
                   if k not in det]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        if det["image_id"] not in images:
            raise ValueError(f"{where}: image_id {det['image_id']!r} is not an image of the ground truth")
        if det["category_id"] not in categories:
            raise ValueError(f"{where}: category_id {det['category_id']!r} is not a category of the ground truth")
        if not isinstance(det["score"], (int, float)) or not math.isfinite(det["score"]):
            raise ValueError(f"{where}: score must be a finite number, got {det['score']!r}")
        if iou_type == "bbox" and not is_xywh(det["bbox"]):
            raise ValueError(f"{where}: bbox must be [x, y, width, height] with width, height >= 0, got "
                             f"{det['bbox']!r}")


def detection_metrics(ground_truth: COCO, detections: Sequence[dict], iou_type: str = "bbox",
                      max_dets: Sequence[int] = (100, 300, 1000),
                      groups: Mapping[str, Sequence[str]] | None = None,
                      image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO metrics of ``detections`` against ``ground_truth`` over its categories, in percent.

    ``groups`` maps a group name to category names (e.g. :data:`OV_COCO_GROUPS` loaded with
    ``load_class_names``); each group's names must be categories of the ground truth. ``image_ids``: the images
    scored (default all of the ground truth's; held-out images that could not be read are left out, not counted
    as misses). A value without ground truth to score is NaN (pycocotools' -1). No detection at all gives 0.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    check_detections(detections, ground_truth, iou_type)
    category_ids = sorted(ground_truth.getCatIds())
    names = {c["id"]: c["name"] for c in ground_truth.loadCats(category_ids)}
    group_ids = {}
    for group, members in (groups or {}).items():
        by_name = {name: cid for cid, name in names.items()}
        unknown = sorted(set(members) - set(by_name))
        if unknown:
            raise DataError(f"class group {group!r}: {unknown[:5]} are not categories of the ground truth")
        group_ids[group] = [by_name[name] for name in members]
    if not detections:
        return {**dict.fromkeys(SUMMARY_NAMES, 0.0), "AP50_all": 0.0, **{f"AP50_{g}": 0.0 for g in group_ids}}

    results = [dict(det) for det in detections]
    if iou_type == "segm":  # the mask's own area decides small / medium / large, not a box that came with it
        for det in results:
            det.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iou_type)
        evaluator.params.maxDets = list(max_dets)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics = {name: computed(v) for name, v in zip(SUMMARY_NAMES, evaluator.stats)}
    per_class_ap50 = class_ap50(evaluator, category_ids)
    metrics["AP50_all"] = _mean(per_class_ap50.values())
    for group, ids in group_ids.items():
        metrics[f"AP50_{group}"] = _mean(per_class_ap50[cid] for cid in ids)
    return metrics


def computed(value: float) -> float:
    """A pycocotools / lvis summary value in percent; their -1 (nothing to score: no ground truth in that area
    range or those classes) becomes NaN, not a 0 that would read as a miss."""
    value = float(value)
    return math.nan if value < 0 else 100.0 * value


def class_ap50(evaluator: COCOeval, category_ids: Sequence[int]) -> dict[int, float]:
    """Each category's AP at IoU 0.5 over all areas at the largest ``maxDets`` (percent; NaN without ground
    truth), from an accumulated ``COCOeval``."""
    precision = evaluator.eval["precision"]  # (iou, recall, category, area, max dets)
    out = {}
    for k, cid in enumerate(evaluator.params.catIds):
        p = precision[0, :, k, 0, -1]
        p = p[p > -1]
        out[cid] = 100.0 * float(np.mean(p)) if p.size else math.nan
    return {cid: out[cid] for cid in category_ids}


def _mean(values) -> float:
    """Mean of the non-NaN values; NaN when there is none (no class of the group has ground truth)."""
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


@contextlib.contextmanager
def numpy_float_alias():
    """``numpy.float`` (removed in numpy 1.24) as ``float`` while the block runs: the last ``lvis`` release
    (0.5.3) still calls ``astype(np.float)`` when accumulating. Removed again on exit; a no-op where it exists."""
    if hasattr(np, "float"):
        yield
        return
    np.float = float
    try:
        yield
    finally:
        del np.float


def lvis_metrics(ground_truth: str, detections: Sequence[dict], iou_type: str = "bbox",
                 max_dets: int = 300, image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """LVIS v1 metrics of ``detections`` (COCO result records) against the LVIS json ``ground_truth``, in percent:
    ``map``, ``map_r`` / ``map_c`` / ``map_f`` (rare / common / frequent classes), ``ap50``; ``max_dets`` per
    image (LVIS's 300). A detection of a class neither verified present nor in the image's
    ``neg_category_ids`` is not counted as a false positive (the ``lvis`` package's rule). ``image_ids``: the
    images scored (default all)."""
    try:
        from lvis import LVIS, LVISEval, LVISResults
    except ImportError as e:
        raise ImportError(f"OV-LVIS evaluation needs the lvis package ({e}): pip install 'finegrain[finetune]'") from e
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    gt = _lvis_index(LVIS, ground_truth)
    check_detections(detections, load_coco(gt.dataset), iou_type)
    if not detections:
        return dict.fromkeys(LVIS_NAMES.values(), 0.0)
    with contextlib.redirect_stdout(io.StringIO()), numpy_float_alias():
        evaluator = LVISEval(gt, LVISResults(gt, [dict(d) for d in detections], max_dets=max_dets), iou_type)
        if image_ids is not None:
            evaluator.params.img_ids = sorted(image_ids)
        evaluator.run()
    results = evaluator.get_results()
    return {name: computed(results[key]) for key, name in LVIS_NAMES.items()}


def _lvis_index(lvis_class, path: str):
    """The ``lvis`` package's index of the json ``path``, read as finegrain's readers read it (a leading byte-order
    mark accepted, invalid JSON named)."""

    class Index(lvis_class):
        def _load_json(self, _path):
            return _load_json(Path(path))

    return Index(path)
