"""Region proposers: boxes a dataset already has, a torchvision detector or its RPN, ultralytics YOLO / FastSAM.

Each returns RAW proposals (see :class:`~finegrain.annotate.base.Proposer`): boxes in pixels of the image it
was given, with the model's confidence and class name where it has them; the pipeline's
:class:`~finegrain.annotate.base.ProposalFilter` clips and thresholds them. A detector's own score threshold is
set low, to :data:`DETECTOR_MIN_SCORE` (0.001, as in COCO mAP evaluation; ultralytics: its ``conf``), so it
hides no box a filter with ``min_score >= 0.001`` would keep; its own NMS and per-image cap stay as the model
defines them (they are part of what its boxes are).

FineCLIP compares four proposal sources on COCO (manual boxes, FastSAM, an RPN, YOLOv9) and annotates
CC2.5M with YOLOv9 boxes; ``build_proposer`` names them ``gt``, ``fastsam``, ``torchvision`` with
``rpn=True``, and ``yolo``.
"""

from __future__ import annotations

import inspect
import math
import os
import posixpath
import urllib.error
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from ..data.coco_panoptic import _field, _images
from ..data.readers import _coco_box, _coco_list, _load_json
from ..data.records import Record, RecordError
from ..errors import DataError
from ..models.factory import PretrainedWeightsUnavailable, network_unavailable
from .base import Proposal, Proposer

# A detector's own score threshold. 0 would keep every class of every box (a softmax is never 0) and makes
# torchvision's per-class NMS about 3x slower (H100, random-weight Faster R-CNN v2: 17 vs 53 images/s).
DETECTOR_MIN_SCORE = 0.001


class _ImageBoxes(NamedTuple):
    """The boxes of one image, compactly: ``values`` ``(N, 5)`` float64 ``x0, y0, x1, y1, score`` (score NaN:
    none) and one label per box."""

    values: np.ndarray
    labels: tuple[str, ...]


class GroundTruthProposer:
    """Boxes a dataset already has. ``boxes=None``: each record's own regions (e.g. the labelled boxes of records
    read from a COCO instances json). ``boxes=PATH``: a COCO instances json (``bbox`` ``[x, y, w, h]``, the
    category name as label, an optional per-annotation ``score``) or a COCO panoptic json (each segment's
    ``segments_info`` ``bbox``, things and stuff alike; no PNG is read), told apart by whether its annotations
    hold ``segments_info``. Crowd annotations and segments (``iscrowd`` 1) are skipped.

    A record matches a json image when ``posixpath.join(image_dir, file_name)`` equals its ``image`` (both
    normalised); an image the json does not name gets no proposals. The json is parsed once, here; a
    malformed entry raises a ``DataError`` naming the file, the entry and the field.
    """

    def __init__(self, boxes: str | Path | None = None, image_dir: str = ""):
        self.path, self.image_dir = boxes, image_dir
        self.boxes = None if boxes is None else _read_box_json(Path(boxes), image_dir)

    def describe(self) -> str:
        if self.path is None:
            return "gt:record regions"
        return f"gt:{self.path}" + (f" image_dir={self.image_dir}" if self.image_dir else "")

    def propose(self, images: Sequence[Image.Image], records: Sequence[Record]) -> list[list[Proposal]]:
        if self.boxes is None:
            return [[Proposal(r.box, r.score, r.label) for r in record.regions] for record in records]
        out = []
        for record in records:
            found = self.boxes.get(posixpath.normpath(record.image))
            out.append([] if found is None else [
                Proposal(tuple(v[:4]), None if math.isnan(v[4]) else v[4], label)
                for v, label in zip(found.values.tolist(), found.labels)])
        return out


