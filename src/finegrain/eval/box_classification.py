"""Box (region) classification: every labelled box of an image is scored against class-name prompts.

Three ways to embed a box:

- ``roi``: 1x1 RoIAlign (``aligned=True``) over the box of the whole image's dense features
  (``model.encode_dense``, v-only last block), L2-normalised;
- ``crop``: the box's crop of the original image (enlarged about its centre and clipped to the image, its
  float corners rounded to the nearest pixel as the releases' PIL ``crop`` rounds them), resized to the
  model's input size, through ``model.encode_image``;
- ``mask``: the mean of the dense features over the segment's mask on the feature grid, L2-normalised
  (CLIPSelf's mask pooling).

The whole image (input of ``roi`` and ``mask``) is resized to ``image_size`` (default: the model's input
size) in one of two ways:

- ``squash`` (FineCLIP): to ``(H, W)``, aspect ratio not kept, bilinear (FineCLIP's ``Resize((S, S))``);
  box x and y scaled by ``W / w`` and ``H / h``. Crops are squashed to the model size the same way.
- ``longest`` (CLIPSelf's ``ResizeLongest``): scaled by ``s = min(H / h, W / w)`` to ``round(w s) x
  round(h s)`` (bicubic) and zero-padded (black) at the right and bottom; boxes scaled by ``s``. Crops
  are resized so their longer side fits the model size and padded on both sides (``ResizeMaxSize``).

Masks reach the feature grid ``(H / p, W / p)`` as CLIPSelf resizes them: the float mask resized with the
image's geometry (bicubic, without antialiasing, as torchvision's tensor resize then did), zero-padded,
then thresholded at ``> 0``. (FineCLIP scores no masks; under ``squash`` they are squashed to the grid.)

Two data sources share this machinery:

- :func:`evaluate_box_classification`: region-text records whose regions have a ``label`` (the
  evaluation run during training): ``roi`` and ``crop``, every crop enlarged ``crop_scale`` times.
- :func:`evaluate_panoptic_box_classification`: COCO panoptic, the FineCLIP / CLIPSelf protocol
  (``training/zero_shot.py``, test type ``coco_panoptic``). The classes are every category of the json
  sorted by id (133 for COCO). Only an image's first 100 segments are considered, crowd segments
  included. A box is kept when ``min_box_size**2 <= (x1 - x0) * (y1 - y0) <= max_box_size**2`` (8 and
  1024 pixels), the area being the box's, not the mask's. Thing boxes come from the annotation and stuff
  boxes from the mask (see :mod:`finegrain.data.coco_panoptic`). Thing crops are enlarged 1.5 times; stuff
  crops are not.

Metrics, in percent, per way: ``{way}_acc1`` and ``{way}_acc5`` (over boxes), ``{way}_macc1`` and
``{way}_macc5`` (per-class accuracy averaged over the classes present: FineCLIP's ``rois.box.macc1``).
Panoptic runs add ``{way}_thing_macc1/5`` and ``{way}_stuff_macc1/5`` (CLIPSelf's ``rois.thing.macc1``,
...), each over the classes present among thing or stuff boxes.

Deliberate deviations from the released code:

- A class's accuracy is not rounded to float16 before averaging. Tied scores count against the target
  (``classification_metrics``), where ``topk`` would break ties by class index. This matters only for
  exact ties, such as a mask that vanishes on the grid (a zero feature scores 0 against every class).
- Images are scored ``batch_size`` at a time, where the released evaluation runs one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms
from tqdm.auto import tqdm

from finegrain.data.augment import resize_geometry
from finegrain.data.coco_panoptic import PanopticData, PanopticError, PanopticSegment, read_panoptic
from finegrain.data.images import ImageError, load_image
from finegrain.data.records import Record, RecordError, check_record_size, fit_boxes
from finegrain.data.sample import crop_box
from finegrain.errors import DataError
from finegrain.models.roi import pool_boxes

from .classification import class_text_embeddings, classification_metrics, label_targets
from .encode import (
    Transform,
    batched,
    evaluating,
    loaded_ahead,
    parsed_records,
    report_skipped,
)
from .prompts import Templates

WAYS = ("roi", "crop", "mask")
RESIZE_MODES = ("squash", "longest")
MAX_SEGMENTS = 100  # the released evaluation reads at most this many segments per image
THING_CROP_SCALE = 1.5  # the released evaluation's crop of a thing: its box enlarged 1.5x about its centre


# ----- geometry ---------------------------------------------------------------------------------------


def fit_image(image: Image.Image, size: tuple[int, int], resize: str,
              centre: bool = False) -> tuple[Image.Image, tuple[float, float]]:
    """Resize ``image`` to ``size`` ``(H, W)`` by ``resize`` (``squash`` or ``longest``, see the module
    docstring) -> the ``W x H`` image and ``(sx, sy)``: original pixel ``(x, y)`` lands at ``(x sx, y sy)``.
    ``centre`` pads a ``longest`` resize on both sides (then the mapping also shifts)."""
    if resize not in RESIZE_MODES:
        raise DataError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    height, width = size
    if resize == "squash":
        return image.resize((width, height), Image.BILINEAR), (width / image.width, height / image.height)
    new_w, new_h, _, _ = resize_geometry(image.size, size, "longest_pad")
    canvas = Image.new("RGB", (width, height))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC),
                 ((width - new_w) // 2, (height - new_h) // 2) if centre else (0, 0))
    scale = min(width / image.width, height / image.height)  # CLIPSelf's get_scale: not the rounded ratio
    return canvas, (scale, scale)


def masks_to_grid(masks: torch.Tensor, grid: tuple[int, int], resize: str) -> torch.Tensor:
    """``(K, h, w)`` bool masks of an image -> ``(K, gh, gw)`` bool on the feature grid of that image resized
    by ``resize``: bicubic without antialiasing, zero-padded (``longest``), ``> 0``."""
    (h, w), (gh, gw) = masks.shape[-2:], grid
    if resize == "squash":
        size = (gh, gw)
    else:
        scale = min(gh / h, gw / w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
    resized = F.interpolate(masks[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]
    return F.pad(resized, (0, gw - size[1], 0, gh - size[0])) > 0


def pool_masks(dense: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mask pooling: ``dense`` ``(B, D, h, w)`` and per image ``(K_i, h, w)`` bool masks -> ``(sum K_i, D)``,
    each the mean of the features under its mask (``sum / (count + 1e-12)``), L2-normalised."""
    pooled = []
    for features, image_masks in zip(dense, masks, strict=True):
        weights = image_masks.flatten(1).to(features.dtype)  # (K, h*w)
        pooled.append(weights @ features.flatten(1).T / (weights.sum(dim=1, keepdim=True) + 1e-12))
    return F.normalize(torch.cat(pooled), dim=-1)


