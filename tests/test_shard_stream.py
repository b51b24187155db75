"""ShardStream: shard assignment across ranks, bad samples, exact resume in a multi-worker DataLoader."""

from __future__ import annotations

import io
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from finegrain.data.collate import collate
from finegrain.data.records import Record
from finegrain.data.webdataset import ShardStream, iter_tar_samples, write_shards

NUM = 30
CORRUPT, NO_CAPTION = 7, 19  # undecodable image bytes; a record without captions


def _png(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (i, 255 - i, 3 * i % 256)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    pairs = []
    for i in range(NUM):
        captions = () if i == NO_CAPTION else (f"caption {i}",)
        pairs.append((Record(f"img/{i:06d}.png", captions), b"not a png" if i == CORRUPT else _png(i)))
    paths = write_shards(pairs, str(tmp_path_factory.mktemp("shards") / "train-%06d.tar"), samples_per_shard=5)
    assert len(paths) == 6
    return [str(p) for p in paths]


def build(image: Image.Image, record: Record, seed: int) -> dict[str, torch.Tensor]:
    if not record.captions:
        raise ValueError(f"{record.key or record.image}: field 'captions' is empty")
    return {"image": torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1),
            "text": torch.tensor([seed % 1000]),
            "id": torch.tensor(int(record.image.split("/")[-1].split(".")[0]))}


def _stream(shards, **kw) -> ShardStream:
    args = {"build": build, "seed": 3, "rank": 0, "world_size": 1, "batch_size": 2, "num_workers": 0}
    return ShardStream(shards, **{**args, **kw})


def _entries(urls) -> int:
    return sum(1 for url in urls for _ in iter_tar_samples(url))


def test_ranks_see_disjoint_samples_covering_the_epoch(shards):
    good = set(range(NUM)) - {CORRUPT, NO_CAPTION}
    seen, texts = [], {}
    for rank in range(2):
        stream = _stream(shards, rank=rank, world_size=2)
        own = stream.shards_of(rank, epoch=0)
        assert len(own) == 3
        # sample k of a worker is its raw entry k, or a replacement (flagged by bad_records) for a bad one
        samples = list(islice(stream.worker_samples(0), _entries(own)))
        ids = {int(s["id"]) for s in samples if not s["bad_records"]}
        seen.append(ids)
        texts.update({int(s["id"]): int(s["text"]) for s in samples if not s["bad_records"]})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == good
    assert set(_stream(shards).shards_of(0, 0)) == set(shards)
    assert _stream(shards).shards_of(0, 0) != _stream(shards).shards_of(0, 1)  # reshuffled each epoch
    # a sample is a pure function of (seed, epoch, key): the same with one rank as with two
    single = list(islice(_stream(shards).worker_samples(0), 2 * NUM))  # one worker: NUM entries an epoch
    epochs = [{int(s["id"]): int(s["text"]) for s in part if not s["bad_records"]}
              for part in (single[:NUM], single[NUM:])]
    assert epochs[0] == texts
    assert sum(epochs[0][i] != epochs[1][i] for i in good) > len(good) // 2  # new seeds each epoch
    refills = [s for s in single[:NUM - 2] if s["bad_records"]]  # replacements taken from the same epoch
    assert refills and all(int(s["text"]) != epochs[0][int(s["id"])] for s in refills)


def test_bad_samples_are_reported_with_url_and_key(shards):
    samples = list(islice(_stream(shards).worker_samples(0), NUM))
    assert len(samples) == NUM
    messages = [m for s in samples for _, m in s["bad_records"]]
    assert len(messages) == 2
    assert any("train-000001.tar: sample img/000007" in m and "cannot decode image" in m for m in messages)
    assert any("train-000003.tar: sample img/000019" in m and "captions" in m for m in messages)
    ids = [int(s["id"]) for s in samples]
    assert CORRUPT not in ids and NO_CAPTION not in ids
    batch = collate(samples[:4])
    assert batch["image"].shape == (4, 3, 4, 4) and isinstance(batch["bad_records"], list)


def _batches(shards, start_batch: int, count: int, num_workers: int = 2) -> list[dict]:
    stream = _stream(shards, batch_size=3, num_workers=num_workers, start_batch=start_batch)
    loader = DataLoader(stream, batch_size=3, num_workers=num_workers, collate_fn=collate)
    return list(islice(loader, count))


@pytest.mark.parametrize("num_workers", [2, 0])
def test_resume_reproduces_the_uninterrupted_run(shards, num_workers):
    full = _batches(shards, 0, 14, num_workers)  # 42 samples: more than an epoch, with both bad ones
    assert sum(len(b["bad_records"]) for b in full) >= 2
    assert len({int(i) for b in full for i in b["id"]}) == NUM - 2
    for k in (3, 4) if num_workers else (5,):
        resumed = _batches(shards, k, len(full) - k, num_workers)
        for b, (got, want) in enumerate(zip(resumed, full[k:]), start=k):
            assert got.keys() == want.keys()
            for key in want:
                if key in ("bad_records", "bad_regions"):
                    assert got[key] == want[key], f"batch {b}"
                else:
                    assert torch.equal(got[key], want[key]), f"batch {b}, {key}"


def test_roles_after_resume():
    stream = ShardStream([f"s{i}.tar" for i in range(4)], build, 0, 0, 1, batch_size=2, num_workers=2,
                         start_batch=5)
    assert [stream.role_of(w) for w in range(2)] == [(1, 2), (0, 3)]  # batch 5 is original worker 1's 3rd


def test_too_few_shards_for_the_readers(shards):
    with pytest.raises(ValueError, match=r"6 shards cannot feed 2 ranks x 4 data workers.*more.*fewer"):
        _stream(shards, world_size=2, num_workers=4)