def _read_box_json(path: Path, image_dir: str) -> dict[str, _ImageBoxes]:
    """A COCO instances or panoptic json -> ``{normalised image path: its boxes}``."""
    data = _load_json(path)
    lists = {name: _coco_list(path, data, name) for name in ("images", "annotations", "categories")}
    categories = {}
    for i, entry in enumerate(lists["categories"]):
        category_id = _field(path, f"categories[{i}]", entry, "id", int, "an integer")
        categories[category_id] = _field(path, f"categories[{i}]", entry, "name", str, "a string")
    images = _images(path, lists["images"])
    panoptic = any(isinstance(a, dict) and "segments_info" in a for a in lists["annotations"][:1])
    found: dict[str, tuple[list[list[float]], list[str]]] = {}
    for i, ann in enumerate(lists["annotations"]):
        where = f"annotations[{i}]"
        image_id = _field(path, where, ann, "image_id", (int, str), "an image id")
        if image_id not in images:
            raise RecordError(f"{path}: {where}: field 'image_id' {image_id!r} is not in 'images'")
        if panoptic:
            entries = [(f"{where}.segments_info[{j}]", info) for j, info
                       in enumerate(_field(path, where, ann, "segments_info", list, "a list"))]
        else:
            entries = [(where, ann)]
        image = posixpath.normpath(posixpath.join(image_dir, images[image_id][0]))
        values, labels = found.setdefault(image, ([], []))
        for at, entry in entries:
            if not isinstance(entry, dict):
                raise RecordError(f"{path}: {at}: must be an object, got {type(entry).__name__}")
            if entry.get("iscrowd", 0):
                continue
            category_id = _field(path, at, entry, "category_id", int, "a category id")
            if category_id not in categories:
                raise RecordError(f"{path}: {at}: field 'category_id' {category_id} is not in 'categories'")
            score = math.nan
            if "score" in entry:
                score = float(_field(path, at, entry, "score", (int, float), "a number"))
                if not math.isfinite(score):
                    raise RecordError(f"{path}: {at}: field 'score' must be finite, got {score}")
            values.append([*_coco_box(entry, f"{path}: {at}"), score])
            labels.append(categories[category_id])
    return {image: _ImageBoxes(np.array(values, dtype=np.float64).reshape(-1, 5), tuple(labels))
            for image, (values, labels) in found.items()}


