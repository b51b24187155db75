"""Precomputed text embeddings, so that training with a frozen text tower never runs it.

A cache folder, written by ``finegrain embed-text`` (:func:`write_text_cache`):

- ``embeddings.npy``: float16 ``(N, D)``, L2-normalised embeddings of N distinct texts;
- ``hashes.npy``: uint64 ``(N,)``, sorted: :func:`text_hash` of the text of each row;
- ``meta.json``: ``format``, ``model``, ``pretrained``, ``embed_dim``, ``context_length``, ``count``, ``hash``
  (the hash scheme), and ``probe_text`` with ``probe``, its float32 embedding, against which
  :func:`check_cache_matches` compares the model being trained. Written last: a folder without it is
  not a cache (an interrupted write).

Texts are looked up by a 64-bit hash of their exact string (blake2b), not by the string: two different
texts collide with probability about N²/2⁶⁵ (3·10⁻⁶ for 10M texts).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import DataSourceConfig
from ..errors import DataError
from .loader import is_webdataset, resolve_source
from .records import Record, RecordError
from .webdataset import expand_urls, iter_tar_samples, sample_to_record

CACHE_FORMAT = "finegrain.text-cache/1"
HASH_SCHEME = "blake2b, digest_size=8, of the UTF-8 text, read little-endian"
PROBE_TEXT = "a photo of a brown dog lying on a red sofa next to an open window."
PROBE_MIN_COSINE = 0.999

EncodeText = Callable[[torch.Tensor], torch.Tensor]  # token ids (K, L) -> embeddings (K, D)


class TextCacheError(DataError, RuntimeError):
    """A text cache is missing, incomplete, lacks a text, or was made by another model."""


def text_hash(text: str) -> int:
    """The stable 64-bit hash of ``text`` that the cache is keyed by."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class TextEmbeddingCache:
    """Read-only view of a cache folder. ``meta.json`` is read at once; the arrays are opened
    memory-mapped on the first :meth:`lookup`, and never pickled (a loader worker opens its own)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise TextCacheError(f"text cache {self.dir}: no meta.json (not a text cache, or its writing was "
                                 "interrupted); make it with `finegrain embed-text --config ... --output DIR`")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TextCacheError(f"text cache {self.dir}: meta.json is not valid JSON ({e.msg}); make the cache "
                                 "again with `finegrain embed-text`") from None
        if self.meta.get("format") != CACHE_FORMAT:
            raise TextCacheError(f"text cache {self.dir}: meta.json field 'format' is {self.meta.get('format')!r}, "
                                 f"expected {CACHE_FORMAT!r}")
        self.dim: int = self.meta["embed_dim"]
        self._hashes: np.ndarray | None = None
        self._embeddings: np.ndarray | None = None

    def __len__(self) -> int:
        return self.meta["count"]

    def _open(self) -> None:
        hashes = np.load(self.dir / "hashes.npy", mmap_mode="r")
        embeddings = np.load(self.dir / "embeddings.npy", mmap_mode="r")
        if hashes.shape != (len(self),) or embeddings.shape != (len(self), self.dim):
            raise TextCacheError(f"text cache {self.dir}: hashes.npy {hashes.shape} and embeddings.npy "
                                 f"{embeddings.shape} do not match meta.json (count {len(self)}, embed_dim {self.dim})")
        self._hashes, self._embeddings = hashes, embeddings

    def lookup(self, texts: Sequence[str]) -> torch.Tensor:
        """``(K, D)`` float16 embeddings of ``texts``; :class:`TextCacheError` naming the first text the
        cache lacks."""
        if self._hashes is None:
            self._open()
        wanted = np.array([text_hash(t) for t in texts], dtype=np.uint64)
        rows = np.minimum(np.searchsorted(self._hashes, wanted), max(len(self) - 1, 0))
        found = self._hashes[rows] == wanted if len(self) else np.zeros(len(texts), dtype=bool)
        if not found.all():
            text = texts[int(np.flatnonzero(~found)[0])]
            raise TextCacheError(f"text cache {self.dir} has no embedding for the caption {text!r}: the cache "
                                 "was made from other data; remake it with `finegrain embed-text` for this config")
        return torch.from_numpy(np.ascontiguousarray(self._embeddings[rows]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_hashes": None, "_embeddings": None}


def embed_texts(texts: list[str], encode_text: EncodeText, tokenizer) -> torch.Tensor:
    """``(K, D)`` float32 L2-normalised embeddings on the CPU, without gradients."""
    with torch.no_grad():
        return F.normalize(encode_text(tokenizer(texts)).float(), dim=-1).cpu()


def record_texts(record: Record, labels: bool = False) -> Iterator[str]:
    """The texts a training sample of ``record`` may need: its captions and its regions' captions (with
    ``labels``, a region without a caption gives its label, as ``SampleSpec.label_as_region_text``)."""
    yield from record.captions
    for region in record.regions:
        text = region.caption or (region.label if labels else None)
        if text:
            yield text


def source_texts(src: DataSourceConfig, labels: bool = False) -> Iterator[str]:
    """Every text of a data source's records (map-style sources or WebDataset shards); malformed
    records, which training skips, are skipped."""
    if is_webdataset(src.path):
        for url in expand_urls(src.path):
            for sample in iter_tar_samples(url):
                try:
                    record, _ = sample_to_record(sample)
                except RecordError:
                    continue
                yield from record_texts(record, labels)
        return
    records, _ = resolve_source(src)
    for i in range(len(records)):
        try:
            record = records[i]
        except RecordError:
            continue
        yield from record_texts(record, labels)


def write_text_cache(out_dir: str | Path, texts: Iterable[str], encode_text: EncodeText, tokenizer,
                     meta: dict[str, Any], batch_size: int = 256, progress: bool = True) -> dict[str, Any]:
    """Embed each distinct text of ``texts`` once and write the cache folder (see the module docstring).

    ``texts`` is read once, streamed to a temporary file of the folder (one JSON string per line) while
    its hashes are collected; the distinct texts are then embedded from that file ``batch_size`` at a time
    into a memory-mapped ``embeddings.npy``. Memory: a few tens of bytes per text (hashes and their
    sort), never all the texts or their tokens. ``meta`` adds fields (model, pretrained, context length) to
    ``meta.json``; returns the complete meta.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # until the new cache is complete
    spool = out / "texts.tmp"
    hashes = array("Q")
    try:
        with spool.open("w", encoding="utf-8") as f:
            for text in texts:
                hashes.append(text_hash(text))
                f.write(json.dumps(text) + "\n")
        unique, first, row_of = np.unique(np.frombuffer(hashes, dtype=np.uint64), return_index=True,
                                          return_inverse=True)
        del hashes
        is_first = np.zeros(len(row_of), dtype=bool)
        is_first[first] = True
        probe = embed_texts([PROBE_TEXT], encode_text, tokenizer)[0]
        embeddings = np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=np.float16,
                                               shape=(len(unique), probe.shape[0]))
        with spool.open(encoding="utf-8") as f, tqdm(total=len(unique), desc="embedding texts", unit="text",
                                                      disable=not progress) as bar:
            distinct = ((json.loads(line), int(row_of[i])) for i, line in enumerate(f) if is_first[i])
            while chunk := list(islice(distinct, batch_size)):
                batch, rows = zip(*chunk)
                embeddings[list(rows)] = embed_texts(list(batch), encode_text, tokenizer).half().numpy()
                bar.update(len(rows))
        embeddings.flush()
        del embeddings
        with (out / "hashes.npy").open("wb") as f:
            np.save(f, unique)
    finally:
        spool.unlink(missing_ok=True)
    meta = {"format": CACHE_FORMAT, **meta, "embed_dim": int(probe.shape[0]), "count": len(unique),
            "hash": HASH_SCHEME, "probe_text": PROBE_TEXT, "probe": probe.tolist()}
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tmp.replace(out / "meta.json")
    return meta


