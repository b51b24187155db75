"""Classifying embeddings against class-name prompts: the text classifier and top-k metrics shared by
zero-shot image classification and box classification."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from .encode import encode_texts, evaluating
from .prompts import Templates, load_templates


def class_text_embeddings(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                          class_names: Sequence[str], templates: str | Sequence[str] | Templates = "simple",
                          batch_size: int = 64, device: str | torch.device = "cpu",
                          progress: bool = True) -> torch.Tensor:
    """``(C, D)`` class embeddings: per class, the L2-normalised mean of the normalised text embeddings of
    its prompts (CLIP's prompt ensembling). ``templates``: a built-in set name, a file or a list (see
    :func:`finegrain.eval.prompts.load_templates`)."""
    templates = load_templates(templates)
    if not class_names:
        raise DataError("need at least one class name")
    prompts = [prompt for name in class_names for prompt in templates.prompts(name)]
    with evaluating(model):
        embeddings = encode_texts(model, tokenizer, prompts, batch_size, device, progress,
                                  desc="class prompts")
    return F.normalize(embeddings.view(len(class_names), len(templates.templates), -1).mean(dim=1), dim=-1)


def label_targets(labels: Sequence[str], keys: Sequence[str],
                  class_names: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """Class names (``class_names``, or the sorted distinct ``labels``) and the ``(N,)`` class index of each
    label. ``keys[i]`` names the record of ``labels[i]`` in the error raised for a label not in the list."""
    names = sorted(set(labels)) if class_names is None else list(class_names)
    index = {name: i for i, name in enumerate(names)}
    if len(index) != len(names):
        raise DataError(f"class names must be distinct, got {names}")
    for key, label in zip(keys, labels, strict=True):
        if label not in index:
            raise DataError(f"{key}: field 'label' {label!r} is not one of the {len(names)} class names")
    return names, torch.tensor([index[label] for label in labels], dtype=torch.long)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Accuracy in percent from ``logits`` ``(N, C)`` and ``targets`` ``(N,)`` class indices.

    ``acc1``/``acc5``: micro accuracy; ``mean_per_class_recall`` / ``mean_per_class_acc5``: top-1 / top-5
    averaged over the classes present in ``targets`` (names as CLIP_benchmark's where it has them). A
    target is within top-k when fewer than k other classes score at least as high as it (ties count against
    it, so a constant classifier does not score).
    """
    if logits.ndim != 2 or targets.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"need logits (N, C) and targets (N,) with N > 0, got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    num_classes = logits.shape[1]
    targets = targets.to(logits.device)
    target_logit = logits.gather(1, targets[:, None])
    others = torch.ones_like(logits, dtype=torch.bool).scatter_(1, targets[:, None], False)
    rank = ((logits >= target_logit) & others).sum(dim=1)
    counts = torch.bincount(targets, minlength=num_classes)
    present = counts > 0
    metrics = {}
    for k, micro, macro in ((1, "acc1", "mean_per_class_recall"), (5, "acc5", "mean_per_class_acc5")):
        correct = (rank < k).float()
        per_class = torch.zeros(num_classes, device=logits.device).scatter_add_(0, targets, correct)
        metrics[micro] = 100.0 * correct.mean().item()
        metrics[macro] = 100.0 * (per_class[present] / counts[present]).mean().item()
    return metrics
