"""Shared evaluator plumbing: eval-mode/no-grad context, image loading ahead of the model that skips
unreadable images and malformed records (with a warning), and batched encoding."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from finegrain.data.images import ImageError, load_image
from finegrain.data.records import Record, RecordError
from finegrain.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
LOADER_THREADS = 4  # image decoding ahead of the model
Transform = Callable[[Image.Image], torch.Tensor]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run the block under ``model.eval()`` and ``torch.no_grad()``, then restore every submodule's
    previous train/eval flag (so a frozen tower left in eval mode inside a training model stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter), consuming ``items`` lazily."""
    if size < 1:
        raise DataError(f"batch size must be positive, got {size}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def loaded_ahead(load: Callable[[T], R], items: Iterable[T], threads: int = LOADER_THREADS) -> Iterator[R]:
    """``load(item)`` for each of ``items``, in order, computed by ``threads`` threads up to ``2 * threads``
    items ahead of the consumer, so that image decoding overlaps the model's work. An exception raised by
    ``load`` is raised here at its item (return errors as values to skip an item instead)."""
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) > 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def parsed_records(records: Sequence[Record], task: str) -> list[Record]:
    """The records of ``records`` that parse: a compact store (a JSONL index) raises :class:`RecordError`
    for a malformed line when it is read; such lines are left out with a warning naming the first few, as are
    the malformed regions the reader dropped from records it kept."""
    good, bad = [], []
    for i in range(len(records)):
        try:
            good.append(records[i])
        except RecordError as e:
            bad.append(str(e))
    if bad:
        log.warning("%s: skipped %d malformed record(s); first: %s", task, len(bad), "; ".join(bad[:3]))
    bad_regions = [message for record in good for message in record.bad_regions]
    if bad_regions:
        log.warning("%s: left out %d malformed region(s); first: %s", task, len(bad_regions),
                    "; ".join(bad_regions[:3]))
    return good


def iter_images(records: Iterable[Record], root: str | Path, skipped: list[str]) -> Iterator[tuple[int, Image.Image]]:
    """``(position, image)`` for each record whose image loads (RGB, EXIF-oriented, from ``root /
    record.image``; decoded a few ahead by :func:`loaded_ahead`); the error of each that does not is
    appended to ``skipped``."""

    def load(record: Record) -> Image.Image | ImageError:
        try:
            return load_image(Path(root) / record.image)
        except ImageError as e:
            return e

    for i, image in enumerate(loaded_ahead(load, records)):
        if isinstance(image, ImageError):
            skipped.append(str(image))
        else:
            yield i, image


def report_skipped(task: str, skipped: list[str], total: int) -> None:
    """Warn about images left out of ``task`` (naming the first few); raise when no image was usable."""
    if not skipped:
        return
    first = "; ".join(skipped[:3])
    if len(skipped) == total:
        raise DataError(f"{task}: none of the {total} images could be used; first errors: {first}")
    log.warning("%s: skipped %d of %d images that could not be used; first: %s", task, len(skipped), total, first)


def check_usable(task: str, items: Sequence[T], load: Callable[[T], object], where: str) -> None:
    """Before training: ``load`` the held-out ``items`` in turn until one can be used (``load`` raises
    :class:`ImageError` or :class:`RecordError` for one that cannot); when none can (a wrong image root, every
    label map in colour), the ``ValueError`` the evaluation would raise after training (:func:`report_skipped`)
    is raised now, naming ``where`` (e.g. ``data.val.path`` and its image root)."""
    errors = []
    for item in items:
        try:
            load(item)
            return
        except (ImageError, RecordError) as e:
            errors.append(str(e))
    if not errors:
        raise ValueError(f"{task}: {where} has no held-out image to score")
    raise ValueError(f"{task}: none of the {len(errors)} held-out images of {where} can be used; first errors: "
                     + "; ".join(errors[:3]))


def encode_record_images(model: nn.Module, records: Sequence[Record], root: str | Path, transform: Transform,
                         batch_size: int, device: str | torch.device, task: str,
                         progress: bool = True) -> tuple[torch.Tensor, list[int], int]:
    """Encode the images of ``records``, leaving out those that cannot be read (see :func:`report_skipped`).

    Returns ``(N, D)`` normalised embeddings, the positions in ``records`` of the ``N`` images encoded,
    and the number of images skipped.
    """
    kept: list[int] = []
    skipped: list[str] = []

    def images() -> Iterator[Image.Image]:
        for i, image in iter_images(records, root, skipped):
            kept.append(i)
            yield image

    embeddings = encode_images(model, images(), transform, batch_size, device, total=len(records),
                               progress=progress)
    report_skipped(task, skipped, len(records))
    return embeddings, kept, len(skipped)


def encode_images(model: nn.Module, images: Iterable[Image.Image], transform: Transform, batch_size: int,
                  device: str | torch.device, total: int | None = None, progress: bool = True,
                  desc: str = "images") -> torch.Tensor:
    """PIL images -> ``(N, D)`` L2-normalised ``model.encode_image`` embeddings on ``device``.

    ``transform`` maps one PIL image to a ``(3, H, W)`` tensor; ``total`` only sizes the progress bar.
    """
    embeddings = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in batched(images, batch_size):
            pixels = torch.stack([transform(image) for image in batch]).to(device)
            embeddings.append(model.encode_image(pixels, normalize=True).float())
            bar.update(len(batch))
    return torch.cat(embeddings) if embeddings else torch.zeros(0)


def encode_texts(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], texts: Sequence[str],
                 batch_size: int, device: str | torch.device, progress: bool = True,
                 desc: str = "texts") -> torch.Tensor:
    """Strings -> ``(T, D)`` L2-normalised ``model.encode_text`` embeddings on ``device``."""
    embeddings = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for batch in batched(texts, batch_size):
            embeddings.append(model.encode_text(tokenizer(batch).to(device), normalize=True).float())
            bar.update(len(batch))
    return torch.cat(embeddings)
