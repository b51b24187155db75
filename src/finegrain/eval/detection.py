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
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finegrain.data.dense import decode_mask
from finegrain.data.readers import _load_json
from finegrain.data.records import Record, RecordError, fit_boxes
from finegrain.errors import DataError

IOU_TYPES = ("bbox", "segm")
LVIS_NAMES = {"AP": "map", "APr": "map_r", "APc": "map_c", "APf": "map_f", "AP50": "ap50"}
OV_COCO_GROUPS = {"novel": "ov-coco-novel", "base": "ov-coco-base"}
SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def load_coco(annotations: str | dict) -> COCO:
    """A pycocotools ``COCO`` index of an instances json (path or loaded dict), without its prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(annotations if isinstance(annotations, str) else None)
        if not isinstance(annotations, str):
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


def check_ground_truth_file(path: str | Path, class_names: Sequence[str], masks: bool = False) -> None:
    """:func:`check_ground_truth` of ``path`` when it is a json file (held-out records without one build their
    ground truth from their own checked regions)."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        check_ground_truth(_load_json(path), str(path), class_names, masks)


def check_ground_truth(data: dict, path: str, class_names: Sequence[str], masks: bool = False) -> None:
    """Raise a ``DataError`` naming ``path``, the annotation and the field when a COCO / LVIS instances dict cannot
    be scored (checked before training, where pycocotools would fail after it): ``class_names`` missing from its
    categories, an annotation of an unknown image or category, a box that is not ``[x, y, w, h]`` with ``w, h >=
    0``, and with ``masks`` a segmentation that is empty, a polygon of fewer than 3 points, or an RLE that does not
    cover its image."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with images, annotations and categories (a COCO "
                        f"instances json), got {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise DataError(f"{path}: field(s) {missing} missing or not lists (a COCO instances json has images, "
                        "annotations and categories)")
    names = {c.get("name") for c in data["categories"]}
    missing = [name for name in class_names if name not in names]
    if missing:
        raise DataError(f"{path}: classes {missing[:5]} are not among its {len(names)} categories (the class list "
                        f"must name the json's categories)")
    images = {image.get("id"): image for image in data["images"]}
    categories = {c.get("id") for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {ann.get('id')!r})"
        if ann.get("image_id") not in images:
            raise DataError(f"{where}: field 'image_id' {ann.get('image_id')!r} is not an image of the json")
        if ann.get("category_id") not in categories:
            raise DataError(f"{where}: field 'category_id' {ann.get('category_id')!r} is not a category of the json")
        if not is_xywh(ann.get("bbox")):
            raise DataError(f"{where}: field 'bbox' must be [x, y, width, height] with width, height >= 0, got "
                            f"{ann.get('bbox')!r}")
        if masks:
            image = images[ann["image_id"]]
            segmentation = ann.get("segmentation")
            if not segmentation:
                raise DataError(f"{where}: field 'segmentation' is empty or missing: mask AP needs a mask per "
                                "annotation (method.masks=false scores boxes only)")
            try:
                decode_mask(segmentation, image.get("width"), image.get("height"), where)
            except RecordError as e:
                raise DataError(str(e)) from None


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
    gt = LVIS(ground_truth)
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
