"""F-ViT's detector parts on torchvision's: an FPN neck, an RPN, and a box head whose regions are classified against
text embeddings of class names, ensembled at test time with the frozen CLIP's own region scores.

The parts follow F-ViT's release (wusize/CLIPSelf, ``F-ViT/models/fvit_head.py`` on MMDetection 2.28) where
torchvision offers no equal: RoIAlign levels by mmdet's rule (``finest_scale`` 56), anchors at the configured
(fractional: 3.5 for patch-14 towers) strides without rounding, low-quality RPN matches from IoU 0.3
(``min_pos_iou``), L1 box losses normalised by the sampled count of full samplers (mmdet's ``avg_factor``), mmdet's
initialisation. ``finetune/detection.py`` uses the anchors, the matcher and the RoI pooling too.
``docs/ovd.md`` lists every value and deviation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import FeaturePyramidNetwork, batched_nms, box_iou, clip_boxes_to_image, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

FINEST_SCALE = 56  # mmdet SingleRoIExtractor: boxes of sqrt(area) < 112 go to the finest level


def fpn(width: int, levels: int, channels: int) -> FeaturePyramidNetwork:
    """mmdet's FPN with ``norm_cfg``: 1x1 laterals and 3x3 outputs, each conv + norm without activation, nearest
    top-down upsampling, one more level by stride-2 max-pooling of the coarsest (``num_outs`` = levels + 1)."""
    return FeaturePyramidNetwork([width] * levels, channels, extra_blocks=LastLevelMaxPool(),
                                 norm_layer=nn.BatchNorm2d)


class StrideAnchorGenerator(AnchorGenerator):
    """torchvision's anchors at the levels' configured ``strides`` (mmdet's ``AnchorGenerator``): fractional ones
    kept (3.5 for patch 14), and a level whose grid was rounded up (the max-pooled level of a canvas that is an
    odd multiple of 32) still at its stride, where torchvision divides the canvas by the grid (64 -> 61)."""

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[float]):
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in aspect_ratios))
        self.strides = [float(s) for s in strides]

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None):
        """Base anchors ``(A, 4)`` centred on 0, not rounded to whole pixels (mmdet's; torchvision rounds)."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        heights = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))[:, None] * scales[None]
        widths = scales[None] ** 2 / heights
        return torch.stack([-widths.flatten(), -heights.flatten(), widths.flatten(), heights.flatten()], dim=1) / 2

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [m.shape[-2:] for m in feature_maps]
        device = feature_maps[0].device
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(torch.float32, device)  # pixel coordinates stay float32 under autocast
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class LowQualityFloorMatcher(det_utils.Matcher):
    """torchvision's ``Matcher`` with mmdet ``MaxIoUAssigner``'s rule for low-quality matches: a ground truth's
    best predictions (ties included) become its positives only when that IoU is at least ``min_pos_iou``, and
    they are matched to that ground truth (a later one wins a shared prediction, as mmdet's loop); torchvision
    matches them whatever the IoU, to their own best ground truth."""

    def __init__(self, high_threshold: float, low_threshold: float, min_pos_iou: float):
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=True)
        self.min_pos_iou = min_pos_iou

    def set_low_quality_matches_(self, matches: torch.Tensor, all_matches: torch.Tensor,
                                 match_quality_matrix: torch.Tensor) -> None:
        best = match_quality_matrix.max(dim=1, keepdim=True).values  # (M, 1)
        chosen = (match_quality_matrix == best) & (best >= self.min_pos_iou)
        order = torch.arange(1, len(best) + 1, device=matches.device)[:, None]
        last = torch.where(chosen, order, 0).max(dim=0).values  # 1-based index of the last gt choosing each
        matches[last > 0] = last[last > 0] - 1


class FloatRPNHead(RPNHead):
    """torchvision's RPN head with float32 outputs, so that proposals decoded from them keep float32 coordinates
    under fp16 / bf16 autocast (torchvision decodes anchors in the deltas' dtype)."""

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class RPN(RegionProposalNetwork):
    """torchvision's RPN with mmdet's losses: binary cross-entropy and L1, each summed and divided by ``images x
    batch_size_per_image`` (mmdet's ``avg_factor`` whenever an image has that many anchors to sample)."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg))[0]])
        norm = len(labels) * self.fg_bg_sampler.batch_size_per_image
        labels, targets = torch.cat(labels), torch.cat(regression_targets)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum") / norm
        cls_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled],
                                                      reduction="sum") / norm
        return cls_loss, box_loss


def build_rpn(channels: int, strides: Sequence[float], sizes: Sequence[float], ratios: Sequence[float], convs: int,
              batch_size: int, pre_nms: int, post_nms: int, nms: float, pre_nms_test: int) -> RPN:
    """An RPN over the FPN levels of ``strides``: one anchor size per level (``sizes``) times ``ratios``; IoU 0.7
    / 0.3 with low-quality matches of IoU 0.3 or more (mmdet's ``min_pos_iou``), half positives, proposals per
    level before NMS ``pre_nms`` (``pre_nms_test`` at test), per image after ``post_nms``."""
    anchors = StrideAnchorGenerator([(s,) for s in sizes], [ratios] * len(sizes), strides)
    head = FloatRPNHead(channels, len(ratios), conv_depth=convs)
    rpn = RPN(anchors, head, 0.7, 0.3, batch_size, 0.5, {"training": pre_nms, "testing": pre_nms_test},
              {"training": post_nms, "testing": post_nms}, nms)
    rpn.proposal_matcher = LowQualityFloorMatcher(0.7, 0.3, 0.3)
    return rpn


def multilevel_roi_align(features: Sequence[torch.Tensor], strides: Sequence[float], boxes: list[torch.Tensor],
                         size: int) -> torch.Tensor:
    """``(R, C, size, size)`` features of the boxes (image by image), each pooled from the level mmdet's
    ``SingleRoIExtractor`` picks: ``floor(log2(sqrt(area) / 56))`` clamped to the levels; RoIAlign aligned, with
    adaptive sampling."""
    rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    level = torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6)).clamp(0, len(features) - 1).long()
    out = rois.new_zeros(len(rois), features[0].shape[1], size, size)
    for i, (feature, stride) in enumerate(zip(features, strides)):
        index = torch.where(level == i)[0]
        if len(index):
            out[index] = roi_align(feature.float(), rois[index].float(), size, 1.0 / stride, 0, aligned=True)
    return out


class LevelRoIAlign(nn.Module):
    """:func:`multilevel_roi_align` as torchvision's ``RoIHeads`` calls its poolers: ``(features, proposals,
    image_shapes) -> (R, C, size, size)`` from the first ``len(strides)`` levels of the feature dict."""

    def __init__(self, strides: Sequence[float], size: int):
        super().__init__()
        self.strides, self.size = list(strides), size

    def forward(self, features: dict[str, torch.Tensor], proposals: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        levels = list(features.values())[:len(self.strides)]
        return multilevel_roi_align(levels, self.strides, proposals, self.size)


def xavier_init(*modules: nn.Module) -> None:
    """mmdet's ``Xavier`` init (uniform, bias 0) of every ``Conv2d`` and ``Linear`` in ``modules``."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


def normal_init(layer: nn.Module, std: float) -> None:
    """mmdet's ``Normal`` init: weight N(0, std), bias 0."""
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class BoxHead(nn.Module):
    """mmdet's ``ConvFCBBoxHead`` as F-ViT / CLIM configure it: shared 3x3 convs (norm, ReLU), shared fcs (ReLU); a
    class branch of ``class_fcs`` fcs (ReLU) and a projection to the text-embedding width (followed by a ReLU in
    F-ViT's release, whose projection is its one class fc; not in CLIM's, whose 1024-wide class fc precedes
    it: ``class_relu``); a box branch of one fc (ReLU) and a class-agnostic regression layer. Initialised as
    mmdet's: convs Kaiming-normal (fan out, ``ConvModule``), fcs Xavier-uniform, the regression layer N(0, 0.001),
    a projection after class fcs N(0, 0.01) (CLIM's ``fc_cls``)."""

    def __init__(self, channels: int, size: int, convs: int, fcs: int, fc_channels: int, embed_dim: int,
                 class_relu: bool = True, class_fcs: int = 0):
        super().__init__()
        layers = []
        for _ in range(convs):
            conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            layers += [conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        layers.append(nn.Flatten())
        width = channels * size * size
        for _ in range(fcs):
            layers += [nn.Linear(width, fc_channels), nn.ReLU(inplace=True)]
            width = fc_channels
        self.shared = nn.Sequential(*layers)
        branch = [part for _ in range(class_fcs) for part in (nn.Linear(width, width), nn.ReLU(inplace=True))]
        projection = nn.Linear(width, embed_dim)
        self.cls = nn.Sequential(*branch, projection, nn.ReLU(inplace=True) if class_relu else nn.Identity())
        self.reg = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, 4))
        xavier_init(*(m for m in self.shared if isinstance(m, nn.Linear)), self.cls, self.reg)
        if class_fcs:
            normal_init(projection, 0.01)
        normal_init(self.reg[-1], 0.001)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, C, s, s)`` -> region embeddings ``(R, embed_dim)`` (unnormalised), box deltas ``(R, 4)``."""
        x = self.shared(x)
        return self.cls(x), self.reg(x)


def ensemble_scores(learned: torch.Tensor, clip: torch.Tensor, base: torch.Tensor, alpha: float,
                    beta: float) -> torch.Tensor:
    """F-ViT's test-time scores: per class, ``learned ** (1 - alpha) * clip ** alpha`` for base classes (the
    background among them) and ``learned ** (1 - beta) * clip ** beta`` for novel ones. ``learned``, ``clip``:
    ``(R, C + 1)`` softmax scores; ``base``: ``(C + 1,)`` bool."""
    exponent = torch.where(base, alpha, beta).to(learned.dtype)
    return learned ** (1 - exponent) * clip ** exponent


def sample_rois(proposals: list[torch.Tensor], gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor],
                matcher: det_utils.Matcher, sampler: det_utils.BalancedPositiveNegativeSampler):
    """mmdet's ``MaxIoUAssigner`` + ``RandomSampler`` (ground truth added as proposals): per image the sampled
    boxes, their labels (0 background, else ``gt_labels`` + 1) and their matched ground-truth boxes."""
    boxes, labels, matched = [], [], []
    for props, gt, classes in zip(proposals, gt_boxes, gt_labels):
        props = torch.cat([props, gt])
        if len(gt):
            index = matcher(box_iou(gt, props))
            label = classes[index.clamp(min=0)] + 1
            label[index < 0] = 0
            target = gt[index.clamp(min=0)]
        else:
            label, target = props.new_zeros(len(props), dtype=torch.long), torch.zeros_like(props)
        boxes.append(props), labels.append(label), matched.append(target)
    pos, neg = sampler(labels)
    keep = [torch.where(p | n)[0] for p, n in zip(pos, neg)]
    return ([b[k] for b, k in zip(boxes, keep)], [lab[k] for lab, k in zip(labels, keep)],
            [m[k] for m, k in zip(matched, keep)])


class FViTHead(nn.Module):
    """Neck, RPN and region classifier of F-ViT on a pyramid of backbone maps.

    Region logits are ``temperature * <normalise(embedding), class embedding>`` over the class-name embeddings
    (a buffer filled once from the frozen text tower: :meth:`set_class_embeddings`; ``num_novel`` counts every
    class after the base ones: novel and, for CLIM, the extra ones) plus a background embedding; in training only
    the base classes and the background compete (the releases give the others weight 0 and logit -inf).
    """

    def __init__(self, width: int, strides: Sequence[float], embed_dim: int, num_base: int, num_novel: int, *,
                 channels: int = 256, anchor_scale: float = 8, anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 rpn_convs: int = 2, rpn_batch_size: int = 256, rpn_pre_nms: int = 2000, rpn_post_nms: int = 1000,
                 rpn_nms: float = 0.7, rpn_pre_nms_test: int | None = None, roi_size: int = 7, head_convs: int = 4,
                 head_fcs: int = 2, fc_channels: int = 512, roi_batch_size: int = 512,
                 roi_positive_fraction: float = 0.25, class_relu: bool = True, class_fcs: int = 0,
                 temperature: float = 50.0, learn_background: bool = False):
        super().__init__()
        self.strides = [*strides, strides[-1] * 2]  # the pooled extra level
        self.neck = fpn(width, len(strides), channels)
        xavier_init(self.neck)  # mmdet's FPN init_cfg
        self.rpn = build_rpn(channels, self.strides, [anchor_scale * s for s in self.strides], anchor_ratios, rpn_convs,
                             rpn_batch_size, rpn_pre_nms, rpn_post_nms, rpn_nms,
                             rpn_pre_nms if rpn_pre_nms_test is None else rpn_pre_nms_test)
        self.roi_size = roi_size
        self.box_head = BoxHead(channels, roi_size, head_convs, head_fcs, fc_channels, embed_dim, class_relu,
                                class_fcs)
        self.box_coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))  # target stds 0.1, 0.1, 0.2, 0.2
        self.matcher = det_utils.Matcher(0.5, 0.5, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(roi_batch_size, roi_positive_fraction)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        self.num_base = num_base
        self.register_buffer("class_embeddings", torch.zeros(num_base + num_novel, embed_dim))
        self.register_buffer("embeddings_ready", torch.tensor(False))
        background = torch.zeros(embed_dim)
        if learn_background:
            self.background = nn.Parameter(background)
        else:
            self.register_buffer("background", background)

    def set_class_embeddings(self, classes: torch.Tensor, background: torch.Tensor) -> None:
        """Base then novel class embeddings ``(C, D)`` and the background's ``(D,)`` (its initial value when
        learned), L2-normalised."""
        with torch.no_grad():
            self.class_embeddings.copy_(F.normalize(classes.float(), dim=-1))
            self.background.copy_(F.normalize(background.float(), dim=-1))
            self.embeddings_ready.fill_(True)

    def embeddings(self, novel: bool) -> torch.Tensor:
        """``(C' + 1, D)``: base (and with ``novel`` all) class embeddings, then the background's."""
        return self.vocabulary(self.class_embeddings if novel else self.class_embeddings[:self.num_base])

    def vocabulary(self, classes: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``(C, D)`` class embeddings (any class names') -> ``(C + 1, D)``: then the background's."""
        return torch.cat([classes.float(), F.normalize(self.background, dim=-1)[None]])

    def pyramid(self, maps: Sequence[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return self.neck(OrderedDict((str(i), m) for i, m in enumerate(maps)))

    def regions(self, features: OrderedDict, boxes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Region embeddings ``(R, D)`` and box deltas ``(R, 4)`` of boxes (image by image) on the FPN levels
        but the pooled extra one."""
        levels = list(features.values())[:-1]
        return self.box_head(multilevel_roi_align(levels, self.strides[:-1], boxes, self.roi_size))

    def logits(self, embeddings: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
        """``(R, C + 1)`` float32 logits of region embeddings ``(R, D)`` against ``vocabulary`` ``(C + 1, D)``
        (:meth:`embeddings` or :meth:`vocabulary`; outside autocast: scores rank the detections)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return self.temperature * F.normalize(embeddings.float(), dim=-1) @ vocabulary.T

    def loss(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], maps: Sequence[torch.Tensor],
             gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor], bg_weight: float) -> dict[str, torch.Tensor]:
        """Training losses: RPN objectness and box, region classification (cross-entropy over base classes +
        background, background weighted ``bg_weight``) and box regression (L1), the region terms summed and
        divided by ``images x roi_batch_size``. ``gt_labels`` index the base classes."""
        features = self.pyramid(maps)
        targets = [{"boxes": b, "labels": lab + 1} for b, lab in zip(gt_boxes, gt_labels)]
        proposals, rpn_losses = self.rpn(ImageList(images, image_sizes), features, targets)
        boxes, labels, matched = sample_rois(proposals, gt_boxes, gt_labels, self.matcher, self.sampler)
        embeddings, deltas = self.regions(features, boxes)
        labels, boxes, matched = torch.cat(labels), torch.cat(boxes), torch.cat(matched)
        targets_cls = torch.where(labels > 0, labels - 1, self.num_base)  # background last
        weight = torch.ones(self.num_base + 1, device=labels.device)
        weight[-1] = bg_weight
        norm = len(images) * self.sampler.batch_size_per_image
        cls_loss = F.cross_entropy(self.logits(embeddings, self.embeddings(novel=False)), targets_cls, weight=weight,
                                   reduction="sum") / norm
        pos = labels > 0
        box_targets = self.box_coder.encode_single(matched[pos], boxes[pos])
        box_loss = F.l1_loss(deltas[pos].float(), box_targets, reduction="sum") / norm
        return {"rpn_cls_loss": rpn_losses["loss_objectness"], "rpn_box_loss": rpn_losses["loss_rpn_box_reg"],
                "cls_loss": cls_loss, "box_loss": box_loss}

    @torch.no_grad()
    def detect(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], maps: Sequence[torch.Tensor],
               clip_scores, vocabulary: torch.Tensor, base: torch.Tensor, alpha: float, beta: float,
               score_thr: float, nms: float, max_per_image: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image ``(boxes (K, 4) xyxy in input pixels, scores (K,), class indices (K,))`` into the rows of
        ``vocabulary`` ``(C + 1, D)`` (class embeddings then the background's: :meth:`vocabulary`).
        ``clip_scores(proposals) -> (R, C + 1)`` softmax scores of the frozen CLIP's regions; ``base`` ``(C + 1,)``
        marks the trained (base) classes and the background for :func:`ensemble_scores`."""
        features = self.pyramid(maps)
        proposals, _ = self.rpn(ImageList(images, image_sizes), features)
        embeddings, deltas = self.regions(features, proposals)
        learned = self.logits(embeddings, vocabulary).softmax(dim=-1)
        with torch.autocast(images.device.type, enabled=False):
            scores = ensemble_scores(learned, clip_scores(proposals).float(), base, alpha, beta)
        boxes = self.box_coder.decode_single(deltas.float(), torch.cat(proposals).float())
        out = []
        for i, (s, b) in enumerate(zip(scores.split([len(p) for p in proposals]),
                                       boxes.split([len(p) for p in proposals]))):
            out.append(multiclass_nms(clip_boxes_to_image(b, image_sizes[i]), s[:, :-1], score_thr, nms,
                                      max_per_image))
        return out


def multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, score_thr: float, iou: float,
                   max_num: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mmdet's ``multiclass_nms`` with class-agnostic boxes ``(R, 4)`` and scores ``(R, C)``: every (box, class)
    above ``score_thr``, NMS per class, the ``max_num`` highest kept."""
    index, classes = torch.where(scores > score_thr)
    kept_boxes, kept_scores = boxes[index], scores[index, classes]
    keep = batched_nms(kept_boxes, kept_scores, classes, iou)[:max_num]
    return kept_boxes[keep], kept_scores[keep], classes[keep]
