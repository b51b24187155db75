"""Shared evaluator plumbing: eval-mode/no-grad context, image loading and batched encoding."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from finegrain.data.images import load_image
from finegrain.data.records import Record

T = TypeVar("T")
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
        raise ValueError(f"batch size must be positive, got {size}")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def iter_images(records: Iterable[Record], root: str | Path) -> Iterator[Image.Image]:
    """Each record's image, loaded as RGB from ``root / record.image`` (lazily, one at a time)."""
    for record in records:
        yield load_image(Path(root) / record.image)


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
    return torch.cat(embeddings)


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
