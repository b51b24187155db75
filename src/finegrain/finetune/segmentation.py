"""Semantic segmentation fine-tuning (``method.name: finetune-seg``): a UperNet or a linear head on a finegrain
backbone, BEiT's / iBOT's ADE20K protocol.

Heads (``head``):

- ``upernet``: the simple feature pyramid of the chosen blocks (strides patch/4 .. 2 x patch,
  :class:`~finegrain.models.backbone.ViTBackbone`) into transformers' ``UperNetHead`` (PPM on the last level +
  FPN, ``channels`` wide), plus the auxiliary ``UperNetFCNHead`` (one 3x3 conv of ``aux_channels`` on pyramid
  level ``aux_level``) whose loss counts ``aux_weight``; both classify after a ``Dropout2d(dropout)`` as mmseg's
  ``BaseDecodeHead.cls_seg``. transformers' heads are mmseg's ``UPerHead`` / ``FCNHead`` module for module;
  segmentation_models_pytorch's UPerNet decoder is not (its own PPM / FPN variant adds convolutions and
  normalisations mmseg's has not), so the BEiT / iBOT numbers are reproduced with transformers'.
- ``linear``: iBOT's linear protocol: the block maps (no pyramid) resized to the first's grid, concatenated,
  ``BatchNorm2d`` (``linear_batch_norm``) and a 1x1 conv, on a frozen backbone (``backbone.frozen``).

Padded pixels are set to 0 after normalisation (mmseg pads normalised images). The logits are upsampled
bilinearly to the crop and trained with cross entropy over the pixels that are not ``ignore_index``, divided by
all pixels of the crops (mmseg 0.x's ``mean`` reduction, which iBOT trained with). Evaluation (``train.eval_tasks: [segmentation]``) predicts every held-out record with a
``label_map`` by mmseg's test pipeline (:class:`~finegrain.eval.segmentation.SlideInference`: keep-ratio resize to
``test_scale``, sliding ``test_window`` every ``test_stride``, optionally several ``test_ratios`` and
``test_flip``) and gives mIoU / mAcc / aAcc; pairs that cannot be read, label maps of another size than their
image, label values beyond the classes and label maps without a labelled pixel are skipped and counted
(``skipped_images``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

from ..data.dense import read_label
from ..data.images import load_image
from ..data.records import Record, RecordError
from ..data.segmentation import SegmentationSample
from ..errors import DataError
from ..eval.encode import check_usable
from ..eval.prompts import load_class_names
from ..eval.segmentation import SlideInference, segment_dataset
from ..models import FinegrainCLIP
from ..objectives import EvalContext, Progress, register_method
from ..sample_spec import DenseTargets, SampleSpec
from .base import DenseTask, TaskOptions, convert_norms, zero_padding

HEADS = ("upernet", "linear")
TEST_RESIZES = ("keep_ratio", "setr")


@dataclass
class SegmentationOptions(TaskOptions):
    """``method.*`` of ``finetune-seg``; defaults are iBOT's ADE20K UperNet recipe for ViT-B/16 (see
    docs/finetune.md for the source of each value)."""

    head: str = "upernet"  # upernet | linear
    num_classes: int = 150
    class_names: str | list[str] | None = "ade20k-150"  # a built-in list, a file or the names; None: numbers
    reduce_zero_label: bool = True  # label 0 ignored, 1..C -> 0..C-1 (ADE20K, Pascal Context)
    ignore_index: int = 255
    # training augmentation (mmseg's ADE20K pipeline, see finegrain.sample_spec.DenseTargets)
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    crop: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    flip: float = 0.5
    photometric: bool = True
    # UperNet decoder and auxiliary FCN head
    channels: int = 768
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    dropout: float = 0.1
    aux_weight: float = 0.4  # 0: no auxiliary head
    aux_channels: int = 256
    aux_level: int = 2  # the pyramid level the auxiliary head reads (stride = patch size)
    linear_batch_norm: bool = True  # linear head: BatchNorm2d before the 1x1 conv
    # test: keep-ratio resize to (long, short), sliding windows, optional multi-scale + flip
    test_scale: tuple[int, int] = (2048, 512)
    test_window: tuple[int, int] = (512, 512)
    test_stride: tuple[int, int] = (341, 341)
    test_ratios: list[float] = field(default_factory=lambda: [1.0])
    test_flip: bool = False
    # keep_ratio: each view resized as mmseg's Resize(keep_ratio=True) at test_scale x ratio; setr: iBOT's
    # SETR_Resize of its multi-scale configs (short side at least the window's, no long-side limit)
    test_resize: str = "keep_ratio"


def _classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """mmseg's ``cls_seg``: ``Dropout2d`` then a 1x1 conv initialised N(0, 0.01), bias 0."""
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(dropout), conv)


