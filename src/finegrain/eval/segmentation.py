"""Open-vocabulary semantic segmentation without training, and the mIoU / mAcc / aAcc metric.

Each image goes through mmsegmentation's test pipeline as training-free CLIP segmenters run it (SCLIP,
ClearCLIP, ...), see :class:`SlideInference`:

1. resized keeping its aspect ratio so that the short side is ``short_side`` and the long side at most 2048
   (mmseg's ``Resize(scale=(2048, short_side), keep_ratio=True)``), bilinear, then normalised by the model's
   mean/std. The default 448 is the ``img_scale=(2048, 448)`` of GroupViT's and TCL's evaluation configs;
   SCLIP's configs use 336 (``short_side=336``);
2. ``inference="slide"``: windows of ``window`` pixels (default: the model's input size) every ``stride``
   (default: half the window, SCLIP's 224/112) placed as mmseg's ``slide_inference`` places them (the last
   row and column flush with the border; a window never larger than the image); ``"whole"``: one window, the
   image. A window whose sides are not multiples of the patch size is padded bottom/right with zeros (the mean
   colour after normalisation) and its logits cropped back;
3. per window, the L2-normalised patch features (``model.encode_dense``, ``"v_only"`` by default) against the
   ``(C, D)`` class text embeddings: cosine logits ``(C, h, w)``, upsampled bilinearly to the window, summed
   into the image and divided by the number of windows covering each pixel (raw cosine logits are averaged);
4. the logits upsampled bilinearly to the original image size, argmax.

The metric is mmseg's ``IoUMetric`` from a confusion matrix accumulated over all images, pixels labelled
``ignore_index`` left out: per class IoU = TP / (TP + FP + FN), averaged over the classes that occur in the
labels or the predictions (``miou``); per class accuracy = TP / (TP + FN), averaged over the classes present in
the labels (``macc``); ``aacc`` = correctly labelled pixels / labelled pixels. All percent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from finegrain.data.images import ImageError
from finegrain.data.records import RecordError
from finegrain.data.segmentation import SegmentationFolder, SegmentationSample
from finegrain.errors import DataError

from .classification import class_text_embeddings
from .encode import batched, evaluating, loaded_ahead, report_skipped
from .prompts import Templates, load_class_names

MAX_LONG_SIDE = 2048  # mmseg's Resize(scale=(2048, short_side), keep_ratio=True)
INFERENCE_MODES = ("slide", "whole")

WindowLogits = Callable[[torch.Tensor], torch.Tensor]
"""Normalised pixels ``(B, 3, h, w)`` -> class logits ``(B, C, h', w')`` at any resolution."""


def size_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or ``(height, width)`` -> ``(height, width)``; ``name`` is named in the error."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or min(pair) < 1:
        raise DataError(f"{name} must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def window_boxes(height: int, width: int, window: tuple[int, int],
                 stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """mmseg's sliding windows over an ``height x width`` image as ``(y0, x0, y1, x1)`` (ends exclusive):
    row starts ``0, s, 2s, ...`` while a window still has to start, the last one moved back to end at the
    border; each window is ``min(window, image)`` pixels."""
    (win_h, win_w), (step_h, step_w) = window, stride
    rows = max(height - win_h + step_h - 1, 0) // step_h + 1
    cols = max(width - win_w + step_w - 1, 0) // step_w + 1
    boxes = []
    for r in range(rows):
        y1 = min(r * step_h + win_h, height)
        for c in range(cols):
            x1 = min(c * step_w + win_w, width)
            boxes.append((max(y1 - win_h, 0), max(x1 - win_w, 0), y1, x1))
    return boxes


def image_tensor(image: Image.Image, device: str | torch.device) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` float32 in ``[0, 1]`` on ``device``."""
    return torch.from_numpy(np.array(image.convert("RGB"))).to(device).permute(2, 0, 1).float() / 255