class TorchvisionProposer:
    """A torchvision detection model (``torchvision.models.list_models(module=torchvision.models.detection)``).

    ``weights``: ``"DEFAULT"`` or a weights enum name (``"COCO_V1"``; torchvision downloads them), a local file
    (a state dict of the model, or a torchvision reference checkpoint ``{"model": state_dict, ...}``; its class
    names are assumed to be the default weights' ones, COCO's), or ``"none"`` (random initialisation, backbone
    included: for tests and benchmarks; labels are then class indices).

    ``rpn=False``: the detector's final boxes, scores and class names. Its score threshold is set to 0.001; its
    per-class NMS and per-image cap (100 for Faster R-CNN) are kept; Mask and Keypoint R-CNN run without their
mask and keypoint heads. ``rpn=True`` (two-stage models only):
    the region proposal network's boxes (after its own per-level NMS and top-n, 1000 for the ResNet-50 FPN
    models) scored by their objectness (sigmoid), without labels.

    Images go through the model's own transform (resize to ``min_size`` / ``max_size`` when given, else the
    model's defaults; normalisation) in batches of ``batch_size`` on ``device``; boxes come back in pixels of
    the images given. A batch is padded to its largest resized image, as torchvision does, so a box can move
    slightly with the other images of its batch.
    """

    def __init__(self, model: str = "fasterrcnn_resnet50_fpn_v2", weights: str | Path = "DEFAULT", rpn: bool = False,
                 device: str = "cpu", batch_size: int = 8, min_size: int | None = None,
                 max_size: int | None = None):
        from torchvision.models import detection, get_model, get_model_weights, list_models

        names = list_models(module=detection)
        if model not in names:
            raise DataError(f"torchvision proposer: unknown model {model!r}; detection models: {', '.join(names)}")
        if batch_size < 1:
            raise DataError(f"torchvision proposer: batch_size must be >= 1, got {batch_size}")
        weights = str(weights)
        self.name, self.weights, self.rpn, self.batch_size = model, weights, rpn, batch_size
        self.min_size, self.max_size = min_size, max_size
        self.device = torch.device(device)
        sizes = {k: v for k, v in (("min_size", min_size), ("max_size", max_size)) if v is not None}
        enum = get_model_weights(model)
        file = None if weights.lower() == "none" else Path(weights)
        if file is not None and not file.is_file():
            if weights.removeprefix(f"{enum.__name__}.") not in enum.__members__:
                raise DataError(f"torchvision proposer: weights {weights!r} is not a file, 'none' or a weights name "
                                f"of {model} ({', '.join(enum.__members__)})")
            chosen = enum.verify(weights)
            self.categories = chosen.meta.get("categories")
            cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(chosen.url)
            why = None if cached.is_file() else network_unavailable(urlparse(chosen.url).hostname,
                                                                    hub=False)
            try:
                if why is None:
                    self.detector = _build(get_model, model, sizes, weights=chosen)
            except urllib.error.URLError as e:
                why = str(e.reason)
            if why is not None:
                raise PretrainedWeightsUnavailable(
                    f"torchvision proposer: the weights {chosen} of {model} are not in the cache ({cached.parent}) "
                    f"and cannot be downloaded ({why}): download {chosen.url} where there is network and pass "
                    "the file (finegrain annotate --weights FILE)")
        else:
            self.categories = None if file is None else enum.DEFAULT.meta.get("categories")
            self.detector = _build(get_model, model, sizes, weights=None, weights_backbone=None)
            if file is not None:
                _load_state(self.detector, file, model)
        if rpn and not hasattr(self.detector, "rpn"):
            raise DataError(f"torchvision proposer: rpn=True needs a two-stage model with a region proposal "
                            f"network (fasterrcnn_*, maskrcnn_*, keypointrcnn_*), got {model}")
        heads = getattr(self.detector, "roi_heads", None)
        if heads is not None:  # boxes only: Mask / Keypoint R-CNN's mask and keypoint heads are skipped
            heads.mask_roi_pool = heads.keypoint_roi_pool = None
        (self.detector if heads is None else heads).score_thresh = DETECTOR_MIN_SCORE
        self.detector.eval().to(self.device)

    def describe(self) -> str:
        sizes = "".join(f" {k}={v}" for k, v in (("min_size", self.min_size), ("max_size", self.max_size))
                        if v is not None)
        return f"torchvision:{self.name} weights={self.weights}{' rpn' if self.rpn else ''}{sizes}"

    @torch.inference_mode()
    def propose(self, images: Sequence[Image.Image], records: Sequence[Record]) -> list[list[Proposal]]:
        from torchvision.transforms.functional import pil_to_tensor

        out = []
        for start in range(0, len(images), self.batch_size):
            # uint8 to the device, then to_tensor's float scaling there: the same values, 4x less to copy
            batch = [pil_to_tensor(image.convert("RGB")).to(self.device).float().div_(255)
                     for image in images[start:start + self.batch_size]]
            results = rpn_proposals(self.detector, batch) if self.rpn else self.detector(batch)
            out += [self._proposals(r) for r in results]
        return out

    def _proposals(self, result: dict[str, torch.Tensor]) -> list[Proposal]:
        boxes, scores = result["boxes"].tolist(), result["scores"].tolist()
        if "labels" not in result:
            return [Proposal(tuple(b), s) for b, s in zip(boxes, scores)]
        names = self.categories or ()
        return [Proposal(tuple(b), s, names[i] if i < len(names) else str(i))
                for b, s, i in zip(boxes, scores, result["labels"].tolist())]


def _build(get_model: Any, model: str, sizes: dict[str, int], **weights: Any) -> torch.nn.Module:
    try:
        return get_model(model, **weights, **sizes)
    except TypeError as e:
        if not sizes:
            raise
        raise DataError(f"torchvision proposer: {model} does not take {', '.join(sizes)} ({e}); its input size "
                        "is fixed") from None


def _load_state(detector: torch.nn.Module, file: Path, model: str) -> None:
    """Load a state dict, or a torchvision reference checkpoint holding one under ``model``."""
    state = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise DataError(f"{file}: expected a state dict of {model} (or a checkpoint with one under 'model'), "
                        f"got {type(state).__name__}")
    try:
        detector.load_state_dict(state)
    except RuntimeError as e:
        raise DataError(f"{file}: not a state dict of torchvision {model} ({' '.join(str(e).split())[:300]})") from None