class UperNetDecoder(nn.Module):
    """transformers' UperNet head (and auxiliary FCN head) on four pyramid levels of ``in_channels``:
    ``[(B, W, h_i, w_i)]`` -> ``(B, C, h_0, w_0)`` logits and the auxiliary ``(B, C, h_a, w_a)`` (None without)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 768,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1, aux_channels: int = 256,
                 aux_level: int | None = 2):
        super().__init__()
        config = UperNetConfig(num_labels=num_classes, hidden_size=channels, pool_scales=list(pool_scales),
                               auxiliary_channels=aux_channels, auxiliary_num_convs=1,
                               auxiliary_concat_input=False)
        levels = [in_channels] * 4
        self.decode = UperNetHead(config, levels)
        self.decode.classifier = _classifier(channels, num_classes, dropout)
        self.auxiliary = None
        if aux_level is not None:
            self.auxiliary = UperNetFCNHead(config, levels, in_index=aux_level)
            self.auxiliary.classifier = _classifier(aux_channels, num_classes, dropout)
        for module in self.modules():  # the convolutions before a norm: mmcv ConvModule's initialisation
            if isinstance(module, nn.Conv2d) and module.bias is None:
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        maps = list(maps)
        return self.decode(maps), None if self.auxiliary is None else self.auxiliary(maps)


class LinearSegmentationHead(nn.Module):
    """Resize-concatenate feature maps, BatchNorm2d (optional), 1x1 conv: ``[(B, W_i, h_i, w_i)]`` ->
    ``(B, C, h_0, w_0)`` logits (iBOT's linear head, mmseg's ``resize_concat``; the conv initialised as
    mmseg's ``conv_seg``)."""

    def __init__(self, in_channels: int, num_classes: int, batch_norm: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels) if batch_norm else nn.Identity()
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, None]:
        size = maps[0].shape[-2:]
        features = torch.cat([maps[0], *(F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                                         for m in maps[1:])], dim=1)
        return self.classifier(self.norm(features)), None