def check_cache_matches(cache_dir: str | Path, encode_text: EncodeText, tokenizer,
                        model: str = "the training model") -> float:
    """Check that the cache was made by the text tower ``encode_text`` (with ``tokenizer``): the cosine of
    its embedding of the cache's probe text with the stored one must exceed ``PROBE_MIN_COSINE``, else
    :class:`TextCacheError` names the cache's model and ``model``. Returns the cosine."""
    cache = TextEmbeddingCache(cache_dir)
    stored = torch.tensor(cache.meta["probe"], dtype=torch.float32)
    probe = embed_texts([cache.meta["probe_text"]], encode_text, tokenizer)[0]
    made_by = f"{cache.meta.get('model')} (pretrained {cache.meta.get('pretrained')})"
    if probe.shape != stored.shape:
        raise TextCacheError(f"text cache {cache.dir} holds {stored.shape[0]}-d embeddings made by {made_by}, but "
                             f"{model} gives {probe.shape[0]}-d ones; remake it with `finegrain embed-text`")
    cosine = float(probe @ F.normalize(stored, dim=0))
    if cosine < PROBE_MIN_COSINE:
        raise TextCacheError(f"text cache {cache.dir} was made by {made_by}, not by {model}: its probe "
                             f"embedding differs (cosine {cosine:.4f} < {PROBE_MIN_COSINE}); remake it with "
                             "`finegrain embed-text` for this config")
    return cosine
