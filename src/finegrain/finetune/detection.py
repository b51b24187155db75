"""Object detection and instance segmentation (``method.name: finetune-det``): torchvision's Mask R-CNN on the
simple feature pyramid of a finegrain backbone, as ViTDet / BEiT / iBOT fine-tune ViTs on COCO.

The parts are torchvision's (``torchvision.models.detection``): a ``FeaturePyramidNetwork`` (256 channels, an
extra max-pooled level: strides 4 .. 64 for a patch-16 tower), the ``RegionProposalNetwork`` with one anchor
size per level (``anchor_scale`` x stride, ratios 0.5 / 1 / 2: mmdet's ``scales=[8]``), ``RoIHeads``, a 4conv1fc
box head (ViTDet / iBOT) or two FC layers (torchvision's ``TwoMLPHead``), the 4-conv mask head, their box coder,
samplers, losses and NMS. Where torchvision's differ from the mmdet 2.x that trained iBOT's numbers, mmdet's
rule is kept (``finetune/fvit.py``): anchors at the configured strides without rounding, low-quality RPN matches
only from ``rpn_min_pos_iou``, the box and mask RoIs pooled by mmdet's level rule with aligned RoIAlign, and
mmdet's initialisation (:func:`mmdet_initialisation`).
``GeneralizedRCNN`` and its transform are not used: the data pipeline has resized and padded the images and
the trainer normalised them, so :meth:`DetectionTask.forward` calls backbone -> RPN -> RoI heads itself. The
RPN and RoI heads run in float32 whatever the autocast (bf16 cannot hold pixel coordinates of large images).

A batch is cropped to its largest image rounded up to ``size_divisor`` (mmdet's ``Pad(size_divisor=32)``) and
its padding set to zero after normalisation, as mmdet pads normalised images. A tower whose patch is not a
power of two (ViT-L/14) sees the image resized so that its patch grid is that of the nearest power of two (16):
torchvision's anchors and RoI levels need power-of-two strides.

Evaluation (``detection``): each held-out image alone, resized keeping its ratio to fit ``test_scale`` (mmdet's
``(1333, 800)``), padded to ``size_divisor``, detected; boxes mapped back to the original pixels, masks pasted
at full resolution (``paste_masks_in_image``, threshold 0.5), written as COCO results
(``<run>/eval/detections.json``, the latest evaluation's) and scored by pycocotools against ``data.val.path`` when it is a COCO
instances json (categories matched by name), else against a COCO dict built from the records' regions.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.transforms import functional as TF

from ..data.demo import DEMO_CLASSES
from ..data.dense import decode_mask, keep_ratio_size
from ..data.images import load_image
from ..data.readers import coco_image_file
from ..data.records import RecordError, check_record_size
from ..errors import DataError
from ..eval.detection import (
    check_ground_truth_file,
    coco_from_records,
    detection_metrics,
    encode_masks,
    load_coco,
)
from ..eval.encode import check_usable, iter_images, report_skipped
from ..eval.prompts import load_class_names
from ..models import FinegrainCLIP
from ..objectives import EvalContext, Progress, register_method
from ..sample_spec import DenseTargets, SampleSpec
from .base import BackboneOptions, DenseTask, TaskOptions, convert_norms, zero_padding
from .fvit import LevelRoIAlign, LowQualityFloorMatcher, StrideAnchorGenerator, normal_init, xavier_init

log = logging.getLogger(__name__)

BOX_HEADS = ("4conv1fc", "2fc")
# torchvision's loss names -> finegrain's (keys ending in _loss are summed into the training loss)
LOSS_NAMES = {"loss_objectness": "rpn_cls_loss", "loss_rpn_box_reg": "rpn_box_loss", "loss_classifier": "cls_loss",
              "loss_box_reg": "box_loss", "loss_mask": "mask_loss"}
DETECTIONS_FILE = "detections.json"  # in the run's eval folder
HEAD_PROVENANCE = "mask_rcnn (the papers: cascade mask rcnn; torchvision has none)"


@dataclass
class DetectionOptions(TaskOptions):
    """Options of ``finetune-det`` (``method.*``); defaults: mmdet's Mask R-CNN and iBOT's COCO recipe."""

    backbone: BackboneOptions = field(default_factory=lambda: BackboneOptions(drop_path_rate=0.2, layer_decay=0.75))
    class_names: str = "coco-80"  # a built-in list (coco-80), a file, or "demo" (the demo's 24 shape classes)
    masks: bool = True  # instance segmentation (mask head); False: boxes only
    box_head: str = "4conv1fc"  # 4conv1fc (4 conv + BN, 1 FC: ViTDet, iBOT) | 2fc (torchvision's TwoMLPHead)
    fpn_channels: int = 256
    fc_channels: int = 1024  # the box head's FC width
    mask_convs: int = 4  # convolutions of the mask head (FCNMaskHead: 4)
    anchor_scale: float = 8.0  # anchor side = anchor_scale x level stride (mmdet's scales=[8])
    # training pipeline: short side drawn among short_sides, long side <= max_size, flip, pad to a fixed canvas
    short_sides: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    flip: float = 0.5
    pad: list[int] = field(default_factory=lambda: [1344, 1344])  # (h, w) canvas of the data loader
    max_instances: int = 100
    drop_empty: bool = False  # leave out images without an instance of the classes (mmdet's filter_empty_gt)
    size_divisor: int = 32  # batches cropped / test images padded to multiples of this
    # RPN (mmdet's Mask R-CNN train_cfg / test_cfg)
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_min_pos_iou: float = 0.3  # a ground truth's best anchors are positive only from this IoU (mmdet min_pos_iou)
    rpn_batch: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_train: int = 2000  # per level
    rpn_post_nms_train: int = 1000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_nms: float = 0.7
    # RoI heads
    roi_fg_iou: float = 0.5
    roi_bg_iou: float = 0.5
    roi_batch: int = 512
    roi_positive_fraction: float = 0.25
    score_threshold: float = 0.05
    nms: float = 0.5
    detections_per_image: int = 100
    mask_threshold: float = 0.5
    # evaluation: keep-ratio resize to fit (long, short)
    test_scale: list[int] = field(default_factory=lambda: [1333, 800])


def detection_class_names(spec: str) -> list[str]:
    """``demo``: the demo's :data:`DEMO_CLASSES`; else a built-in list or a file (``load_class_names``)."""
    return list(DEMO_CLASSES) if spec == "demo" else load_class_names(spec)