def pixel_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``(B, C, h, w)`` logits upsampled bilinearly to ``label`` ``(B, H, W)``; cross entropy summed over the
    pixels that are not ``ignore_index`` and divided by all ``B H W`` pixels (mmseg 0.x's ``CrossEntropyLoss``:
    ignored pixels count 0 in the mean)."""
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="sum") / label.numel()


class LabelledRecords:
    """Held-out records with a ``label_map`` as the image / label pairs
    :func:`~finegrain.eval.segmentation.segment_dataset` reads: ``[i]`` loads pair ``i``, raising
    :class:`~finegrain.data.images.ImageError` or :class:`RecordError` for a pair that cannot be used."""

    def __init__(self, records: Sequence[Record], root: Path, dense: DenseTargets):
        self.records, self.root, self.dense = records, Path(root), dense
        self.ignore_index = dense.ignore_index

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SegmentationSample:
        record = self.records[index]
        key = record.key or record.image
        if record.label_map is None:
            raise RecordError(f"{key}: field 'label_map' is missing (segmentation needs a label map per image)")
        image = load_image(self.root / record.image)
        label_path = self.root / record.label_map
        return SegmentationSample(key, image, read_label(label_path, image.width, image.height, self.dense),
                                  label_path)


@register_method("finetune-seg")
class SegmentationTask(DenseTask):
    """Semantic segmentation: a UperNet or linear head on the model's vision tower (see the module docstring).
    Losses: ``seg_loss`` and, with the auxiliary head, ``aux_loss`` (already weighted)."""

    Options = SegmentationOptions
    evaluations = ("segmentation",)

    def __init__(self, options: SegmentationOptions, model: FinegrainCLIP):
        if options.head not in HEADS:
            raise DataError(f"method.head must be one of {HEADS}, got {options.head!r}")
        if options.num_classes < 1:
            raise DataError(f"method.num_classes must be positive, got {options.num_classes}")
        names = (load_class_names(options.class_names) if options.class_names is not None
                 else [str(i) for i in range(options.num_classes)])
        if len(names) != options.num_classes:
            raise DataError(f"method.class_names {options.class_names!r} has {len(names)} names but "
                            f"method.num_classes is {options.num_classes}")
        if not 0 <= options.aux_level < 4:
            raise DataError(f"method.aux_level must name a pyramid level 0..3, got {options.aux_level}")
        if options.test_resize not in TEST_RESIZES:
            raise DataError(f"method.test_resize must be one of {TEST_RESIZES}, got {options.test_resize!r}")
        super().__init__(options, model)
        self.class_names = names
        width = self.backbone.out_channels
        if options.head == "upernet":
            self.head = UperNetDecoder(width, options.num_classes, options.channels, options.pool_scales,
                                       options.dropout, options.aux_channels,
                                       options.aux_level if options.aux_weight > 0 else None)
        else:
            blocks = len(self.backbone.block_indices)  # a shallow tower may read a block twice
            self.head = LinearSegmentationHead(blocks * width, options.num_classes,
                                               options.linear_batch_norm)
        convert_norms(self, options.norm)  # the pyramid's and heads' BatchNorm2d
        preprocess = open_clip.get_model_preprocess_cfg(model.clip)
        self.mean, self.std = tuple(preprocess["mean"]), tuple(preprocess["std"])
        self.patch_size = tuple(model.patch_size)

    @property
    def pyramid(self) -> bool:
        return self.options.head == "upernet"

    def dense_targets(self) -> DenseTargets:
        opts = self.options
        return DenseTargets("segmentation", opts.num_classes, ignore_index=opts.ignore_index,
                            reduce_zero_label=opts.reduce_zero_label, scale=opts.scale, ratio_range=opts.ratio_range,
                            crop=opts.crop, cat_max_ratio=opts.cat_max_ratio, flip=opts.flip,
                            photometric=opts.photometric, pad=opts.crop)

    def sample_spec(self) -> SampleSpec:
        return SampleSpec(augment="none", caption="none", dense=self.dense_targets())

    def logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised ``(B, 3, H, W)`` -> the head's logits and the auxiliary head's (or None), at the
        resolution of the first map."""
        with torch.no_grad() if self.options.backbone.frozen else contextlib.nullcontext():
            maps = list(self.backbone(images).values())
        return self.head(maps)

    def forward(self, model: FinegrainCLIP, batch: dict[str, torch.Tensor],
                progress: Progress) -> dict[str, torch.Tensor]:
        label, ignore = batch["label"], self.options.ignore_index
        sizes = [(int(h), int(w)) for h, w in batch["image_size"].tolist()]
        main, auxiliary = self.logits(zero_padding(batch["image"], sizes))
        losses = {"seg_loss": pixel_cross_entropy(main, label, ignore)}
        if auxiliary is not None:
            losses["aux_loss"] = self.options.aux_weight * pixel_cross_entropy(auxiliary, label, ignore)
        return losses

    def slide_inference(self, batch_size: int) -> SlideInference:
        """mmseg's test pipeline with this task's test settings."""
        opts = self.options
        long_side, short_side = max(opts.test_scale), min(opts.test_scale)
        floor = min(opts.test_window) if opts.test_resize == "setr" else None
        return SlideInference(self.mean, self.std, self.patch_size, short_side, tuple(opts.test_window),
                              tuple(opts.test_stride), batch_size, long_side, tuple(opts.test_ratios),
                              opts.test_flip, floor)

    def window_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """The head's logits of normalised windows (what slide inference averages)."""
        return self.logits(pixels)[0]

    def predict(self, image, device: str | torch.device, batch_size: int = 16) -> torch.Tensor:
        """``(H, W)`` int64 class of every pixel of an RGB image (its size)."""
        return self.slide_inference(batch_size).predict(self.window_logits, image, device)

    def evaluate(self, task: str, model: FinegrainCLIP, context: EvalContext) -> dict[str, float]:
        """``segmentation``: ``miou``, ``macc``, ``aacc`` (percent), ``num_images``, ``skipped_images`` over
        the held-out records."""
        if task != "segmentation":
            return super().evaluate(task, model, context)
        pairs = LabelledRecords(context.records, context.root, self.dense_targets())
        result = segment_dataset(self.window_logits, pairs, self.class_names,
                                 self.slide_inference(context.batch_size), context.device, context.progress)
        metrics = result.metrics()  # the held-out records the reader left out are counted with the skipped pairs
        return {**metrics, "skipped_images": metrics["skipped_images"] + context.skipped}

    def check_held_out(self, task: str, context: EvalContext) -> None:
        """One held-out image / label-map pair at least must be usable (readable, the same size, classes in range,
        a labelled pixel): otherwise the evaluation would fail after training."""
        if task == "segmentation":
            pairs = LabelledRecords(context.records, context.root, self.dense_targets())
            check_usable(task, range(len(pairs)), pairs.__getitem__, f"data.val.path={context.path}")


