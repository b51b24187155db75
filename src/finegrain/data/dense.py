"""Fine-tuning samples: an image with its label map or its instances (boxes, classes, masks), augmented together.

:class:`DenseSampleBuilder` is the sample builder of a method whose :class:`~finegrain.sample_spec.SampleSpec`
has ``dense`` targets (see :class:`~finegrain.sample_spec.DenseTargets` for the pipeline and the keys). Every
random draw comes from torch's CPU generator, which the caller seeds per sample, so a sample is a pure function
of (record, seed). The geometry of each step is a :class:`~finegrain.data.geometry.Geometry`, so boxes follow
the pixels exactly; label maps and masks are resized nearest-neighbour, images bilinearly (as mmseg / mmdet do).

Bad targets raise :class:`~finegrain.data.records.RecordError` naming the file and field (the record is skipped
and counted): a label map of another size than its image, label values beyond the class count, a label map
without a labelled pixel. A region mask that does not decode drops that instance only (a bad region, counted).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms import functional as TF

from ..sample_spec import MIN_IMAGE_SIDE, DenseTargets, SampleSpec
from .geometry import Geometry
from .images import original_size
from .records import Record, RecordError, check_record_size, fit_boxes
from .sample import seeded_cpu_rng
from .segmentation import read_label_map

CROP_TRIES = 10  # mmseg's RandomCrop: crops drawn at most this often to meet cat_max_ratio


@dataclass
class DenseSample:
    """An image and its targets in one pixel frame. ``image`` uint8 ``(3, H, W)``; ``label`` int64 ``(H, W)``
    or None; ``boxes`` float ``(N, 4)`` xyxy; ``classes`` int64 ``(N,)``; ``masks`` uint8 ``(N, H, W)`` or None;
    ``size`` the ``(H, W)`` of the content (before padding)."""

    image: torch.Tensor
    label: torch.Tensor | None
    boxes: torch.Tensor
    classes: torch.Tensor
    masks: torch.Tensor | None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.shape[-2], self.image.shape[-1]

    def map_boxes(self, geometry: Geometry) -> DenseSample:
        """Boxes moved by ``geometry``; those left without area are removed with their class and mask."""
        boxes, kept, _ = geometry.map_boxes(self.boxes)
        return replace(self, boxes=boxes[kept], classes=self.classes[kept],
                       masks=None if self.masks is None else self.masks[kept])


def keep_ratio_size(width: int, height: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's ``rescale_size``: the ``(width, height)`` that fits ``scale`` ``(long, short)`` edges keeping the
    aspect ratio (factor ``min(long / max(w, h), short / min(w, h))``, sizes rounded half up)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize(sample: DenseSample, width: int, height: int) -> DenseSample:
    """Resize everything to ``width x height`` (image bilinear without antialiasing, as cv2; labels and masks
    nearest)."""
    h, w = sample.size
    image = F.interpolate(sample.image[None].float(), size=(height, width), mode="bilinear", align_corners=False)
    nearest = {"size": (height, width), "mode": "nearest"}
    label = None if sample.label is None else F.interpolate(sample.label[None, None].float(), **nearest)[0, 0].long()
    masks = sample.masks
    if masks is not None:
        masks = (F.interpolate(masks[None].float(), **nearest)[0].to(torch.uint8) if len(masks)
                 else masks.new_zeros(0, height, width))
    out = DenseSample(image[0].round().clamp(0, 255).to(torch.uint8), label, sample.boxes, sample.classes, masks)
    return out.map_boxes(Geometry(width / w, height / h, 0.0, 0.0, width, height))


def crop(sample: DenseSample, top: int, left: int, height: int, width: int) -> DenseSample:
    region = (..., slice(top, top + height), slice(left, left + width))
    out = DenseSample(sample.image[region], None if sample.label is None else sample.label[region], sample.boxes,
                      sample.classes, None if sample.masks is None else sample.masks[region])
    return out.map_boxes(Geometry(1.0, 1.0, left, top, width, height))


def hflip(sample: DenseSample) -> DenseSample:
    h, w = sample.size
    out = DenseSample(sample.image.flip(-1), None if sample.label is None else sample.label.flip(-1), sample.boxes,
                      sample.classes, None if sample.masks is None else sample.masks.flip(-1))
    return out.map_boxes(Geometry(1.0, 1.0, 0.0, 0.0, w, h, flip=True))


def pad(sample: DenseSample, height: int, width: int, ignore_index: int) -> DenseSample:
    """Pad right and bottom to ``height x width`` (image 0, label ``ignore_index``, masks 0)."""
    h, w = sample.size
    if h > height or w > width:
        raise ValueError(f"cannot pad a {w}x{h} image to {width}x{height}")
    margins = (0, width - w, 0, height - h)
    label = None if sample.label is None else F.pad(sample.label, margins, value=ignore_index)
    masks = None if sample.masks is None else F.pad(sample.masks, margins)
    return DenseSample(F.pad(sample.image, margins), label, sample.boxes, sample.classes, masks)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """mmseg's ``convert``: clip to 0..255, then truncate as ``astype(np.uint8)`` (values stay float)."""
    return pixels.clamp(0, 255).floor()


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """Float ``(3, H, W)`` RGB in 0..255 -> HSV as OpenCV stores uint8 images: H in 0..179 (units of 2 degrees),
    S and V in 0..255, rounded."""
    r, g, b = rgb
    value, low = rgb.max(0).values, rgb.min(0).values
    delta = value - low
    saturation = torch.where(value > 0, 255 * delta / value.clamp(min=1), 0.0).round()
    safe = delta.clamp(min=1e-6)
    hue = torch.where(value == r, 60 * (g - b) / safe,
                      torch.where(value == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    hue = torch.where(delta > 0, hue % 360, 0.0)
    return torch.stack([(hue / 2).round() % 180, saturation, value])


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_hsv`: OpenCV-style uint8 HSV -> float RGB in 0..255, rounded."""
    hue, saturation, value = hsv[0] * 2, hsv[1] / 255, hsv[2]
    chroma = value * saturation
    sector = hue / 60
    second = chroma * (1 - (sector % 2 - 1).abs())
    zero = torch.zeros_like(value)
    index = sector.floor().long().clamp(0, 5)
    options = torch.stack([torch.stack(c) for c in ((chroma, second, zero), (second, chroma, zero), (zero, chroma, second),
                                                      (zero, second, chroma), (second, zero, chroma), (chroma, zero, second))])
    rgb = options.gather(0, index[None, None].expand(1, 3, *index.shape))[0]
    return (rgb + (value - chroma)).round().clamp(0, 255)


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion`` on uint8 ``(3, H, W)``, each step with probability 1/2 and truncated to
    uint8 as mmseg does: brightness + U(-32, 32); contrast x U(0.5, 1.5), before or after the colour steps
    (chosen at random); saturation: S x U(0.5, 1.5) in OpenCV's uint8 HSV; hue: H + an integer in [-18, 18) of
    OpenCV's 2-degree units (-36 to +34 degrees), modulo 180."""
    pixels = image.float()
    if torch.rand(()) < 0.5:
        pixels = _to_uint8(pixels + _uniform(-32, 32))
    contrast_first = torch.rand(()) < 0.5

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return _to_uint8(x * _uniform(0.5, 1.5)) if torch.rand(()) < 0.5 else x

    if contrast_first:
        pixels = contrast(pixels)
    if torch.rand(()) < 0.5:
        hsv = rgb_to_hsv(pixels)
        hsv[1] = _to_uint8(hsv[1] * _uniform(0.5, 1.5))
        pixels = hsv_to_rgb(hsv)
    if torch.rand(()) < 0.5:
        hsv = rgb_to_hsv(pixels)
        hsv[0] = (hsv[0] + int(torch.randint(-18, 18, ()))) % 180
        pixels = hsv_to_rgb(hsv)
    if not contrast_first:
        pixels = contrast(pixels)
    return pixels.to(torch.uint8)


def random_resize(sample: DenseSample, dense: DenseTargets) -> DenseSample:
    h, w = sample.size
    if dense.short_sides:
        short = dense.short_sides[int(torch.randint(len(dense.short_sides), ()))]
        new_w, new_h = keep_ratio_size(w, h, (dense.scale[0], short))
    else:
        ratio = _uniform(*dense.ratio_range)
        new_w, new_h = keep_ratio_size(w, h, (int(dense.scale[0] * ratio), int(dense.scale[1] * ratio)))
    return resize(sample, max(new_w, 1), max(new_h, 1))


def random_crop(sample: DenseSample, dense: DenseTargets) -> DenseSample:
    """mmseg / mmdet ``RandomCrop``: offsets drawn uniformly in the margins. A segmentation crop in which one
    class has ``cat_max_ratio`` or more of the labelled pixels is redrawn; after :data:`CROP_TRIES` such checks
    the next draw is taken unchecked (mmseg 0.x's loop)."""
    h, w = sample.size
    crop_h, crop_w = min(dense.crop[0], h), min(dense.crop[1], w)

    def draw() -> tuple[int, int]:
        return int(torch.randint(h - crop_h + 1, ())), int(torch.randint(w - crop_w + 1, ()))

    top, left = draw()
    if sample.label is not None and dense.cat_max_ratio < 1.0:
        for _ in range(CROP_TRIES):
            window = sample.label[top:top + crop_h, left:left + crop_w]
            _, counts = window[window != dense.ignore_index].unique(return_counts=True)
            if len(counts) > 1 and counts.max() / counts.sum() < dense.cat_max_ratio:
                break
            top, left = draw()
    return crop(sample, top, left, crop_h, crop_w)


def augment(sample: DenseSample, dense: DenseTargets) -> DenseSample:
    """The training pipeline of ``dense`` (see :class:`~finegrain.sample_spec.DenseTargets`)."""
    sample = random_resize(sample, dense)
    if dense.crop is not None:
        sample = random_crop(sample, dense)
    if torch.rand(()) < dense.flip:
        sample = hflip(sample)
    if dense.photometric:
        sample = replace(sample, image=photometric_distortion(sample.image))
    return sample


def read_label(path: Path, width: int, height: int, dense: DenseTargets) -> torch.Tensor:
    """The ``(H, W)`` int64 class map of ``path`` for an image of ``width x height``: ``reduce_zero_label``
    applied; :class:`RecordError` for another size, values beyond ``num_classes`` (other than ignore), or no
    labelled pixel at all (nothing to learn or score)."""
    values = torch.from_numpy(read_label_map(path))
    if tuple(values.shape) != (height, width):
        raise RecordError(f"{path}: field 'label_map' is {values.shape[1]}x{values.shape[0]} (WxH) but its image is "
                          f"{width}x{height}; they must be the same size")
    if dense.reduce_zero_label:
        values = torch.where((values == 0) | (values == dense.ignore_index), dense.ignore_index, values - 1)
    bad = (values != dense.ignore_index) & ((values < 0) | (values >= dense.num_classes))
    if bad.any():
        raise RecordError(f"{path}: field 'label_map' has value {int(values[bad][0])} (after reduce_zero_label="
                          f"{dense.reduce_zero_label}), beyond the {dense.num_classes} classes (0..{dense.num_classes - 1},"
                          f" ignore {dense.ignore_index})")
    if not (values != dense.ignore_index).any():
        raise RecordError(f"{path}: field 'label_map' has no labelled pixel: every value is the ignore index "
                          f"{dense.ignore_index} after reduce_zero_label={dense.reduce_zero_label}"
                          + (" (0 is ignored with it: set it false when 0 is a class)" if dense.reduce_zero_label
                             else ""))
    return values


def rle_counts(counts: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``: 5-bit groups with a
    continuation bit, from the third run on relative to the run two before)."""
    data = counts.encode("ascii") if isinstance(counts, str) else counts
    runs, position = [], 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(data):
                raise ValueError("the RLE string ends inside a run length")
            chunk = data[position] - 48
            value |= (chunk & 0x1F) << 5 * shift
            more = bool(chunk & 0x20)
            position, shift = position + 1, shift + 1
            if not more and chunk & 0x10:
                value |= -1 << 5 * shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_mask(mask, width: int, height: int, where: str) -> np.ndarray:
    """COCO polygons or RLE -> ``(H, W)`` uint8 0/1; :class:`RecordError` naming ``where`` when it does not
    decode exactly: polygons of fewer than 3 points, an RLE of another size, or one whose run lengths do not
    cover the ``W x H`` pixels (pycocotools would fill the rest from uninitialised memory)."""
    try:
        if isinstance(mask, list):
            if not mask or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in mask):
                raise ValueError("polygons must be lists of at least 3 x, y pairs")
            rle = mask_utils.merge(mask_utils.frPyObjects(mask, height, width))
        elif isinstance(mask, dict) and list(mask.get("size", [])) == [height, width]:
            counts = mask["counts"]
            runs = list(counts) if isinstance(counts, list) else rle_counts(counts)
            if any(not isinstance(r, int) or r < 0 for r in runs) or sum(runs) != height * width:
                raise ValueError(f"its run lengths cover {sum(r for r in runs if isinstance(r, int))} pixels, not "
                                 f"the {width}x{height} = {height * width} of its size")
            rle = mask_utils.frPyObjects(mask, height, width) if isinstance(counts, list) else {
                "size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"an RLE mask must have size [{height}, {width}], got {mask.get('size') if isinstance(mask, dict) else mask!r}")
        return mask_utils.decode(rle).astype(np.uint8)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise RecordError(f"{where}: field 'mask' does not decode ({e})") from None


class DenseSampleBuilder:
    """Callable ``(image, record, seed) -> dict of tensors`` for a spec with ``dense`` targets (training);
    label maps are read relative to ``root`` (:meth:`for_root`)."""

    draft_size = None  # label maps and masks are at full resolution: decode images at full resolution too

    def __init__(self, spec: SampleSpec, root: str | Path | None = None):
        if spec.dense is None:
            raise ValueError("DenseSampleBuilder needs a SampleSpec with dense targets")
        self.spec, self.dense, self.root = spec, spec.dense, None if root is None else Path(root)
        self.class_index = {name: i for i, name in enumerate(self.dense.class_names)}

    def for_root(self, root: str | Path) -> DenseSampleBuilder:
        return DenseSampleBuilder(self.spec, root)

    def has_targets(self, record: Record) -> bool:
        """Whether ``record`` has what the task learns from: a label map, or a region of a listed class."""
        if self.dense.kind == "segmentation":
            return record.label_map is not None
        return any(region.label in self.class_index for region in record.regions)

    @property
    def targets(self) -> str:
        """What :meth:`has_targets` looks for, in words (for the error when no record has it)."""
        if self.dense.kind == "segmentation":
            return "a label map (field 'label_map')"
        shown = ", ".join(repr(name) for name in self.dense.class_names[:3])
        return (f"a region labelled with one of the task's {len(self.class_index)} classes ({shown}, ...; "
                "detection needs boxes: a COCO instances json, not a captions json)")

    def keeps(self, record: Record) -> bool:
        """Whether ``record`` is trained on (see ``DenseTargets.drop_empty``): always without it; with it, when it
        :meth:`has_targets` and both image sides (when known) are at least ``MIN_IMAGE_SIDE``."""
        if not self.dense.drop_empty:
            return True
        small = record.width is not None and record.height is not None and min(record.width,
                                                                               record.height) < MIN_IMAGE_SIDE
        return not small and self.has_targets(record)

    def __call__(self, image: Image.Image, record: Record, seed: int) -> dict:
        dense, key = self.dense, record.key or record.image
        width, height = original_size(image)
        if (width, height) != image.size:
            raise RecordError(f"{key}: dense targets need the image decoded at full size")
        check_record_size(record, (width, height))
        out: dict = {"bad_regions": list(record.bad_regions)}
        pixels = TF.pil_to_tensor(image)
        label = None
        if dense.kind == "segmentation":
            if record.label_map is None:
                raise RecordError(f"{key}: field 'label_map' is missing (segmentation needs a label map per image)")
            if self.root is None:
                raise ValueError("DenseSampleBuilder: no root to read label maps from (use for_root)")
            label = read_label(self.root / record.label_map, width, height, dense)
        boxes, classes, masks, counts = self._instances(record, width, height, key, out["bad_regions"])
        with seeded_cpu_rng(seed):
            sample = augment(DenseSample(pixels, label, boxes, classes, masks), dense)
        size = sample.size
        sample = pad(sample, *dense.pad, dense.ignore_index)
        out["image"], out["image_size"] = sample.image, torch.tensor(size)
        if dense.kind == "segmentation":
            out["label"] = sample.label
            return out
        m, n = dense.max_instances, min(len(sample.boxes), dense.max_instances)
        out.update(instance_boxes=torch.zeros(m, 4),
                   instance_labels=torch.zeros(m, dtype=torch.long), instance_valid=torch.arange(m) < n,
                   instances_cut=len(sample.boxes) - n, **counts)
        out["instance_boxes"][:n] = sample.boxes[:n]
        out["instance_labels"][:n] = sample.classes[:n]
        if dense.masks:
            out["instance_masks"] = sample.masks[:n].to(torch.uint8)  # the valid rows only: (n, *pad)
        return out

    def _instances(self, record: Record, width: int, height: int, key: str, bad_regions: list[str]):
        """The record's listed-class regions fitted to the image: boxes ``(N, 4)``, classes ``(N,)``, masks
        ``(N, H, W)`` (with ``masks``), and the counts of clipped / dropped / unlisted boxes."""
        dense = self.dense
        if dense.kind == "segmentation":
            return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), None, {}
        listed = [r for r in record.regions if r.label in self.class_index]
        regions, clipped, dropped = fit_boxes(tuple(listed), width, height, key)
        counts = {"boxes_clipped": clipped, "boxes_dropped": dropped,
                  "instances_unlisted": len(record.regions) - len(listed)}
        masks = []
        if dense.masks:
            good = []
            for i, region in enumerate(regions):
                try:
                    if region.mask is None:
                        raise RecordError(f"{key}: regions[{i}]: field 'mask' is missing (masks=True)")
                    masks.append(torch.from_numpy(decode_mask(region.mask, width, height, f"{key}: regions[{i}]")))
                    good.append(region)
                except RecordError as e:
                    bad_regions.append(str(e))
            regions = good
        boxes = torch.tensor([r.box for r in regions], dtype=torch.float32).reshape(-1, 4)
        classes = torch.tensor([self.class_index[r.label] for r in regions], dtype=torch.long)
        mask_tensor = None
        if dense.masks:
            mask_tensor = torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8)
        return boxes, classes, mask_tensor, counts

