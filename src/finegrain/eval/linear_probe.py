"""Linear-probe semantic segmentation on frozen intermediate features (iBOT's linear protocol, which
DetailCLIP follows: ``bytedance/ibot`` ``evaluation/semantic_segmentation/configs/linear``).

Head (:class:`LinearSegmentationHead`): the patch tokens of chosen blocks (``forward_intermediates``, no
final norm; default 0-based ``[3, 5, 7, 11]`` = iBOT's blocks 4/6/8/12, and for a tower of another depth the
blocks at the same fractions of it, e.g. ``[7, 11, 15, 23]`` for 24 blocks), each resized bilinearly to the
first's grid and concatenated (mmseg's ``resize_concat``), ``BatchNorm2d``, a 1x1 ``Conv2d`` to the classes
(weights N(0, 0.01), bias 0, as mmseg's ``conv_seg``). The logits are upsampled bilinearly to the crop and
trained with cross entropy, ignored pixels contributing 0 and the mean taken over all pixels (mmseg's
default ``avg_non_ignore=False``).

Training: the model is frozen (eval mode, no gradients); features are computed on the fly every iteration
from freshly augmented crops, never cached: each image is rescaled so its short side is ``short_side``
times a ratio drawn from ``ratio_range`` (long side at most 2048 times it), randomly cropped to
``crop_size`` (padded with zeros / ``ignore_index`` when smaller), flipped horizontally with probability
1/2, normalised. Images are drawn in shuffled epochs. AdamW (lr 7e-4, weight decay 0.05, as iBOT) or SGD
(momentum 0.9; lr 0.01, weight decay 5e-4, mmseg's defaults), a linear warmup from 1e-6 of the lr
(mmcv's) then poly decay ``(1 - i / iterations) ** power`` (iBOT: power 1.0). Every random draw comes from
one generator seeded with ``seed``, so a run is repeatable (exactly on CPU; CUDA's bilinear backward is not
deterministic).

Evaluation: the validation split through :class:`finegrain.eval.segmentation.SlideInference` with the
head as window classifier: short side ``short_side``, windows ``crop_size`` every 2/3 of it (iBOT's
512 / 341), logits averaged, upsampled to the image, argmax; metric as open-vocabulary segmentation.

Deviations from iBOT's recipe, all in the schedule's scale: far fewer iterations (``iterations``, default
2000 rather than 160k, warmup scaled by the same fraction), the crop defaults to the model's input size (iBOT:
512), no photometric distortion nor RandomCrop's ``cat_max_ratio`` retries, BatchNorm over one device's batch
(not SyncBN).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from finegrain.data.images import ImageError
from finegrain.data.segmentation import SegmentationFolder, SegmentationSample

from .encode import evaluating, report_skipped
from .prompts import load_class_names
from .segmentation import (
    MAX_LONG_SIDE,
    SegmentationResult,
    SlideInference,
    image_tensor,
    resize_short_side,
    segment_dataset,
    size_pair,
    slide_inference,
)

IBOT_BLOCKS = (4, 6, 8, 12)  # 1-based, of 12 blocks
OPTIMIZER_DEFAULTS = {"adamw": (7e-4, 0.05), "sgd": (0.01, 5e-4)}  # (lr, weight decay)
IBOT_WARMUP_FRACTION = 1500 / 160_000
WARMUP_RATIO = 1e-6


def probe_blocks(num_layers: int, blocks: Sequence[int] | None = None) -> list[int]:
    """Sorted distinct 0-based block indices: ``blocks`` checked against the depth, or (None) iBOT's
    4/6/8/12 of 12 at the same fractions of ``num_layers`` blocks."""
    if blocks is None:
        return sorted({max(1, round(num_layers * b / 12)) - 1 for b in IBOT_BLOCKS})
    chosen = sorted(set(blocks))
    if not chosen or chosen[0] < 0 or chosen[-1] >= num_layers:
        raise ValueError(f"linear probe blocks {list(blocks)}: the model has {num_layers} blocks, so give 0-based "
                         f"indices in [0, {num_layers - 1}], or no blocks for iBOT's 4/6/8/12 scaled to the depth")
    return chosen


class LinearSegmentationHead(nn.Module):
    """Resize-concatenate feature maps, BatchNorm2d (optional), 1x1 conv: ``[(B, W_i, h_i, w_i)]`` ->
    ``(B, C, h_0, w_0)`` logits."""

    def __init__(self, in_channels: int, num_classes: int, batch_norm: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels) if batch_norm else nn.Identity()
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        features = torch.cat([maps[0], *(F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                                         for m in maps[1:])], dim=1)
        return self.classifier(self.norm(features))


def learning_rate(iteration: int, lr: float, iterations: int, warmup_iterations: int, power: float) -> float:
    """mmcv's poly schedule with linear warmup: ``lr * (1 - i / iterations) ** power``, times
    ``1e-6 + (1 - 1e-6) * i / warmup`` during the warmup."""
    rate = lr * (1 - iteration / iterations) ** power
    if iteration < warmup_iterations:
        rate *= WARMUP_RATIO + (1 - WARMUP_RATIO) * iteration / warmup_iterations
    return rate


@dataclass
class LinearProbeResult:
    """The trained head, its blocks, the loss of every iteration and the validation result."""

    head: LinearSegmentationHead
    blocks: list[int]
    losses: list[float]
    validation: SegmentationResult
    skipped_train_images: int

    def metrics(self) -> dict[str, float]:
        """Validation ``miou``, ``macc``, ``aacc`` (percent), ``num_images``, ``skipped_images``; and
        ``train_loss`` (mean over the last tenth of the iterations), ``skipped_train_images``."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return {**self.validation.metrics(), "train_loss": sum(tail) / len(tail),
                "skipped_train_images": self.skipped_train_images}