def level_strides(patch: int) -> list[int]:
    """Strides of the five FPN levels for a tower of ``patch`` pixels: those of the nearest power of two
    ``g`` (16 for 14): ``g/4, g/2, g, 2g, 4g``."""
    grid = 2 ** round(math.log2(patch))
    if grid < 4:
        raise DataError(f"detection needs a patch size of at least 4 pixels, got {patch}")
    return [grid // 4, grid // 2, grid, grid * 2, grid * 4]


def mmdet_initialisation(fpn: FeaturePyramidNetwork, roi_heads: RoIHeads) -> None:
    """mmdet 2.x's initialisation where torchvision's differs: FPN convolutions Xavier-uniform (torchvision:
    Kaiming-uniform a=1), box-head FC layers Xavier-uniform, the classifier N(0, 0.01) and the box regressor
    N(0, 0.001), the mask head's deconvolution and logits biases 0; all biases 0. The RPN and the convolutions
    of the box and mask heads are initialised alike in both."""
    xavier_init(fpn, *(m for m in roi_heads.box_head.modules() if isinstance(m, nn.Linear)))
    normal_init(roi_heads.box_predictor.cls_score, 0.01)
    normal_init(roi_heads.box_predictor.bbox_pred, 0.001)
    if roi_heads.has_mask():
        for module in roi_heads.mask_predictor.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.zeros_(module.bias)


def detection_targets(batch: dict[str, torch.Tensor], masks: bool, height: int, width: int) -> list[dict]:
    """torchvision targets from a padded batch: per image the valid rows only, ``boxes`` ``(N, 4)``, ``labels``
    ``(N,)`` = class index + 1 (0 is torchvision's background), with ``masks`` also ``masks`` ``(N, height,
    width)`` (the image's rows of the concatenated ``instance_masks``, cropped to the batch canvas)."""
    valid = batch["instance_valid"]
    image_masks = batch["instance_masks"].split(valid.sum(dim=1).tolist()) if masks else [None] * len(valid)
    targets = []
    for i, (rows, image_mask) in enumerate(zip(valid, image_masks)):
        target = {"boxes": batch["instance_boxes"][i][rows].float(), "labels": batch["instance_labels"][i][rows] + 1}
        if masks:
            target["masks"] = image_mask[:, :height, :width]
        targets.append(target)
    return targets


def _round_up(value: int, divisor: int) -> int:
    return -(-value // divisor) * divisor


def full_precision(like: torch.Tensor):
    """Autocast off on ``like``'s device: the RPN and RoI heads run in float32."""
    return torch.autocast(like.device.type, enabled=False)


@register_method("finetune-det")
class DetectionTask(DenseTask):
    """Mask R-CNN (torchvision) on the backbone's simple feature pyramid; see the module docstring."""

    Options = DetectionOptions
    evaluations = ("detection",)

    def __init__(self, options: DetectionOptions, model: FinegrainCLIP):
        super().__init__(options, model)
        o = options
        self.class_names = detection_class_names(o.class_names)
        problems = []
        if o.box_head not in BOX_HEADS:
            problems.append(f"method.box_head must be one of {BOX_HEADS}, got {o.box_head!r}")
        if len(o.pad) != 2 or len(o.test_scale) != 2 or not o.short_sides:
            problems.append(f"method.pad and method.test_scale need two sizes and method.short_sides at least one; got "
                            f"{o.pad}, {o.test_scale}, {o.short_sides}")
        patch = self.backbone.tower.patch_size[0]
        self.strides = level_strides(patch)
        if o.size_divisor % self.strides[3]:
            problems.append(f"method.size_divisor={o.size_divisor} must be a multiple of {self.strides[3]} (twice the "
                            f"pyramid's stride {self.strides[2]})")
        if problems:
            raise DataError("finetune-det: " + "; ".join(problems))
        self.tower_scale = patch / self.strides[2]  # the tower's input relative to the canvas (14/16 for patch 14)
        channels, classes = o.fpn_channels, len(self.class_names) + 1
        self.fpn = FeaturePyramidNetwork([self.backbone.out_channels] * 4, channels, extra_blocks=LastLevelMaxPool())
        anchors = StrideAnchorGenerator([(o.anchor_scale * s,) for s in self.strides], [(0.5, 1.0, 2.0)] * 5,
                                        self.strides)
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(channels, 3), o.rpn_fg_iou, o.rpn_bg_iou, o.rpn_batch, o.rpn_positive_fraction,
            {"training": o.rpn_pre_nms_train, "testing": o.rpn_pre_nms_test},
            {"training": o.rpn_post_nms_train, "testing": o.rpn_post_nms_test}, o.rpn_nms)
        self.rpn.proposal_matcher = LowQualityFloorMatcher(o.rpn_fg_iou, o.rpn_bg_iou, o.rpn_min_pos_iou)
        if o.box_head == "4conv1fc":
            box_head = FastRCNNConvFCHead((channels, 7, 7), [channels] * 4, [o.fc_channels], norm_layer=nn.BatchNorm2d)
        else:
            box_head = TwoMLPHead(channels * 7 * 7, o.fc_channels)
        mask_parts = {}
        if o.masks:
            mask_parts = {"mask_roi_pool": LevelRoIAlign(self.strides[:4], 14),
                          "mask_head": MaskRCNNHeads(channels, [channels] * o.mask_convs, 1),
                          "mask_predictor": MaskRCNNPredictor(channels, channels, classes)}
        self.roi_heads = RoIHeads(
            LevelRoIAlign(self.strides[:4], 7), box_head, FastRCNNPredictor(o.fc_channels, classes), o.roi_fg_iou,
            o.roi_bg_iou, o.roi_batch, o.roi_positive_fraction, (10.0, 10.0, 5.0, 5.0), o.score_threshold, o.nms,
            o.detections_per_image, **mask_parts)
        mmdet_initialisation(self.fpn, self.roi_heads)
        convert_norms(self, o.norm)  # the pyramid's and the box head's BatchNorm2d
        self.roi_heads.mask_thresh = o.mask_threshold

    def sample_spec(self) -> SampleSpec:
        o = self.options
        dense = DenseTargets(kind="instances", num_classes=len(self.class_names), class_names=tuple(self.class_names),
                             masks=o.masks, max_instances=o.max_instances, scale=(o.max_size, max(o.short_sides)),
                             short_sides=tuple(o.short_sides), flip=o.flip, pad=tuple(o.pad), drop_empty=o.drop_empty)
        return SampleSpec(caption="none", augment="none", dense=dense)

    def feature_maps(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Normalised ``(B, 3, H, W)``, H and W multiples of ``size_divisor`` -> the FPN's five levels (float32:
        the heads decode pixel coordinates, which bf16 would round to 8 pixels at 1333)."""
        if self.tower_scale != 1:
            size = [round(s * self.tower_scale) for s in images.shape[-2:]]
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return OrderedDict((k, v.float()) for k, v in self.fpn(self.backbone(images)).items())

    def canvas(self, images: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The batch cropped to its largest image rounded up to ``size_divisor``, padding set to 0."""
        d = self.options.size_divisor
        height = _round_up(max(h for h, _ in sizes), d)
        width = _round_up(max(w for _, w in sizes), d)
        return zero_padding(images[..., :height, :width], sizes)

    def forward(self, model: FinegrainCLIP, batch: dict[str, torch.Tensor], progress: Progress) -> dict[str, torch.Tensor]:
        sizes = [(int(h), int(w)) for h, w in batch["image_size"].tolist()]
        images = self.canvas(batch["image"], sizes)
        targets = detection_targets(batch, self.options.masks, *images.shape[-2:])
        features = self.feature_maps(images)
        with full_precision(images):
            image_list = ImageList(images.float(), sizes)
            proposals, rpn_losses = self.rpn(image_list, features, targets)
            _, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {LOSS_NAMES[name]: value for name, value in {**rpn_losses, **roi_losses}.items()}

    @torch.no_grad()
    def detect(self, images: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """Detections of normalised, zero-padded ``(B, 3, H, W)`` images (each ``(h, w)`` in ``sizes``): per
        image ``boxes`` ``(N, 4)`` xyxy in those pixels, ``labels`` (class index + 1), ``scores`` and, with
        masks, ``masks`` ``(N, 1, 28, 28)`` probabilities inside each box."""
        features = self.feature_maps(images)
        with full_precision(images):
            image_list = ImageList(images.float(), list(sizes))
            proposals, _ = self.rpn(image_list, features)
            detections, _ = self.roi_heads(features, proposals, image_list.image_sizes)
        return detections

    def result_options(self, task: str) -> dict:
        return {"head": HEAD_PROVENANCE, "box_head": self.options.box_head, "masks": self.options.masks,
                "class_names": self.options.class_names}

    def check_held_out(self, task: str, context: EvalContext) -> None:
        """A COCO json as ``data.val.path`` must name the classes and hold boxes (and masks) pycocotools can score,
        and one held-out image at least must be readable (in the size its record says)."""
        if task == "detection":
            data = check_ground_truth_file(context.path, self.class_names, self.options.masks)
            if data is None and self.options.masks:
                check_record_masks(context.records, self.class_names)

            def load(record) -> None:
                check_record_size(record, load_image(context.root / record.image).size)

            check_usable(task, context.records, load, f"data.val.path={context.path} (images under {context.root})")

    def evaluate(self, task: str, model: FinegrainCLIP, context: EvalContext) -> dict[str, float]:
        if task != "detection":
            return super().evaluate(task, model, context)
        pp = open_clip.get_model_preprocess_cfg(model.clip)
        predictions, sizes, kept = predict_records(self, context, pp["mean"], pp["std"])
        records = [context.records[i] for i in kept]
        ground_truth, image_ids, category_ids = self._ground_truth(context, records, sizes)
        results = coco_results(predictions, image_ids, category_ids)
        if context.output_dir is not None:  # the latest evaluation's detections (COCO results json)
            context.output_dir.mkdir(parents=True, exist_ok=True)
            tmp = context.output_dir / f"{DETECTIONS_FILE}.tmp"
            tmp.write_text(json.dumps(results))
            os.replace(tmp, context.output_dir / DETECTIONS_FILE)
        metrics = {}
        for iou_type in ("bbox", "segm") if self.options.masks else ("bbox",):
            values = detection_metrics(ground_truth, results, iou_type, image_ids=image_ids)
            metrics.update({f"{iou_type}_{name.lower()}": values[name] for name in
                            ("AP", "AP50", "AP75", "APs", "APm", "APl")})
        # the images that could not be read are left out of the scores, not counted as misses
        # (and the held-out records the reader left out are counted with them)
        return {**metrics, "num_images": len(records),
                "skipped_images": len(context.records) - len(records) + context.skipped}

    def _ground_truth(self, context: EvalContext, records: Sequence, sizes: Sequence[tuple[int, int]]):
        """``(COCO index, image id per record, category id per class)``: from ``data.val.path`` when it is a
        COCO instances json, else built from the records (:func:`coco_from_records`)."""
        path = Path(context.path)
        if path.suffix == ".json" and path.is_file():
            coco = load_coco(str(path))
            if "annotations" in coco.dataset and "categories" in coco.dataset:
                return (coco, image_ids_by_file(coco, records, str(path)),
                        category_ids_by_name(coco, self.class_names, str(path)))
        data, left_out = coco_from_records(records, self.class_names, [(w, h) for h, w in sizes], self.options.masks)
        if left_out:
            log.warning("detection: left out %d region(s) of the ground truth whose mask does not decode; first: %s",
                        len(left_out), "; ".join(left_out[:3]))
        return load_coco(data), list(range(1, len(records) + 1)), list(range(1, len(self.class_names) + 1))


def check_record_masks(records: Sequence, class_names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the record and region when a held-out region of one of ``class_names`` has no
    mask, or one that does not decode in its record's size: the ground truth built from the records would leave it
    out, and its detections would count as false positives."""
    names = set(class_names)
    for record in records:
        key = record.key or record.image
        for i, region in enumerate(record.regions):
            if region.label not in names:
                continue
            if region.mask is None:
                raise ValueError(f"{key}: regions[{i}]: field 'mask' is missing: mask AP needs a mask per region of "
                                 "the classes (method.masks=false scores boxes only)")
            if record.width is not None and record.height is not None:
                try:
                    decode_mask(region.mask, record.width, record.height, f"{key}: regions[{i}]")
                except RecordError as e:
                    raise ValueError(str(e)) from None


def image_ids_by_file(coco, records: Sequence, path: str) -> list[int]:
    """The id of each record's image in ``coco`` (matched by ``file_name`` or LVIS's ``coco_url``, or by the
    path's tail)."""
    by_name = {coco_image_file(image): image["id"] for image in coco.dataset["images"]}
    ids = []
    for record in records:
        image = record.image
        found = by_name.get(image, by_name.get(Path(image).name))
        if found is None:
            raise DataError(f"{path}: no image with file_name {image!r} (record {record.key or image}); the "
                            "held-out records must be the images of this COCO json")
        ids.append(found)
    return ids


def category_ids_by_name(coco, class_names: Sequence[str], path: str) -> list[int]:
    """The id in ``coco`` of each of ``class_names`` (matched by category name)."""
    by_name = {c["name"]: c["id"] for c in coco.dataset["categories"]}
    missing = [name for name in class_names if name not in by_name]
    if missing:
        raise DataError(f"{path}: class names {missing[:5]} are not categories of the ground truth "
                        f"(method.class_names must name its categories)")
    return [by_name[name] for name in class_names]


def predict_records(task: DetectionTask, context: EvalContext, mean, std):
    """Run ``task`` on the held-out images, one at a time as mmdet tests (with a global-attention tower, an image
    padded to a batch partner's size would get other detections): returns per loaded image its
    :func:`detect_image` detections, its ``(H, W)``, and its position in ``context.records``."""
    skipped: list[str] = []
    predictions, sizes, kept = [], [], []
    for i, image in iter_images(context.records, context.root, skipped):
        try:  # boxes of a record whose size is not its image's would be misplaced: left out, as unreadable ones
            check_record_size(context.records[i], image.size)
        except RecordError as e:
            skipped.append(str(e))
            continue
        predictions.append(detect_image(task, image, mean, std, context.device))
        sizes.append((image.height, image.width))
        kept.append(i)
    report_skipped("detection", skipped, len(context.records))
    return predictions, sizes, kept


def detect_image(task: DetectionTask, image: Image.Image, mean: Sequence[float], std: Sequence[float],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """Detections of one image by the test pipeline (keep-ratio resize into ``test_scale``, normalise, pad to
    ``size_divisor`` with zeros), in its original pixels: ``boxes`` ``(N, 4)`` xyxy, ``labels`` 0-based class
    indices, ``scores``, with masks ``masks`` bool ``(N, H, W)``; on the CPU."""
    o = task.options
    mean = torch.tensor(mean, device=device).view(3, 1, 1)
    std = torch.tensor(std, device=device).view(3, 1, 1)
    pixels = TF.pil_to_tensor(image.convert("RGB")).to(device).float()
    width, height = keep_ratio_size(image.width, image.height, tuple(o.test_scale))
    resized = F.interpolate(pixels[None], size=(height, width), mode="bilinear", align_corners=False)
    padding = (0, _round_up(width, o.size_divisor) - width, 0, _round_up(height, o.size_divisor) - height)
    detections = task.detect(F.pad((resized / 255 - mean) / std, padding), [(height, width)])[0]
    return to_original(detections, (height, width), (image.height, image.width), o.mask_threshold)


def to_original(detections: dict[str, torch.Tensor], resized: Sequence[int], original: tuple[int, int],
                mask_threshold: float) -> dict[str, torch.Tensor]:
    """Detections of an image resized to ``resized`` ``(h, w)`` -> in its ``original`` ``(H, W)`` pixels
    (boxes divided by the scale factors as mmdet's ``rescale``; masks pasted at full size and thresholded)."""
    (h, w), (height, width) = resized, original
    scale = torch.tensor([w / width, h / height, w / width, h / height], device=detections["boxes"].device)
    boxes = (detections["boxes"].float() / scale)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], device=boxes.device))
    out = {"boxes": boxes.cpu(), "labels": (detections["labels"] - 1).cpu(), "scores": detections["scores"].float().cpu()}
    if "masks" in detections:
        pasted = paste_masks_in_image(detections["masks"].float(), boxes, (height, width))
        out["masks"] = (pasted[:, 0] > mask_threshold).cpu()
    return out


def coco_results(predictions: Sequence[dict], image_ids: Sequence[int], category_ids: Sequence[int]) -> list[dict]:
    """COCO result records (``bbox`` xywh, ``score``, ``category_id``, RLE ``segmentation`` with masks) of
    :func:`predict_records`' detections."""
    results = []
    for det, image_id in zip(predictions, image_ids):
        masks = encode_masks(det["masks"].numpy()) if "masks" in det else None
        for k, (box, label, score) in enumerate(zip(det["boxes"].tolist(), det["labels"].tolist(),
                                                    det["scores"].tolist())):
            x0, y0, x1, y1 = box
            entry = {"image_id": image_id, "category_id": category_ids[label], "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "score": score}
            if masks is not None:
                entry["segmentation"] = masks[k]
            results.append(entry)
    return results