def _input_size(model: nn.Module, image_size: int | Sequence[int] | None) -> tuple[int, int]:
    size = tuple(model.image_size) if image_size is None else (
        (image_size, image_size) if isinstance(image_size, int) else tuple(image_size))
    patch = tuple(model.patch_size)
    if len(size) != 2 or any(s <= 0 or s % p for s, p in zip(size, patch)):
        raise DataError(f"image_size must be positive multiples of the patch size {patch}, got {image_size}")
    return size


def pixel_transform(model: nn.Module) -> Transform:
    """A PIL image -> ``(3, H, W)`` tensor normalised with the model's open_clip preprocess mean/std (CLIP's
    when it has none); the size is kept."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(
        cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), cfg.get("std", open_clip.OPENAI_DATASET_STD))])


# ----- embedding boxes --------------------------------------------------------------------------------


@dataclass
class _ImageBoxes:
    """One image and its K boxes: ``boxes`` ``(K, 4)`` xyxy original pixels (float64, so crop corners are rounded
    from the values as read), the crop enlargement of each, optional ``(K, H, W)`` bool masks, and each box's
    class name and thing/stuff flag (when known)."""

    image: Image.Image
    boxes: torch.Tensor
    crop_scales: list[float]
    labels: list[str] = field(default_factory=list)
    isthing: list[bool] = field(default_factory=list)
    masks: np.ndarray | torch.Tensor | None = None


@dataclass
class _BoxInputs:
    """One image's model inputs: the fitted image ``(3, H, W)`` and its boxes ``(K, 4)`` in its pixels
    (``roi``, ``mask``), the crops ``(K, 3, h, w)`` (``crop``), the masks on the feature grid ``(K, gh, gw)``
    (``mask``), and the boxes' labels and thing flags."""

    pixels: torch.Tensor | None
    boxes: torch.Tensor | None
    crops: torch.Tensor | None
    masks: torch.Tensor | None
    labels: list[str]
    isthing: list[bool]