class _TrainCrops:
    """Augmented training crops drawn in shuffled epochs; unreadable pairs are skipped and remembered."""

    def __init__(self, dataset: SegmentationFolder, slide: SlideInference, crop: tuple[int, int],
                 ratio_range: tuple[float, float], flip: bool, generator: torch.Generator,
                 device: str | torch.device):
        self.dataset, self.slide, self.crop, self.ratio_range, self.flip = dataset, slide, crop, ratio_range, flip
        self.generator, self.device = generator, device
        self.skipped: dict[int, str] = {}
        self.order = self._shuffled()

    def _shuffled(self) -> Iterator[int]:
        while True:
            yield from torch.randperm(len(self.dataset), generator=self.generator).tolist()

    def _sample(self) -> SegmentationSample:
        while True:
            i = next(self.order)
            if i in self.skipped:
                continue
            try:
                return self.dataset[i]
            except ImageError as e:
                self.skipped[i] = str(e)
                if len(self.skipped) == len(self.dataset):  # raises: nothing left to train on
                    report_skipped("linear_probe train", list(self.skipped.values()), len(self.dataset))

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=self.generator).item()

    def crop_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented ``(3, h, w)`` normalised crop and its ``(h, w)`` label."""
        sample = self._sample()
        ratio = self._uniform(*self.ratio_range)
        short_side = self.slide.short_side * ratio
        pixels = resize_short_side(image_tensor(sample.image, self.device), short_side, MAX_LONG_SIDE * ratio)
        label = resize_short_side(sample.label.to(self.device)[None].float(), short_side, MAX_LONG_SIDE * ratio,
                                  mode="nearest")[0].long()
        (crop_h, crop_w), (height, width) = self.crop, label.shape
        top = int(torch.randint(0, max(height - crop_h, 0) + 1, (), generator=self.generator))
        left = int(torch.randint(0, max(width - crop_w, 0) + 1, (), generator=self.generator))
        pixels, label = pixels[:, top:top + crop_h, left:left + crop_w], label[top:top + crop_h, left:left + crop_w]
        if self.flip and torch.rand((), generator=self.generator).item() < 0.5:
            pixels, label = pixels.flip(-1), label.flip(-1)
        pad = (0, crop_w - label.shape[1], 0, crop_h - label.shape[0])
        return (F.pad(self.slide.normalize(pixels), pad),
                F.pad(label, pad, value=self.dataset.ignore_index))

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, h, w)`` crops and ``(B, h, w)`` labels."""
        pixels, labels = zip(*(self.crop_pair() for _ in range(size)))
        return torch.stack(pixels), torch.stack(labels)


