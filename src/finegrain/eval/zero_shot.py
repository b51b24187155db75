"""Zero-shot image classification: images with an image-level ``label`` against class-name prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from finegrain.data.records import Record

from .classification import DEFAULT_TEMPLATES, class_text_embeddings, classification_metrics, label_targets
from .encode import Transform, encode_record_images, evaluating, parsed_records


def evaluate_zero_shot(model: nn.Module, records: Sequence[Record], root: str | Path, transform: Transform,
                       tokenizer: Callable[[list[str]], torch.Tensor],
                       class_names: Sequence[str] | None = None,
                       templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 64,
                       device: str | torch.device = "cpu", progress: bool = True) -> dict[str, float]:
    """``top1``, ``top5``, ``mean_class_top1`` (percent) and ``num_images`` over the records with a
    ``label``; images go through ``transform`` (the model's val transform). ``class_names`` defaults to
    the sorted distinct labels; every label must be one of them. Images that cannot be read are left out
    and counted in ``skipped_images``."""
    labelled = [record for record in parsed_records(records, "zero_shot") if record.label is not None]
    if not labelled:
        raise ValueError(f"zero-shot classification needs records with a 'label'; none of the {len(records)} "
                         "records has one")
    names, _ = label_targets([r.label for r in labelled], [r.key or r.image for r in labelled], class_names)
    with evaluating(model):
        image_emb, kept, skipped = encode_record_images(model, labelled, root, transform, batch_size, device,
                                                        "zero_shot", progress)
        labelled = [labelled[i] for i in kept]
        _, targets = label_targets([r.label for r in labelled], [r.key or r.image for r in labelled], names)
        classifier = class_text_embeddings(model, tokenizer, names, templates, batch_size, device, progress)
    return {**classification_metrics(image_emb @ classifier.T, targets), "num_images": len(labelled),
            "skipped_images": skipped}
