"""Zero-shot image classification: images with an image-level ``label`` against class-name prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from finegrain.data.records import Record
from finegrain.errors import DataError

from .classification import class_text_embeddings, classification_metrics, label_targets
from .encode import Transform, encode_record_images, evaluating, parsed_records
from .prompts import Templates, load_class_names


def labelled_records(records: Sequence[Record], class_names: str | Sequence[str] | None,
                     task: str) -> tuple[list[Record], list[str]]:
    """The parsed records of ``records`` that have a ``label``, and the class names: ``class_names`` (a
    built-in list name, a file or a list; see :func:`~finegrain.eval.prompts.load_class_names`) or the
    sorted distinct labels. Raises when no record has a label or a label is not a class name."""
    labelled = [record for record in parsed_records(records, task) if record.label is not None]
    if not labelled:
        raise DataError(f"zero-shot classification needs records with a 'label'; none of the {len(records)} "
                        "records has one")
    names = None if class_names is None else load_class_names(class_names)
    names, _ = label_targets([r.label for r in labelled], [r.key or r.image for r in labelled], names)
    return labelled, names


def evaluate_zero_shot(model: nn.Module, records: Sequence[Record], root: str | Path, transform: Transform,
                       tokenizer: Callable[[list[str]], torch.Tensor],
                       class_names: str | Sequence[str] | None = None,
                       templates: str | Sequence[str] | Templates = "simple", batch_size: int = 64,
                       device: str | torch.device = "cpu", progress: bool = True) -> dict[str, float]:
    """``acc1``, ``acc5``, ``mean_per_class_recall``, ``mean_per_class_acc5`` (percent) and ``num_images``
    over the records with a ``label``; images go through ``transform`` (the model's val transform).
    ``class_names``: a built-in list name (``"imagenet"``), a file or a list; by default the sorted
    distinct labels; every label must be one of them. ``templates``: a built-in set name (``"simple"``,
    ``"openai"``, ``"detailclip"``, ``"vild"``), a file or a list (see :mod:`finegrain.eval.prompts`).
    Images that cannot be read are left out and counted in ``skipped_images``."""
    labelled, names = labelled_records(records, class_names, "zero_shot")
    with evaluating(model):
        image_emb, kept, skipped = encode_record_images(model, labelled, root, transform, batch_size, device,
                                                        "zero_shot", progress)
        labelled = [labelled[i] for i in kept]
        _, targets = label_targets([r.label for r in labelled], [r.key or r.image for r in labelled], names)
        classifier = class_text_embeddings(model, tokenizer, names, templates, batch_size, device, progress)
    return {**classification_metrics(image_emb @ classifier.T, targets), "num_images": len(labelled),
            "skipped_images": skipped}