def linear_probe(model: nn.Module, train: SegmentationFolder, val: SegmentationFolder,
                 blocks: Sequence[int] | None = None, iterations: int = 2000, batch_size: int = 16,
                 optimizer: str = "adamw", lr: float | None = None, weight_decay: float | None = None,
                 warmup_iterations: int | None = None, power: float = 1.0,
                 crop_size: int | Sequence[int] | None = None, short_side: int | None = None,
                 ratio_range: tuple[float, float] = (0.5, 2.0), flip: bool = True, batch_norm: bool = True,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", progress: bool = True) -> LinearProbeResult:
    """Train a linear segmentation head on ``train`` over the frozen ``model`` and evaluate it on ``val``
    (see the module docstring and :func:`evaluate_linear_probe` for the options)."""
    if optimizer not in OPTIMIZER_DEFAULTS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_DEFAULTS)}, got {optimizer!r}")
    if iterations < 1 or batch_size < 1:
        raise ValueError(f"iterations and batch_size must be positive, got {iterations} and {batch_size}")
    if not 0 < ratio_range[0] <= ratio_range[1]:
        raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
    names = load_class_names(train.class_names)
    if len(load_class_names(val.class_names)) != len(names):
        raise ValueError(f"train and val class lists differ in length: {train.class_names!r} vs {val.class_names!r}")
    chosen = probe_blocks(model.tower.num_layers, blocks)
    crop = size_pair(crop_size if crop_size is not None else model.image_size, "crop_size")
    stride = (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
    slide = slide_inference(model, "slide", short_side or max(crop), crop, stride, mean, std, batch_size)
    default_lr, default_decay = OPTIMIZER_DEFAULTS[optimizer]
    lr = default_lr if lr is None else lr
    warmup = round(iterations * IBOT_WARMUP_FRACTION) if warmup_iterations is None else warmup_iterations

    generator = torch.Generator().manual_seed(seed)
    head = LinearSegmentationHead(len(chosen) * model.tower.width, len(names), batch_norm, generator).to(device)
    params = {"lr": lr, "weight_decay": default_decay if weight_decay is None else weight_decay}
    opt = (torch.optim.AdamW(head.parameters(), **params) if optimizer == "adamw"
           else torch.optim.SGD(head.parameters(), momentum=0.9, **params))
    crops = _TrainCrops(train, slide, crop, ratio_range, flip, generator, device)

    def features(pixels: torch.Tensor) -> list[torch.Tensor]:
        return [m.float() for m in model.forward_intermediates(pixels, chosen)]

    losses = []
    with evaluating(model):
        head.train()
        bar = trange(iterations, desc="linear probe", unit="it", disable=not progress)
        for iteration in bar:
            for group in opt.param_groups:
                group["lr"] = learning_rate(iteration, lr, iterations, warmup, power)
            pixels, labels = crops.batch(batch_size)
            maps = features(pixels)
            with torch.enable_grad():
                logits = F.interpolate(head(maps), size=labels.shape[-2:], mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits, labels, ignore_index=train.ignore_index, reduction="none").mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        report_skipped("linear_probe train", list(crops.skipped.values()), len(train))
        head.eval()
        validation = segment_dataset(lambda pixels: head(features(pixels)), val, names, slide, device, progress,
                                     "linear_probe")
    return LinearProbeResult(head, chosen, losses, validation, len(crops.skipped))


def evaluate_linear_probe(model: nn.Module, train: SegmentationFolder, val: SegmentationFolder,
                          blocks: Sequence[int] | None = None, iterations: int = 2000, batch_size: int = 16,
                          optimizer: str = "adamw", lr: float | None = None, weight_decay: float | None = None,
                          warmup_iterations: int | None = None, power: float = 1.0,
                          crop_size: int | Sequence[int] | None = None, short_side: int | None = None,
                          ratio_range: tuple[float, float] = (0.5, 2.0), flip: bool = True,
                          batch_norm: bool = True, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None, seed: int = 0, device: str | torch.device = "cpu",
                          progress: bool = True) -> dict[str, float]:
    """Linear-probe segmentation: validation ``miou``, ``macc``, ``aacc`` (percent), ``num_images``,
    ``skipped_images``, plus ``train_loss`` and ``skipped_train_images``.

    Args:
        train, val: the two splits (same class list).
        blocks: 0-based block indices; default iBOT's 4/6/8/12 scaled to the model's depth.
        iterations, batch_size: the schedule (batch_size is also the windows per forward at evaluation).
        optimizer: ``"adamw"`` or ``"sgd"``; lr / weight_decay default to 7e-4 / 0.05 (AdamW, iBOT) or
            0.01 / 5e-4 (SGD, mmseg).
        warmup_iterations: linear warmup; default iBOT's 1500/160k of ``iterations``. power: poly decay power.
        crop_size: training crop and evaluation window (int or ``(h, w)``); default the model's input size.
        short_side: short side images are scaled to (times the random ratio in training); default the crop's
            larger side.
        ratio_range: random rescale ratios; flip: random horizontal flips.
        batch_norm: BatchNorm2d before the 1x1 conv.
        mean, std: pixel normalisation; default the model's. seed: every random draw of the run.
    """
    return linear_probe(model, train, val, blocks, iterations, batch_size, optimizer, lr, weight_decay,
                        warmup_iterations, power, crop_size, short_side, ratio_range, flip, batch_norm, mean, std,
                        seed, device, progress).metrics()
