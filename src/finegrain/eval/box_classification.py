"""Box (region) classification: each labelled box of an image against class-name prompts, two ways.

- ``roi``: the whole image squashed (no crop, aspect ratio not kept) to the model's input ``(H, W)``,
  boxes scaled by ``(W / orig_w, H / orig_h)``, one ``model.encode_boxes(..., mode="v_only")`` embedding
  per box (RoIAlign of the dense features).
- ``crop``: each box cut from the original image (optionally enlarged ``crop_scale`` times about its
  centre, clipped to the image), squashed to ``(H, W)``, ``model.encode_image``.

Squashing before the transform makes the pixel mapping exact: an open_clip val transform (resize shorter
side, centre crop, normalise) leaves an image already ``H x W`` geometrically untouched; the output size
is checked so a transform that would move pixels is refused instead of silently misplacing boxes.

Boxes refer to the displayed (EXIF-oriented) image; they are fitted to it with ``fit_boxes`` (clipped
when partly outside, dropped when wholly outside or empty; both counted). A record whose image cannot
be read, or whose ``width``/``height`` disagree with it, is left out and counted in ``skipped_images``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from finegrain.data.images import ImageError, load_image
from finegrain.data.records import Record, RecordError, Region, check_record_size, fit_boxes
from finegrain.data.sample import crop_box

from .classification import DEFAULT_TEMPLATES, class_text_embeddings, classification_metrics, label_targets
from .encode import Transform, batched, encode_images, evaluating, parsed_records, report_skipped

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


class _Boxes:
    """What one pass over the labelled records collects: per way ``(boxes, D)`` embedding chunks, the kept
    boxes' labels and record keys, the skipped records' errors and the fitted boxes' counts."""

    def __init__(self):
        self.embeddings: dict[str, list[torch.Tensor]] = {"roi": [], "crop": []}
        self.labels: list[str] = []
        self.keys: list[str] = []
        self.skipped: list[str] = []
        self.clipped = self.dropped = 0


def _embed_boxes(model: nn.Module, labelled: Labelled, root: str | Path, transform: Transform,
                 crop_scale: float, batch_size: int, device: str | torch.device, progress: bool) -> _Boxes:
    """Load each image once and embed its fitted boxes both ways, ``batch_size`` images at a time."""
    height, width = model.image_size
    out = _Boxes()
    to_input = partial(to_model_input, size=(height, width), transform=transform)
    with tqdm(total=len(labelled), desc="boxes", unit="img", disable=not progress) as bar:
        for batch in batched(labelled, batch_size):
            pixels, boxes, crops = [], [], []
            for record, regions in batch:
                key = record.key or record.image
                try:
                    image = load_image(Path(root) / record.image)
                    check_record_size(record, image.size)
                    kept, clipped, dropped = fit_boxes(regions, image.width, image.height, key)
                except (ImageError, RecordError) as e:
                    out.skipped.append(str(e))
                    continue
                out.clipped, out.dropped = out.clipped + clipped, out.dropped + dropped
                if not kept:
                    continue
                pixels.append(to_input(image))
                scale = torch.tensor([width / image.width, height / image.height] * 2)
                boxes.append((torch.tensor([region.box for region in kept]) * scale).to(device))
                crops.extend(crop_box(image, region.box, crop_scale) for region in kept)
                out.labels.extend(region.label for region in kept)
                out.keys.extend(key for _ in kept)
            if pixels:
                out.embeddings["roi"].append(
                    model.encode_boxes(torch.stack(pixels).to(device), boxes, mode="v_only").float())
                out.embeddings["crop"].append(encode_images(model, crops, to_input, batch_size, device,
                                                            progress=False))
            bar.update(len(batch))
    return out


def evaluate_box_classification(model: nn.Module, records: Sequence[Record], root: str | Path,
                                transform: Transform, tokenizer: Callable[[list[str]], torch.Tensor],
                                class_names: Sequence[str] | None = None,
                                templates: Sequence[str] = DEFAULT_TEMPLATES, crop_scale: float = 1.0,
                                batch_size: int = 64, device: str | torch.device = "cpu",
                                progress: bool = True) -> dict[str, float]:
    """Classify every region that has a ``label``, by ``roi`` and by ``crop`` (see the module docstring).

    ``class_names`` defaults to the sorted distinct region labels; every label must be one of them.
    ``batch_size`` counts images for ``roi`` and crops for ``crop``. Returns ``{way}_top1``, ``{way}_top5``,
    ``{way}_mean_class_top1`` (percent) for ``way`` in ``roi``, ``crop``; ``num_boxes`` (boxes scored),
    ``boxes_clipped``, ``boxes_dropped`` (by ``fit_boxes``) and ``skipped_images``.
    """
    if crop_scale <= 0:
        raise ValueError(f"crop_scale must be positive, got {crop_scale}")
    records = parsed_records(records, "box_classification")
    labelled = [(record, [region for region in record.regions if region.label is not None])
                for record in records]
    labelled = [(record, regions) for record, regions in labelled if regions]
    if not labelled:
        raise ValueError(f"box classification needs regions with a 'label'; none of the {len(records)} "
                         "records has one")
    pairs = [(record.key or record.image, region.label) for record, regions in labelled for region in regions]
    names, _ = label_targets([label for _, label in pairs], [key for key, _ in pairs], class_names)
    with evaluating(model):
        boxes = _embed_boxes(model, labelled, root, transform, crop_scale, batch_size, device, progress)
        report_skipped("box_classification", boxes.skipped, len(labelled))
        if not boxes.labels:
            raise ValueError(f"box classification: fit_boxes dropped all {boxes.dropped} boxes (outside their "
                             "images or empty)")
        _, targets = label_targets(boxes.labels, boxes.keys, names)
        classifier = class_text_embeddings(model, tokenizer, names, templates, batch_size, device, progress)
    metrics: dict[str, float] = {}
    for way, chunks in boxes.embeddings.items():
        logits = torch.cat(chunks) @ classifier.T
        metrics.update({f"{way}_{name}": value for name, value in classification_metrics(logits, targets).items()})
    metrics.update(num_boxes=len(targets), boxes_clipped=boxes.clipped, boxes_dropped=boxes.dropped,
                   skipped_images=len(boxes.skipped))
    return metrics