def resize_short_side(maps: torch.Tensor, short_side: float, max_long_side: float = MAX_LONG_SIDE,
                      mode: str = "bilinear") -> torch.Tensor:
    """``(N, H, W)`` -> ``(N, H', W')`` keeping the aspect ratio: scaled by ``min(short_side / short,
    max_long_side / long)``, sides rounded (mmseg's ``keep_ratio`` rescale); ``mode`` "nearest" for labels."""
    height, width = maps.shape[-2:]
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    size = (int(height * scale + 0.5), int(width * scale + 0.5))
    corners = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(maps[None], size=size, mode=mode, **corners)[0]


@dataclass(frozen=True)
class SlideInference:
    """How an image becomes per-pixel logits (see the module docstring).

    mean, std: per-channel normalisation of ``[0, 1]`` pixels. patch_size: ``(ph, pw)``; windows are padded
    to multiples of it. short_side: resize target (None keeps the image size); max_long_side: the long side's
    limit. window: ``(h, w)``, or None for whole-image inference. stride: ``(h, w)``, at most the window.
    batch_size: windows per forward. ratios, flip: test-time augmentation (mmseg's ``MultiScaleFlipAug``):
    the image is also predicted at ``short_side`` and ``max_long_side`` times each ratio, and flipped, and the
    softmax probabilities of all views, upsampled to the image, are averaged; the default is one view.
    short_side_floor: with it, every view's short side is ``max(short_side_floor, short_side * ratio)`` and its
    long side unlimited (iBOT's ``SETR_Resize(setr_multi_scale=True)`` of its multi-scale test, the floor
    being the crop); without it, mmseg's ``Resize(keep_ratio=True)`` at each ratio.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: tuple[int, int]
    short_side: int | None = 448
    window: tuple[int, int] | None = (224, 224)
    stride: tuple[int, int] | None = (112, 112)
    batch_size: int = 16
    max_long_side: int = MAX_LONG_SIDE
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False
    short_side_floor: int | None = None

    def __post_init__(self):
        if self.short_side is not None and self.short_side < 1:
            raise DataError(f"short_side must be positive or None, got {self.short_side}")
        if self.batch_size < 1:
            raise DataError(f"batch_size must be positive, got {self.batch_size}")
        if not self.ratios or min(self.ratios) <= 0:
            raise DataError(f"ratios must be positive scale factors, got {self.ratios}")
        if self.window is not None and (self.stride is None or self.stride[0] > self.window[0]
                                        or self.stride[1] > self.window[1]):
            raise DataError(f"stride {self.stride} must be given and at most the window {self.window}, so "
                            "that the windows cover every pixel")

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(..., 3, H, W)`` pixels in ``[0, 1]`` -> normalised by ``mean`` / ``std``."""
        mean = torch.tensor(self.mean, device=pixels.device)[:, None, None]
        std = torch.tensor(self.std, device=pixels.device)[:, None, None]
        return (pixels - mean) / std

    def pixels(self, image: Image.Image, device: str | torch.device, ratio: float = 1.0) -> torch.Tensor:
        """RGB image -> resized (at ``ratio`` times the scale), normalised ``(3, H', W')`` float tensor on
        ``device``."""
        pixels = image_tensor(image, device)
        if self.short_side is not None:
            if self.short_side_floor is None:
                pixels = resize_short_side(pixels, self.short_side * ratio, self.max_long_side * ratio)
            else:
                short = max(self.short_side_floor, int(self.short_side * ratio))
                pixels = resize_short_side(pixels, short, float("inf"))
        return self.normalize(pixels)

    def logits(self, window_logits: WindowLogits, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``(3, H, W)`` -> ``(C, H, W)`` float32 logits, averaged where windows overlap."""
        height, width = pixels.shape[-2:]
        boxes = ([(0, 0, height, width)] if self.window is None
                 else window_boxes(height, width, self.window, self.stride))
        ph, pw = self.patch_size
        sums, counts = None, torch.zeros(height, width, device=pixels.device)
        for chunk in batched(boxes, self.batch_size):
            crops = torch.stack([pixels[:, y0:y1, x0:x1] for y0, x0, y1, x1 in chunk])
            crop_h, crop_w = crops.shape[-2:]
            crops = F.pad(crops, (0, -crop_w % pw, 0, -crop_h % ph))
            logits = F.interpolate(window_logits(crops).float(), size=crops.shape[-2:], mode="bilinear",
                                   align_corners=False)
            if sums is None:
                sums = logits.new_zeros(logits.shape[1], height, width)
            for (y0, x0, y1, x1), part in zip(chunk, logits):
                sums[:, y0:y1, x0:x1] += part[:, :crop_h, :crop_w]
                counts[y0:y1, x0:x1] += 1
        return sums / counts

    @property
    def views(self) -> list[tuple[float, bool]]:
        """The test-time views ``(ratio, flipped)``: each ratio, unflipped (and flipped with ``flip``)."""
        return [(ratio, flip) for ratio in self.ratios for flip in ((False, True) if self.flip else (False,))]

    def scores(self, window_logits: WindowLogits, image: Image.Image, device: str | torch.device) -> torch.Tensor:
        """``(C, H, W)`` float32 class scores of every pixel of ``image`` (its original size), on ``device``: the
        logits for one view, the mean of the views' softmax probabilities for several."""
        size = (image.height, image.width)
        total = None
        for ratio, flip in self.views:
            pixels = self.pixels(image, device, ratio)
            logits = self.logits(window_logits, pixels.flip(-1) if flip else pixels)
            logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
            logits = logits.flip(-1) if flip else logits
            if len(self.views) > 1:
                logits = logits.softmax(dim=0)
            total = logits if total is None else total + logits
        return total

    def predict(self, window_logits: WindowLogits, image: Image.Image, device: str | torch.device) -> torch.Tensor:
        """``(H, W)`` int64 class of every pixel of ``image`` (its original size), on ``device``."""
        return self.scores(window_logits, image, device).argmax(dim=0)


def slide_inference(model: nn.Module, inference: str = "slide", short_side: int | None = 448,
                    window: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    batch_size: int = 16) -> SlideInference:
    """A :class:`SlideInference` with the model's defaults: ``window`` the model's input size, ``stride``
    half the window, ``mean``/``std`` the model's preprocessing (``open_clip.get_model_preprocess_cfg``)."""
    if inference not in INFERENCE_MODES:
        raise DataError(f"inference must be one of {INFERENCE_MODES}, got {inference!r}")
    if mean is None or std is None:
        preprocess = open_clip.get_model_preprocess_cfg(model.clip)
        mean, std = mean or preprocess["mean"], std or preprocess["std"]
    window = size_pair(window if window is not None else model.image_size, "window")
    stride = size_pair(stride, "stride") if stride is not None else (max(1, window[0] // 2), max(1, window[1] // 2))
    return SlideInference(tuple(mean), tuple(std), tuple(model.patch_size), short_side,
                          window if inference == "slide" else None, stride, batch_size)


def dense_logits(model: nn.Module, classifier: torch.Tensor, dense_mode: str = "v_only") -> WindowLogits:
    """Window logits of open-vocabulary segmentation: ``model.encode_dense(pixels, dense_mode)``
    ``(B, D, h, w)`` against ``classifier`` ``(C, D)`` -> cosine logits ``(B, C, h, w)``."""
    classifier = classifier.float()

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bdhw,cd->bchw", model.encode_dense(pixels, dense_mode).float(), classifier)

    return logits


def predict_segmentation(model: nn.Module, image: Image.Image, classifier: torch.Tensor,
                         dense_mode: str = "v_only", inference: str = "slide", short_side: int | None = 448,
                         window: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
                         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                         batch_size: int = 16) -> torch.Tensor:
    """Open-vocabulary segmentation of one RGB image: ``(H, W)`` int64 index into the rows of ``classifier``
    ``(C, D)`` (e.g. :func:`finegrain.eval.class_text_embeddings`) for every pixel, on the classifier's device.
    Options as :func:`evaluate_segmentation`."""
    slide = slide_inference(model, inference, short_side, window, stride, mean, std, batch_size)
    with evaluating(model):
        return slide.predict(dense_logits(model, classifier, dense_mode), image, classifier.device)


class ConfusionMatrix:
    """``(C, C)`` pixel counts, rows the label, columns the prediction; ``ignore_index`` pixels left out."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"):
        if num_classes < 1:
            raise DataError(f"need at least one class, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, label: torch.Tensor, name: str = "labels") -> None:
        """Add one image: ``prediction`` and ``label`` ``(H, W)`` class indices; ``name`` (e.g. the label file)
        is named in the error raised for a label outside ``[0, C)`` that is not ``ignore_index``."""
        if prediction.shape != label.shape:
            raise ValueError(f"{name}: prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ "
                             "in shape")
        num = self.num_classes
        label = label.to(self.counts.device)
        valid = label != self.ignore_index
        target, predicted = label[valid], prediction.to(self.counts.device)[valid]
        for what, values in (("label", target), ("prediction", predicted)):
            outside = (values < 0) | (values >= num)
            if outside.any():
                raise DataError(f"{name}: {what} value {int(values[outside][0])} is not a class index in "
                                f"[0, {num - 1}] nor ignore_index {self.ignore_index} (wrong class list, or "
                                "reduce_zero_label?)")
        self.counts += torch.bincount(target * num + predicted, minlength=num * num).view(num, num)

    def per_class_iou(self) -> torch.Tensor:
        """``(C,)`` float64 IoU in percent; NaN for a class in neither the labels nor the predictions."""
        counts = self.counts.double()
        hits = counts.diagonal()
        union = counts.sum(0) + counts.sum(1) - hits
        return torch.where(union > 0, 100 * hits / union.clamp(min=1), torch.nan)

    def per_class_accuracy(self) -> torch.Tensor:
        """``(C,)`` float64 pixel accuracy (recall) in percent; NaN for a class absent from the labels."""
        counts = self.counts.double()
        total = counts.sum(1)
        return torch.where(total > 0, 100 * counts.diagonal() / total.clamp(min=1), torch.nan)

    def metrics(self) -> dict[str, float]:
        """``miou``, ``macc`` (means over the classes that have a value, as mmseg's ``nanmean``) and
        ``aacc``, percent."""
        labelled = int(self.counts.sum())
        if labelled == 0:
            raise DataError(f"no labelled pixels: every pixel was ignore_index {self.ignore_index}")
        return {"miou": self.per_class_iou().nanmean().item(), "macc": self.per_class_accuracy().nanmean().item(),
                "aacc": 100 * self.counts.diagonal().sum().item() / labelled}


@dataclass
class SegmentationResult:
    """A segmentation run: the confusion matrix over the images used, the class names and the counts."""

    confusion: ConfusionMatrix
    class_names: list[str]
    num_images: int
    skipped_images: int

    def metrics(self) -> dict[str, float]:
        """``miou``, ``macc``, ``aacc`` (percent), ``num_images``, ``skipped_images``."""
        return {**self.confusion.metrics(), "num_images": self.num_images, "skipped_images": self.skipped_images}

    def per_class(self) -> dict[str, dict[str, float | None]]:
        """``{class name: {"iou": ..., "acc": ...}}`` in percent; None where the class has no value."""
        iou, acc = self.confusion.per_class_iou().tolist(), self.confusion.per_class_accuracy().tolist()
        return {name: {"iou": None if np.isnan(i) else i, "acc": None if np.isnan(a) else a}
                for name, i, a in zip(self.class_names, iou, acc, strict=True)}


def _load_pair(dataset: SegmentationFolder, index: int) -> SegmentationSample | ImageError | RecordError:
    try:
        return dataset[index]
    except (ImageError, RecordError) as e:
        return e


def segment_dataset(window_logits: WindowLogits, dataset: SegmentationFolder, class_names: Sequence[str],
                    slide: SlideInference, device: str | torch.device = "cpu", progress: bool = True,
                    task: str = "segmentation") -> SegmentationResult:
    """Predict every image of ``dataset`` (a :class:`SegmentationFolder`, or any sequence of
    :class:`SegmentationSample` with an ``ignore_index``) with ``window_logits`` through ``slide`` and accumulate
    the confusion matrix; pairs that cannot be read (:class:`ImageError`, :class:`RecordError`) are skipped,
    counted and reported (see :func:`finegrain.eval.encode.report_skipped`)."""
    confusion = ConfusionMatrix(len(class_names), dataset.ignore_index, device)
    skipped: list[str] = []
    samples = loaded_ahead(functools.partial(_load_pair, dataset), range(len(dataset)))
    for sample in tqdm(samples, total=len(dataset), desc=task, unit="img", disable=not progress):
        if isinstance(sample, (ImageError, RecordError)):
            skipped.append(str(sample))
            continue
        confusion.update(slide.predict(window_logits, sample.image, device), sample.label, str(sample.label_path))
    report_skipped(task, skipped, len(dataset))
    return SegmentationResult(confusion, list(class_names), len(dataset) - len(skipped), len(skipped))


def run_segmentation(model: nn.Module, dataset: SegmentationFolder,
                     tokenizer: Callable[[list[str]], torch.Tensor], class_names: str | Sequence[str] | None = None,
                     templates: str | Sequence[str] | Templates = "openai", dense_mode: str = "v_only",
                     inference: str = "slide", short_side: int | None = 448,
                     window: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     batch_size: int = 16, device: str | torch.device = "cpu",
                     progress: bool = True) -> SegmentationResult:
    """Open-vocabulary segmentation of ``dataset`` (see :func:`evaluate_segmentation`), returning the
    :class:`SegmentationResult` (confusion matrix, per-class values)."""
    names = load_class_names(dataset.class_names if class_names is None else class_names)
    slide = slide_inference(model, inference, short_side, window, stride, mean, std, batch_size)
    with evaluating(model):
        classifier = class_text_embeddings(model, tokenizer, names, templates, batch_size=64, device=device,
                                           progress=progress)
        return segment_dataset(dense_logits(model, classifier, dense_mode), dataset, names, slide, device,
                               progress, "segmentation")


def evaluate_segmentation(model: nn.Module, dataset: SegmentationFolder,
                          tokenizer: Callable[[list[str]], torch.Tensor],
                          class_names: str | Sequence[str] | None = None,
                          templates: str | Sequence[str] | Templates = "openai", dense_mode: str = "v_only",
                          inference: str = "slide", short_side: int | None = 448,
                          window: int | Sequence[int] | None = None, stride: int | Sequence[int] | None = None,
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          batch_size: int = 16, device: str | torch.device = "cpu",
                          progress: bool = True) -> dict[str, float]:
    """Open-vocabulary semantic segmentation without training: ``miou``, ``macc``, ``aacc`` (percent),
    ``num_images`` and ``skipped_images`` over ``dataset`` (see the module docstring for the pipeline).

    Args:
        class_names: the class list (built-in name, file or names); default the dataset's.
        templates: prompt templates of the text classifier (default the 80 OpenAI ImageNet prompts, as SCLIP
            and MaskCLIP use).
        dense_mode: ``"v_only"`` (MaskCLIP / CLIPSelf last block) or ``"plain"``.
        inference: ``"slide"`` or ``"whole"``.
        short_side: resize the short side to this (long side at most 2048); None keeps the image size.
        window, stride: slide window and stride in pixels (int or ``(h, w)``); default the model's input size
            and half of it.
        mean, std: pixel normalisation; default the model's.
        batch_size: windows per forward pass.
    """
    return run_segmentation(model, dataset, tokenizer, class_names, templates, dense_mode, inference, short_side,
                            window, stride, mean, std, batch_size, device, progress).metrics()
