"""LAION CLIP_benchmark's zero-shot classification and retrieval evaluators, run in-process on finegrain
records: on a :class:`~finegrain.models.FinegrainCLIP`, on a model written by ``finegrain export`` and
loaded by ``open_clip.create_model_and_transforms("local-dir:DIR")``, or on any model with
``encode_image`` / ``encode_text``. Their numbers equal :func:`~finegrain.eval.evaluate_zero_shot` and
:func:`~finegrain.eval.evaluate_retrieval` on the same records, transform and prompts (in float32; with AMP,
which CLIP_benchmark turns on by default and these functions only on CUDA, they differ by rounding).

CLIP_benchmark is the optional extra ``finegrain[benchmark]``; it is imported when a function runs. Its
fractions become percentages under the same names (``acc1``, ``acc5``, ``mean_per_class_recall``,
``image_retrieval_recall@K``, ``text_retrieval_recall@K``), with our counts beside them. Records are fed
through a loader yielding what its evaluators expect (``(images, class indices)`` or ``(images, caption
lists)``), leaving out unreadable images as ours do (``skipped_images``).

Two patches are applied only while one of its evaluators runs:

- NumPy >= 2.4: CLIP_benchmark 1.6's ``accuracy`` calls ``float()`` on a one-element 1-D array, which
  NumPy 2.4 refuses (CLIP_benchmark#147). When its ``accuracy`` fails that way on a tiny input, it is
  replaced by :func:`topk_accuracy`, which gives the same numbers.
- ``progress=False`` replaces its progress bars by disabled ones.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from finegrain.data.images import ImageError, load_image
from finegrain.data.records import Record

from .encode import Transform, evaluating, report_skipped
from .prompts import Templates, load_templates
from .retrieval import RECALL_AT, captioned_records
from .zero_shot import labelled_records


def _import(module: str) -> ModuleType:
    """``clip_benchmark.metrics.<module>``, or an error saying how to install it."""
    try:
        return importlib.import_module(f"clip_benchmark.metrics.{module}")
    except ImportError as e:
        raise ImportError("CLIP_benchmark is not installed: pip install 'finegrain[benchmark]' "
                          f"(or clip_benchmark); {e}") from e


class RecordImages(Dataset):
    """Item ``i``: ``(pixels (3, H, W) or None, targets[i], error or None)`` for ``records[i]``, its image
    loaded from ``root`` (None with the error when it cannot be read). ``classes`` are the class names of
    a classification set (CLIP_benchmark reads ``dataset.classes``)."""

    def __init__(self, records: Sequence[Record], root: str | Path, transform: Transform,
                 targets: Sequence[Any], classes: Sequence[str] = ()):
        self.records, self.root, self.transform = records, Path(root), transform
        self.targets, self.classes = targets, list(classes)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, Any, str | None]:
        try:
            return self.transform(load_image(self.root / self.records[index].image)), self.targets[index], None
        except ImageError as e:
            return None, self.targets[index], str(e)


class ReadableBatches:
    """Batches ``(images (B, 3, H, W), targets)`` of the readable items of a :class:`RecordImages`
    (targets: a ``(B,)`` long tensor of class indices, or the list of each image's captions). A pass
    lists the targets of the images read in ``read`` and the errors of those that could not be in
    ``skipped``, then reports them (raising when none could be read, see
    :func:`~finegrain.eval.encode.report_skipped`). ``dataset`` is there for CLIP_benchmark."""

    def __init__(self, dataset: RecordImages, batch_size: int, num_workers: int, task: str):
        self.dataset, self.task = dataset, task
        self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
        self.read: list[Any] = []
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        self.read, self.skipped = [], []
        for batch in self.loader:
            self.skipped += [error for pixels, _, error in batch if pixels is None]
            good = [(pixels, target) for pixels, target, _ in batch if pixels is not None]
            if good:
                targets = [target for _, target in good]
                self.read += targets
                yield (torch.stack([pixels for pixels, _ in good]),
                       torch.tensor(targets) if self.dataset.classes else targets)
        report_skipped(self.task, self.skipped, len(self.dataset))


def topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """CLIP_benchmark's ``accuracy``, as a fraction per k: the rows of ``output`` ``(N, C)`` whose
    ``target`` ``(N,)`` is among their ``k`` highest logits (``torch.topk``'s order), without ``float()``
    on a NumPy array."""
    hits = output.topk(max(topk), dim=1).indices == target[:, None]
    return [hits[:, :k].sum().item() / len(target) for k in topk]


def _accuracy_breaks(module: ModuleType) -> bool:
    """Whether CLIP_benchmark's ``accuracy`` fails on a one-row input (NumPy >= 2.4, CLIP_benchmark#147)."""
    try:
        module.accuracy(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long))
    except TypeError:
        return True
    return False


@contextmanager
def _replaced(module: ModuleType, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextmanager
def _running(module: ModuleType, model: nn.Module, device: str | torch.device,
             progress: bool) -> Iterator[str]:
    """Eval mode without gradients, the patches of the module doc, and ``device`` made CLIP_benchmark's
    (it takes a device type: ``"cuda"`` is then the given CUDA device). Yields the device type."""
    device = torch.device(device)
    with ExitStack() as stack:
        stack.enter_context(evaluating(model))
        stack.enter_context(torch.cuda.device(device) if device.type == "cuda" else nullcontext())
        if hasattr(module, "accuracy") and _accuracy_breaks(module):
            stack.enter_context(_replaced(module, "accuracy", topk_accuracy))
        if not progress:
            stack.enter_context(_replaced(module, "tqdm", partial(tqdm, disable=True)))
        yield device.type


def _percent(metrics: dict[str, float]) -> dict[str, float]:
    """CLIP_benchmark's fractions in percent; NaN (its ``acc5`` with fewer than 5 classes) left out."""
    return {name: 100.0 * value for name, value in metrics.items() if not math.isnan(value)}


def evaluate_clip_benchmark_zero_shot(model: nn.Module, records: Sequence[Record], root: str | Path,
                                      transform: Transform, tokenizer: Callable[[list[str]], torch.Tensor],
                                      class_names: str | Sequence[str] | None = None,
                                      templates: str | Sequence[str] | Templates = "simple",
                                      batch_size: int = 64, device: str | torch.device = "cpu",
                                      progress: bool = True, amp: bool | None = None,
                                      num_workers: int = 0) -> dict[str, float]:
    """``clip_benchmark.metrics.zeroshot_classification.evaluate`` on the labelled records, with the
    classes and prompts :func:`~finegrain.eval.evaluate_zero_shot` uses (each class's prompts are given to
    it as a class-specific prompt list, so every template set and its rules apply).

    Returns ``acc1``, ``acc5`` (left out with fewer than 5 classes: CLIP_benchmark gives NaN) and
    ``mean_per_class_recall`` in percent, ``num_images`` and ``skipped_images``. ``amp`` (CLIP_benchmark's
    autocast) defaults to on for CUDA, off otherwise; ``num_workers`` load images in loader workers.
    """
    module = _import("zeroshot_classification")
    labelled, names = labelled_records(records, class_names, "clip_benchmark_zero_shot")
    index = {name: i for i, name in enumerate(names)}
    dataset = RecordImages(labelled, root, transform, [index[r.label] for r in labelled], names)
    batches = ReadableBatches(dataset, batch_size, num_workers, "clip_benchmark_zero_shot")
    prompts = load_templates(templates)
    with _running(module, model, device, progress) as device_type:
        metrics = module.evaluate(model, batches, tokenizer, names, {n: prompts.prompts(n) for n in names},
                                  device_type, amp=device_type == "cuda" if amp is None else amp)
    return {**_percent(metrics), "num_images": len(batches.read), "skipped_images": len(batches.skipped)}


def evaluate_clip_benchmark_retrieval(model: nn.Module, records: Sequence[Record], root: str | Path,
                                      transform: Transform, tokenizer: Callable[[list[str]], torch.Tensor],
                                      batch_size: int = 64, device: str | torch.device = "cpu",
                                      progress: bool = True, amp: bool | None = None, num_workers: int = 0,
                                      recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """``clip_benchmark.metrics.zeroshot_retrieval.evaluate`` on the records with captions (every caption
    of an image a positive, as :func:`~finegrain.eval.evaluate_retrieval`).

    Returns ``image_retrieval_recall@K`` (text->image) and ``text_retrieval_recall@K`` (image->text) in
    percent for each K of ``recall_at`` up to the number of images (CLIP_benchmark cannot rank beyond
    it), ``num_images``, ``num_texts``, ``skipped_images`` and ``uncaptioned_images``. ``amp`` and
    ``num_workers`` as in :func:`evaluate_clip_benchmark_zero_shot`.
    """
    module = _import("zeroshot_retrieval")
    captioned, uncaptioned = captioned_records(records, "clip_benchmark_retrieval")
    dataset = RecordImages(captioned, root, transform, [list(r.captions) for r in captioned])
    batches = ReadableBatches(dataset, batch_size, num_workers, "clip_benchmark_retrieval")
    recall_k = [k for k in recall_at if k <= len(captioned)]
    with _running(module, model, device, progress) as device_type:
        metrics = module.evaluate(model, batches, tokenizer, device_type,
                                  amp=device_type == "cuda" if amp is None else amp, recall_k_list=recall_k)
    return {**_percent(metrics), "num_images": len(batches.read),
            "num_texts": sum(len(captions) for captions in batches.read), "skipped_images": len(batches.skipped),
            "uncaptioned_images": uncaptioned}
