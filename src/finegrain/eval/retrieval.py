"""Image-text retrieval Recall@1/5/10, with every caption of an image a positive (COCO/Flickr protocol)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from finegrain.data.records import Record
from finegrain.errors import DataError

from .encode import Transform, encode_record_images, encode_texts, evaluating, parsed_records

log = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


def _top_k_hits(scores: torch.Tensor, positive: torch.Tensor) -> dict[int, torch.Tensor]:
    """``{K: (q,) bool}``: whether a positive is among the K gallery items ``torch.topk`` picks from each row of
    ``scores`` ``(q, G)`` (``positive`` ``(q, G)`` bool). CLIP_benchmark's rule: among exactly tied scores the
    order is topk's, one call per K."""
    return {k: positive.gather(1, scores.topk(min(k, scores.shape[1]), dim=1).indices).any(dim=1)
            for k in RECALL_AT}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      chunk_size: int = 1024) -> dict[str, float]:
    """Recall@K in percent, K in 1, 5, 10, named as CLIP_benchmark names them: image->text (texts retrieved
    for an image query) ``text_retrieval_recall@K``, text->image ``image_retrieval_recall@K``.

    Args:
        image_emb: ``(N, D)`` image embeddings (cosine similarity if normalised: scores are dot products).
        text_emb: ``(T, D)`` text embeddings.
        text_to_image: ``(T,)`` long, the image index each text describes; every image needs >= 1 text.
    An image counts as retrieved at K when any of its texts is in the top K; a text when its image is. Ties
    (identical captions) are broken as CLIP_benchmark breaks them: ``torch.topk`` over the rows (text->image)
    and the columns (image->text) of its score matrix ``text_emb @ image_emb.T``, computed here in chunks of
    ``chunk_size`` rows or columns (memory grows with ``chunk_size * (N + T)``, not ``N * T``).
    Also returns ``num_images`` and ``num_texts``.
    """
    num_images, num_texts = len(image_emb), len(text_emb)
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image must be ({num_texts},), got {tuple(text_to_image.shape)}")
    if num_texts == 0 or text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image must index the {num_images} images, "
                         f"got {text_to_image.tolist()[:10]}")
    text_to_image = text_to_image.to(image_emb.device)
    uncaptioned = (torch.bincount(text_to_image, minlength=num_images) == 0).nonzero().flatten()
    if len(uncaptioned):
        raise ValueError(f"images {uncaptioned.tolist()[:10]} have no text; each image needs at least one")
    image_ids = torch.arange(num_images, device=image_emb.device)
    hits: dict[str, list[dict[int, torch.Tensor]]] = {"text_retrieval": [], "image_retrieval": []}
    for start in range(0, num_images, chunk_size):  # columns of the score matrix: image queries
        images = slice(start, start + chunk_size)
        hits["text_retrieval"].append(_top_k_hits((text_emb @ image_emb[images].T).T,
                                                  image_ids[images, None] == text_to_image[None, :]))
    for start in range(0, num_texts, chunk_size):  # rows: text queries
        texts = slice(start, start + chunk_size)
        hits["image_retrieval"].append(_top_k_hits(text_emb[texts] @ image_emb.T,
                                                   text_to_image[texts, None] == image_ids[None, :]))
    metrics: dict[str, float] = {
        f"{direction}_recall@{k}": 100.0 * torch.cat([chunk[k] for chunk in chunks]).float().mean().item()
        for direction, chunks in hits.items() for k in RECALL_AT}
    metrics.update(num_images=num_images, num_texts=num_texts)
    return metrics


def captioned_records(records: Sequence[Record], task: str) -> tuple[list[Record], int]:
    """The parsed records of ``records`` that have captions, and how many parsed records have none (left
    out with a warning). Raises when none has a caption."""
    records = parsed_records(records, task)
    captioned = [record for record in records if record.captions]
    if not captioned:
        raise DataError(f"{task} needs records with captions; none of the {len(records)} records has one")
    if len(captioned) < len(records):
        log.warning("%s: skipped %d of %d records without captions", task, len(records) - len(captioned),
                    len(records))
    return captioned, len(records) - len(captioned)


def evaluate_retrieval(model: nn.Module, records: Sequence[Record], root: str | Path, transform: Transform,
                       tokenizer: Callable[[list[str]], torch.Tensor], batch_size: int = 64,
                       device: str | torch.device = "cpu", progress: bool = True) -> dict[str, float]:
    """Encode the images (``transform``: the model's val transform) and all captions of the records that
    have captions, then :func:`retrieval_metrics`. Records without captions are skipped and counted in
    ``uncaptioned_images``; an image that cannot be read is left out with its captions, counted in
    ``skipped_images``. Similarities are computed in chunks of queries, so memory grows with the data
    (``(N + T, D)`` embeddings), not with ``N x T``."""
    captioned, uncaptioned = captioned_records(records, "retrieval")
    with evaluating(model):
        image_emb, kept, skipped = encode_record_images(model, captioned, root, transform, batch_size, device,
                                                        "retrieval", progress)
        kept_records = [captioned[i] for i in kept]
        texts = [caption for record in kept_records for caption in record.captions]
        text_to_image = torch.tensor([i for i, record in enumerate(kept_records) for _ in record.captions])
        text_emb = encode_texts(model, tokenizer, texts, batch_size, device, progress)
    return {**retrieval_metrics(image_emb, text_emb, text_to_image), "skipped_images": skipped,
            "uncaptioned_images": uncaptioned}