@dataclass
class _Preparer:
    """``_ImageBoxes -> _BoxInputs`` for ``ways`` (all the CPU work, so that loader threads can do it):
    the image fitted to ``size`` by ``resize`` for ``roi``/``mask``, each box cropped and fitted to
    ``crop_size`` for ``crop``, masks resized to the ``grid`` of ``size`` for ``mask``."""

    ways: Sequence[str]
    size: tuple[int, int]
    crop_size: tuple[int, int]
    grid: tuple[int, int]
    resize: str
    to_tensor: Transform

    @classmethod
    def for_model(cls, model: nn.Module, ways: Sequence[str], size: tuple[int, int], resize: str,
                  to_tensor: Transform) -> _Preparer:
        grid = tuple(s // p for s, p in zip(size, model.patch_size))
        return cls(tuple(ways), size, tuple(model.image_size), grid, resize, to_tensor)

    def __call__(self, item: _ImageBoxes) -> _BoxInputs:
        pixels = boxes = crops = masks = None
        if "roi" in self.ways or "mask" in self.ways:
            (pixels,), ((sx, sy),) = _pixels([item.image], self.size, self.resize, self.to_tensor)
            boxes = item.boxes.float() * torch.tensor([sx, sy, sx, sy])
        if "mask" in self.ways:
            masks = masks_to_grid(torch.as_tensor(item.masks), self.grid, self.resize)
        if "crop" in self.ways:
            crops = _pixels([crop_box(item.image, box, scale, rounding="nearest")
                             for box, scale in zip(item.boxes.tolist(), item.crop_scales)],
                            self.crop_size, self.resize, self.to_tensor, centre=True)[0]
        return _BoxInputs(pixels, boxes, crops, masks, item.labels, item.isthing)


@dataclass
class _Embedded:
    embeddings: dict[str, torch.Tensor]  # way -> (N, D)
    labels: list[str]
    isthing: list[bool]


def _pixels(images: Sequence[Image.Image], size: tuple[int, int], resize: str, to_tensor: Transform,
            centre: bool = False) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Fit and convert images -> ``(B, 3, H, W)`` and each one's ``(sx, sy)``."""
    fitted = [fit_image(image, size, resize, centre) for image in images]
    pixels = torch.stack([to_tensor(image) for image, _ in fitted])
    if tuple(pixels.shape[-2:]) != tuple(size):
        raise ValueError(f"the transform turned a {size[0]}x{size[1]} image into {tuple(pixels.shape[1:])}; box "
                         "classification needs a transform that keeps the size, e.g. "
                         "open_clip.image_transform(size, is_train=False) at that size")
    return pixels, [scale for _, scale in fitted]


def _embed(model: nn.Module, inputs: Iterable[_BoxInputs], ways: Sequence[str], batch_size: int,
           device: str | torch.device, progress: bool, total: int | None) -> _Embedded:
    """Embed every image's boxes each of ``ways``: ``batch_size`` images (``roi``, ``mask``) or crops at once."""
    chunks: dict[str, list[torch.Tensor]] = {way: [] for way in ways}
    labels, isthing = [], []
    with tqdm(total=total, desc="boxes", unit="img", disable=not progress) as bar:
        for batch in batched(inputs, batch_size):
            if "roi" in ways or "mask" in ways:
                pixels = torch.stack([item.pixels for item in batch]).to(device, non_blocking=True)
                dense = model.encode_dense(pixels).float()
                if "roi" in ways:
                    boxes = [item.boxes.to(device) for item in batch]
                    chunks["roi"].append(pool_boxes(dense, boxes, tuple(model.patch_size)))
                if "mask" in ways:
                    chunks["mask"].append(pool_masks(dense, [item.masks.to(device) for item in batch]))
            if "crop" in ways:
                crops = torch.cat([item.crops for item in batch])
                chunks["crop"].extend(model.encode_image(part.to(device, non_blocking=True), normalize=True).float()
                                      for part in crops.split(batch_size))
            for item in batch:
                labels.extend(item.labels)
                isthing.extend(item.isthing)
            bar.update(len(batch))
    return _Embedded({way: torch.cat(parts) for way, parts in chunks.items() if parts}, labels, isthing)


def _metrics(embedded: _Embedded, targets: torch.Tensor, classifier: torch.Tensor) -> dict[str, float]:
    """Per way: acc1/acc5/macc1/macc5 over all boxes; thing/stuff macc1/macc5 when thing flags are known."""
    parts = {"": torch.ones(len(targets), dtype=torch.bool)}
    if embedded.isthing:
        thing = torch.tensor(embedded.isthing)
        parts.update(thing_=thing, stuff_=~thing)
    metrics: dict[str, float] = {}
    for way, embeddings in embedded.embeddings.items():
        logits = embeddings @ classifier.T.to(embeddings.device)
        for part, chosen in parts.items():
            if not chosen.any():
                continue
            m = classification_metrics(logits[chosen.to(logits.device)], targets[chosen])
            if not part:
                metrics.update({f"{way}_acc1": m["acc1"], f"{way}_acc5": m["acc5"]})
            metrics.update({f"{way}_{part}macc1": m["mean_per_class_recall"],
                            f"{way}_{part}macc5": m["mean_per_class_acc5"]})
    return metrics


# ----- region-text records ----------------------------------------------------------------------------


def labelled_regions(records: Sequence[Record]) -> list[tuple[Record, list]]:
    """``(record, its regions with a label)`` for each parsed record of ``records`` that has one; raises when
    none has."""
    records = parsed_records(records, "box_classification")
    labelled = [(record, [region for region in record.regions if region.label is not None])
                for record in records]
    labelled = [(record, regions) for record, regions in labelled if regions]
    if not labelled:
        raise DataError(f"box classification needs regions with a 'label'; none of the {len(records)} "
                        "records has one")
    return labelled


def evaluate_box_classification(model: nn.Module, records: Sequence[Record], root: str | Path,
                                transform: Transform, tokenizer: Callable[[list[str]], torch.Tensor],
                                class_names: Sequence[str] | None = None,
                                templates: str | Sequence[str] | Templates = "simple", crop_scale: float = 1.0,
                                resize: str = "squash", image_size: int | Sequence[int] | None = None,
                                batch_size: int = 64, device: str | torch.device = "cpu",
                                progress: bool = True) -> dict[str, float]:
    """Classify every region of ``records`` that has a ``label``, by ``roi`` and ``crop``.

    ``transform`` turns a resized PIL image into the model's input and must keep its size (an open_clip
    evaluation transform at that size does). ``class_names`` defaults to the sorted distinct region labels;
    every label must be one of them. Boxes are fitted to their image (``fit_boxes``: clipped when partly
    outside, dropped when wholly outside or empty); a record whose image cannot be read, or whose
    ``width``/``height`` disagree with it, is left out. ``resize`` and ``image_size``: see the module
    docstring. ``batch_size`` counts images for ``roi`` and crops for ``crop``. Returns
    ``{way}_acc1/acc5/macc1/macc5`` (percent) for ``roi`` and ``crop``, ``num_boxes`` (boxes scored),
    ``boxes_clipped``, ``boxes_dropped`` and ``skipped_images``.
    """
    if crop_scale <= 0:
        raise DataError(f"crop_scale must be positive, got {crop_scale}")
    size = _input_size(model, image_size)
    labelled = labelled_regions(records)
    pairs = [(record.key or record.image, region.label) for record, regions in labelled for region in regions]
    names, _ = label_targets([label for _, label in pairs], [key for key, _ in pairs], class_names)
    skipped: list[str] = []
    fitted = {"clipped": 0, "dropped": 0}

    prepare = _Preparer.for_model(model, ("roi", "crop"), size, resize, transform)

    def load(pair: tuple[Record, list]) -> tuple[_BoxInputs | None, int, int] | str:
        """A record's image prepared with its fitted boxes (None when none is left), the counts clipped and
        dropped, or why it cannot be used."""
        record, regions = pair
        key = record.key or record.image
        try:
            image = load_image(Path(root) / record.image)
            check_record_size(record, image.size)
            kept, clipped, dropped = fit_boxes(regions, image.width, image.height, key)
        except (ImageError, RecordError) as e:
            return str(e)
        item = prepare(_ImageBoxes(image, torch.tensor([region.box for region in kept], dtype=torch.float64),
                                   [crop_scale] * len(kept), labels=[region.label for region in kept]))
        return item if kept else None, clipped, dropped

    def items() -> Iterator[_BoxInputs]:
        for loaded in loaded_ahead(load, labelled):
            if isinstance(loaded, str):
                skipped.append(loaded)
                continue
            item, clipped, dropped = loaded
            fitted["clipped"] += clipped
            fitted["dropped"] += dropped
            if item is not None:
                yield item

    with evaluating(model):
        embedded = _embed(model, items(), ("roi", "crop"), batch_size, device, progress, total=len(labelled))
        report_skipped("box_classification", skipped, len(labelled))
        if not embedded.labels:
            raise DataError(f"box classification: fit_boxes dropped all {fitted['dropped']} boxes (outside "
                            "their images or empty)")
        classifier = class_text_embeddings(model, tokenizer, names, templates, batch_size, device, progress)
    _, targets = label_targets(embedded.labels, embedded.labels, names)
    return {**_metrics(embedded, targets, classifier), "num_boxes": len(targets),
            "boxes_clipped": fitted["clipped"], "boxes_dropped": fitted["dropped"], "skipped_images": len(skipped)}


# ----- COCO panoptic (FineCLIP / CLIPSelf protocol) ---------------------------------------------------


def evaluate_panoptic_box_classification(model: nn.Module, data: PanopticData | str | Path, root: str | Path,
                                         tokenizer: Callable[[list[str]], torch.Tensor],
                                         ways: Sequence[str] = WAYS, resize: str = "squash",
                                         image_size: int | Sequence[int] | None = None,
                                         templates: str | Sequence[str] | Templates = "vild",
                                         min_box_size: float = 8.0, max_box_size: float = 1024.0,
                                         batch_size: int = 16, device: str | torch.device = "cpu",
                                         progress: bool = True) -> dict[str, float]:
    """Box classification on COCO panoptic as FineCLIP (``resize="squash"`` at the model size) and CLIPSelf
    (``resize="longest"``, ``image_size=1024`` for ViT-B/16, 896 for ViT-L/14) run it.

    ``data``: a :class:`~finegrain.data.coco_panoptic.PanopticData` or the path of the panoptic json (its
    PNGs in the folder of the same name). ``root``: the image folder (``val2017``). ``ways``: any of
    ``roi``, ``crop``, ``mask``. Images are normalised with the model's open_clip mean/std. ``batch_size``
    counts images for ``roi``/``mask`` and crops for ``crop``. Returns per way ``{way}_acc1/acc5/macc1/
    macc5`` over all boxes and ``{way}_thing_macc1/5``, ``{way}_stuff_macc1/5`` (left out when there is no
    thing, or no stuff, box), plus ``num_images`` (images scored), ``num_boxes``, ``num_thing_boxes``,
    ``boxes_filtered`` (segments beyond an image's first 100 or outside the size range) and
    ``skipped_images`` (image or PNG missing or unreadable, or of the wrong size).
    """
    unknown = [way for way in ways if way not in WAYS]
    if unknown or not ways:
        raise DataError(f"ways must be a non-empty subset of {WAYS}, got {list(ways)}")
    if resize not in RESIZE_MODES:
        raise DataError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    size = _input_size(model, image_size)
    data = data if isinstance(data, PanopticData) else read_panoptic(data)
    skipped: list[str] = []
    counts = {"num_images": 0, "boxes_filtered": 0}

    def keep(segment: PanopticSegment) -> bool:
        return min_box_size ** 2 <= segment.box_area <= max_box_size ** 2

    prepare = _Preparer.for_model(model, ways, size, resize, pixel_transform(model))

    def load(index: int) -> tuple[_BoxInputs | None, int] | str:
        """Image ``index`` prepared with its kept boxes (None when none is kept) and the count filtered out,
        or why it cannot be used."""
        try:
            sample = data.sample(index)
            path = Path(root) / sample.image
            image = load_image(path)
        except (PanopticError, ImageError) as e:
            return str(e)
        if image.size != (sample.width, sample.height):
            return (f"{path}: the image is {image.width}x{image.height} but {data.path} says "
                    f"{sample.width}x{sample.height}")
        kept = [segment for segment in sample.segments[:MAX_SEGMENTS] if keep(segment)]
        filtered = len(sample.segments) - len(kept)
        if not kept:
            return None, filtered
        return prepare(_ImageBoxes(image, torch.tensor([segment.box for segment in kept], dtype=torch.float64),
                                   [THING_CROP_SCALE if segment.isthing else 1.0 for segment in kept],
                                   labels=[segment.category for segment in kept],
                                   isthing=[segment.isthing for segment in kept],
                                   masks=sample.masks(kept) if "mask" in ways else None)), filtered

    def items() -> Iterator[_BoxInputs]:
        for loaded in loaded_ahead(load, range(len(data))):
            if isinstance(loaded, str):
                skipped.append(loaded)
                continue
            item, filtered = loaded
            counts["boxes_filtered"] += filtered
            if item is not None:
                counts["num_images"] += 1
                yield item

    with evaluating(model):
        embedded = _embed(model, items(), ways, batch_size, device, progress, total=len(data))
        report_skipped("panoptic box classification", skipped, len(data))
        if not embedded.labels:
            raise DataError(f"panoptic box classification: no box of {data.path} passed the size filter "
                            f"({min_box_size}**2 <= area <= {max_box_size}**2)")
        classifier = class_text_embeddings(model, tokenizer, data.class_names, templates, batch_size, device,
                                           progress)
    _, targets = label_targets(embedded.labels, embedded.labels, data.class_names)
    return {**_metrics(embedded, targets, classifier), **counts, "num_boxes": len(targets),
            "num_thing_boxes": sum(embedded.isthing), "skipped_images": len(skipped)}


# ----- one image (pictures) ---------------------------------------------------------------------------


def box_embeddings(model: nn.Module, image: Image.Image, boxes: torch.Tensor | Sequence[Sequence[float]],
                   way: str = "roi", resize: str = "squash", image_size: int | Sequence[int] | None = None,
                   masks: np.ndarray | torch.Tensor | None = None, crop_scale: float = 1.0,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """``(K, D)`` L2-normalised embeddings of the ``(K, 4)`` xyxy ``boxes`` (original pixels) of one PIL
    ``image``, embedded one ``way`` as the box-classification evaluation does, on ``device``.

    ``masks`` ``(K, H, W)`` bool are needed for ``way="mask"``."""
    if way not in WAYS:
        raise DataError(f"way must be one of {WAYS}, got {way!r}")
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    if way == "mask" and (masks is None or tuple(masks.shape) != (len(boxes), image.height, image.width)):
        raise ValueError(f"way='mask' needs one (H, W) = ({image.height}, {image.width}) bool mask per box "
                         f"({len(boxes)}), got {None if masks is None else tuple(masks.shape)}")
    if not len(boxes):
        return torch.zeros(0, 0)
    prepare = _Preparer.for_model(model, (way,), _input_size(model, image_size), resize, pixel_transform(model))
    inputs = prepare(_ImageBoxes(image.convert("RGB"), boxes, [crop_scale] * len(boxes), masks=masks))
    with evaluating(model):
        return _embed(model, [inputs], (way,), len(boxes), device, progress=False, total=1).embeddings[way].float()


def predict_boxes(model: nn.Module, image: Image.Image, boxes: torch.Tensor | Sequence[Sequence[float]],
                  classifier: torch.Tensor, way: str = "roi", resize: str = "squash",
                  image_size: int | Sequence[int] | None = None, masks: np.ndarray | torch.Tensor | None = None,
                  crop_scale: float = 1.0, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Classify the ``(K, 4)`` xyxy ``boxes`` (original pixels) of one PIL ``image`` one ``way``, against
    ``classifier`` ``(C, D)`` (e.g. :func:`~finegrain.eval.classification.class_text_embeddings`).

    ``masks`` ``(K, H, W)`` bool are needed for ``way="mask"``. Returns ``(pred (K,), score (K,))`` on the
    CPU: the best class index and its softmax probability over the ``C`` classes at the model's logit
    scale (CLIP's zero-shot probability).
    """
    probabilities = box_probabilities(model, image, boxes, classifier, way, resize, image_size, masks, crop_scale,
                                      device)
    score, pred = probabilities.max(dim=-1)
    return pred, score


def box_probabilities(model: nn.Module, image: Image.Image, boxes: torch.Tensor | Sequence[Sequence[float]],
                      classifier: torch.Tensor, way: str = "roi", resize: str = "squash",
                      image_size: int | Sequence[int] | None = None, masks: np.ndarray | torch.Tensor | None = None,
                      crop_scale: float = 1.0, device: str | torch.device = "cpu") -> torch.Tensor:
    """``(K, C)`` softmax probabilities of the boxes over the classifier's classes at the model's logit scale
    (arguments as :func:`predict_boxes`), on the CPU."""
    embeddings = box_embeddings(model, image, boxes, way, resize, image_size, masks, crop_scale, device)
    if not len(embeddings):
        return torch.zeros(0, len(classifier))
    logits = model.logit_scale.exp().float() * embeddings @ classifier.T.to(embeddings.device).float()
    return logits.softmax(dim=-1).cpu()