def rpn_proposals(detector: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The region proposal network's boxes of a torchvision two-stage detector in eval mode, for a list of
    ``(3, H, W)`` float images in [0, 1]: one ``{"boxes": (N, 4) xyxy pixels of that image, "scores": (N,)
    objectness in [0, 1]}`` per image. This is ``GeneralizedRCNN.forward`` up to the RPN, with the RPN's
    scores kept (``RegionProposalNetwork.forward`` returns its boxes only), and boxes mapped back from the
    transform's resized frame with ``transform.postprocess``."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    original_sizes = [tuple(image.shape[-2:]) for image in images]
    batch, _ = detector.transform(images)
    features = detector.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = OrderedDict([("0", features)])
    rpn, levels = detector.rpn, list(features.values())
    objectness, deltas = rpn.head(levels)
    anchors = rpn.anchor_generator(batch, levels)
    per_level = [o[0].numel() for o in objectness]  # anchors x height x width of each level
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    boxes = rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
    boxes, scores = rpn.filter_proposals(boxes, objectness, batch.image_sizes, per_level)
    results = [{"boxes": b, "scores": s} for b, s in zip(boxes, scores)]
    return detector.transform.postprocess(results, batch.image_sizes, original_sizes)


class YoloProposer:
    """ultralytics models (the optional ``finegrain[yolo]`` extra; AGPL-3.0). ``kind="yolo"``: a YOLO detector
    (``YOLO(weights)``; FineCLIP used YOLOv9): its boxes, confidences and class names. ``kind="fastsam"``:
    FastSAM (``FastSAM(weights)``), a YOLOv8 segmentation model: one box per mask, the box its detection head
    predicted with that mask (``results.boxes``, not the mask's pixel extent; a box within IoU 0.9 of the whole
    image is snapped to it, as FastSAM does), its confidence, and no label.

    ``weights`` is a local ``.pt`` file; ultralytics fetches a release name that is not a file (e.g.
    ``yolov9c.pt``, ``FastSAM-s.pt``) and may fetch other files on its own. ``conf`` is the model's score
    threshold (low by default: the pipeline's filter thresholds); ``iou`` its own NMS (per class for YOLO),
    which, with its cap of 300 boxes per image, stays. ``device=None`` lets ultralytics choose.
    """

    def __init__(self, weights: str, kind: str = "yolo", device: str | None = None, imgsz: int = 640,
                 conf: float = DETECTOR_MIN_SCORE, iou: float = 0.7, batch_size: int = 16):
        if kind not in ("yolo", "fastsam"):
            raise DataError(f"ultralytics proposer: kind must be 'yolo' or 'fastsam', got {kind!r}")
        if batch_size < 1:
            raise DataError(f"{kind} proposer: batch_size must be >= 1, got {batch_size}")
        try:
            import ultralytics
        except ImportError:
            raise ImportError(f"the {kind} proposer needs ultralytics: pip install 'finegrain[yolo]'") from None
        self.weights, self.kind, self.batch_size = str(weights), kind, batch_size
        self.options = {"imgsz": imgsz, "conf": conf, "iou": iou, "device": device}
        self.model = (ultralytics.YOLO if kind == "yolo" else ultralytics.FastSAM)(self.weights)

    def describe(self) -> str:
        o = self.options
        return f"{self.kind}:{self.weights} imgsz={o['imgsz']} conf={o['conf']:g} iou={o['iou']:g}"

    def propose(self, images: Sequence[Image.Image], records: Sequence[Record]) -> list[list[Proposal]]:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            for result in self.model.predict(batch, verbose=False, **self.options):
                boxes = result.boxes
                labels = ([result.names[int(c)] for c in boxes.cls.tolist()] if self.kind == "yolo"
                          else [None] * len(boxes.conf))
                out.append([Proposal(tuple(b), s, label)
                            for b, s, label in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), labels)])
        return out


PROPOSERS: dict[str, tuple[type, dict[str, Any]]] = {
    "gt": (GroundTruthProposer, {}),
    "torchvision": (TorchvisionProposer, {}),
    "yolo": (YoloProposer, {"kind": "yolo"}),
    "fastsam": (YoloProposer, {"kind": "fastsam"}),
}


def build_proposer(name: str, **options: Any) -> Proposer:
    """The proposer ``name`` (``gt``, ``torchvision``, ``yolo``, ``fastsam``) built with ``options``, named as its
    constructor's arguments (``yolo`` / ``fastsam`` set ``kind`` themselves)."""
    if name not in PROPOSERS:
        raise DataError(f"unknown proposer {name!r}; choose one of: {', '.join(PROPOSERS)}")
    cls, fixed = PROPOSERS[name]
    params = {k: p for k, p in inspect.signature(cls).parameters.items() if k not in fixed}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise DataError(f"proposer {name!r}: unknown option(s) {', '.join(unknown)}; valid options: "
                        f"{', '.join(params)}")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise DataError(f"proposer {name!r}: option(s) {', '.join(missing)} must be given")
    return cls(**fixed, **options)
