"""Box (region) classification: each labelled box of an image against class-name prompts, two ways.

- ``roi``: the whole image squashed (no crop, aspect ratio not kept) to the model's input ``(H, W)``,
  boxes scaled by ``(W / orig_w, H / orig_h)``, one ``model.encode_boxes(..., mode="v_only")`` embedding
  per box (RoIAlign of the dense features).
- ``crop``: each box cut from the original image (optionally enlarged ``crop_scale`` times about its
  centre, clipped to the image), squashed to ``(H, W)``, ``model.encode_image``.

Squashing before the transform makes the pixel mapping exact: an open_clip val transform (resize shorter
side, centre crop, normalise) leaves an image already ``H x W`` geometrically untouched; the output size
is checked so a transform that would move pixels is refused instead of silently misplacing boxes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from finegrain.data.images import load_image
from finegrain.data.records import Record, Region
from finegrain.data.sample import enlarge_box

from .classification import DEFAULT_TEMPLATES, class_text_embeddings, classification_metrics, label_targets
from .encode import Transform, batched, encode_images, evaluating

Labelled = list[tuple[Record, list[Region]]]


def to_model_input(image: Image.Image, size: tuple[int, int], transform: Transform) -> torch.Tensor:
    """Squash-resize ``image`` to ``size`` ``(H, W)`` (bicubic) and apply ``transform`` -> ``(3, H, W)``."""
    height, width = size
    pixels = transform(image.resize((width, height), Image.BICUBIC))
    if tuple(pixels.shape[-2:]) != (height, width):
        raise ValueError(f"the transform turned a {height}x{width} image into {tuple(pixels.shape)}; box "
                         "classification needs one that keeps the model's input size, e.g. "
                         "open_clip.image_transform(model.image_size, is_train=False)")
    return pixels


def crop_box(image: Image.Image, box: Sequence[float], scale: float = 1.0) -> Image.Image:
    """The ``xyxy`` box enlarged ``scale`` times about its centre, clipped to the image and rounded
    outwards to whole pixels (at least 1x1)."""
    x0, y0, x1, y1 = enlarge_box(tuple(box), scale)
    left = min(max(0, math.floor(x0)), image.width - 1)
    top = min(max(0, math.floor(y0)), image.height - 1)
    right = max(min(image.width, math.ceil(x1)), left + 1)
    bottom = max(min(image.height, math.ceil(y1)), top + 1)
    return image.crop((left, top, right, bottom))


def _load(record: Record, root: str | Path) -> Image.Image:
    """The record's image, checked against the record's ``width``/``height`` (its boxes' frame)."""
    image = load_image(Path(root) / record.image)
    if record.width is not None and (record.width, record.height) != image.size:
        raise ValueError(f"{record.key or record.image}: fields 'width'/'height' say {record.width}x"
                         f"{record.height} but the image is {image.width}x{image.height}; its boxes would "
                         "be misplaced")
    return image


def _roi_embeddings(model: nn.Module, labelled: Labelled, root: str | Path, transform: Transform,
                    batch_size: int, device: str | torch.device, progress: bool) -> torch.Tensor:
    """``(num_boxes, D)`` normalised ``encode_boxes`` embeddings, in record then region order."""
    height, width = model.image_size
    embeddings = []
    with tqdm(total=len(labelled), desc="roi boxes", unit="img", disable=not progress) as bar:
        for batch in batched(labelled, batch_size):
            pixels, boxes = [], []
            for record, regions in batch:
                image = _load(record, root)
                pixels.append(to_model_input(image, (height, width), transform))
                scale = torch.tensor([width / image.width, height / image.height] * 2)
                boxes.append((torch.tensor([region.box for region in regions]) * scale).to(device))
            pixels = torch.stack(pixels).to(device)
            embeddings.append(model.encode_boxes(pixels, boxes, mode="v_only").float())
            bar.update(len(batch))
    return torch.cat(embeddings)


def _iter_crops(labelled: Labelled, root: str | Path, scale: float) -> Iterator[Image.Image]:
    for record, regions in labelled:
        image = _load(record, root)
        for region in regions:
            yield crop_box(image, region.box, scale)


def evaluate_box_classification(model: nn.Module, records: Sequence[Record], root: str | Path,
                                transform: Transform, tokenizer: Callable[[list[str]], torch.Tensor],
                                class_names: Sequence[str] | None = None,
                                templates: Sequence[str] = DEFAULT_TEMPLATES, crop_scale: float = 1.0,
                                batch_size: int = 64, device: str | torch.device = "cpu",
                                progress: bool = True) -> dict[str, float]:
    """Classify every region that has a ``label``, by ``roi`` and by ``crop`` (see the module docstring).

    ``class_names`` defaults to the sorted distinct region labels; every label must be one of them.
    ``batch_size`` counts images for ``roi`` and crops for ``crop``. Returns ``{way}_top1``, ``{way}_top5``,
    ``{way}_mean_class_top1`` (percent) for ``way`` in ``roi``, ``crop``, and ``num_boxes``.
    """
    if crop_scale <= 0:
        raise ValueError(f"crop_scale must be positive, got {crop_scale}")
    labelled = [(record, [region for region in record.regions if region.label is not None])
                for record in records]
    labelled = [(record, regions) for record, regions in labelled if regions]
    if not labelled:
        raise ValueError(f"box classification needs regions with a 'label'; none of the {len(records)} "
                         "records has one")
    pairs = [(record.key or record.image, region.label) for record, regions in labelled for region in regions]
    names, targets = label_targets([label for _, label in pairs], [key for key, _ in pairs], class_names)
    size = tuple(model.image_size)
    with evaluating(model):
        classifier = class_text_embeddings(model, tokenizer, names, templates, batch_size, device, progress)
        embeddings = {
            "roi": _roi_embeddings(model, labelled, root, transform, batch_size, device, progress),
            "crop": encode_images(model, _iter_crops(labelled, root, crop_scale),
                                  lambda crop: to_model_input(crop, size, transform), batch_size, device,
                                  total=len(targets), progress=progress, desc="crop boxes"),
        }
    metrics: dict[str, float] = {}
    for way, emb in embeddings.items():
        metrics.update({f"{way}_{name}": value
                        for name, value in classification_metrics(emb @ classifier.T, targets).items()})
    metrics["num_boxes"] = len(targets)
    return metrics
