"""Compact record stores (JSONL line index, packed records) and the per-epoch cached sampler order."""

from __future__ import annotations

import json
import pickle
from itertools import islice

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from finegrain.data.dataset import RecordDataset, ResumableBatchSampler, sample_seed
from finegrain.data.readers import read_coco_instances, read_csv, read_jsonl
from finegrain.data.record_store import JsonlIndex, PackedRecords
from finegrain.data.records import Record, Region, parse_record

LINES = [
    {"image": "a.png", "width": 64, "height": 48, "captions": ["two shapes", "zwei Formen: é"],
     "regions": [{"box": [1, 2, 30, 40.5], "caption": "a red star", "label": "red star", "score": 0.5},
                 {"box": [0, 0, 64, 48]}], "label": "scene", "source": {"proposer": "given"}},
    {"image": "b.png", "caption": "a dog"},
    {"image": "c/d.png", "captions": []},
]


def _reference(path, lines: dict[int, dict]) -> list[Record]:
    """What the old list reader returned: one parsed record per non-blank line, keyed ``file:line``."""
    return [parse_record(obj, f"{path}:{line}") for line, obj in lines.items()]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1 << 20])
def test_jsonl_index_gives_the_records_of_the_old_list_reader(tmp_path, chunk_bytes):
    path = tmp_path / "data.jsonl"
    # a BOM, a blank and a whitespace-only line, CRLF endings and no final newline
    text = ("\ufeff" + json.dumps(LINES[0]) + "\r\n\n  \t\n" + json.dumps(LINES[1], ensure_ascii=False) + "\r\n"
            + json.dumps(LINES[2]))
    path.write_text(text, encoding="utf-8", newline="")
    index = JsonlIndex.build(path, chunk_bytes=chunk_bytes)
    expected = _reference(path, {1: LINES[0], 4: LINES[1], 5: LINES[2]})
    assert index.lines.tolist() == [1, 4, 5]
    assert index.starts.dtype.name == index.ends.dtype.name == index.lines.dtype.name == "int64"
    assert list(index) == expected
    assert index[-1] == expected[-1] and index[1:] == expected[1:]
    with pytest.raises(IndexError, match="record index 3 out of range for 3 records"):
        index[3]


def test_stores_pickle_and_read_the_same_records_after(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    index = read_jsonl(path)
    index[0]  # opens the file: the open handle must not travel in the pickle
    packed = PackedRecords.pack(list(index), key_prefix=f"{path}:")
    for store in (index, packed):
        copy = pickle.loads(pickle.dumps(store))
        assert list(copy) == list(store) == _reference(path, {1: LINES[0], 2: LINES[1], 3: LINES[2]})


def test_packed_records_round_trip_every_field_and_strip_the_key_prefix():
    records = [Record("x.jpg", ("a", "b"), (Region((0.5, 1.0, 2.0, 3.25), "cap", "lab", 0.9),
                                           Region((0.0, 0.0, 1.0, 1.0))), 10, 20, "img-label", "f.csv:2",
                      {"captioner": "rule"}),
               Record("y.jpg", key="f.csv:3")]
    packed = PackedRecords.pack(iter(records), key_prefix="f.csv:")
    assert list(packed) == records and len(packed) == 2
    assert b"f.csv" not in packed.data.tobytes()  # keys are stored without the prefix
    assert packed.offsets.dtype.name == "int64" and packed.data.dtype.name == "uint8"
    with pytest.raises(ValueError, match="does not start with the store's key prefix 'g:'"):
        PackedRecords.pack(records, key_prefix="g:")


def test_csv_and_coco_readers_return_packed_records_equal_to_records_built_by_hand(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('filepath,title\nimg/1.jpg,"a cat, sleeping"\nimg/2.jpg,a dog\n')
    records = read_csv(csv_path)
    assert isinstance(records, PackedRecords)
    assert list(records) == [Record("img/1.jpg", ("a cat, sleeping",), key=f"{csv_path}:2"),
                             Record("img/2.jpg", ("a dog",), key=f"{csv_path}:3")]
    coco = tmp_path / "inst.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "file_name": "a.jpg", "width": 40, "height": 30}],
                                "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 3, 4]}],
                                "categories": [{"id": 3, "name": "cup"}]}))
    assert list(read_coco_instances(coco, image_dir="val")) == [
        Record("val/a.jpg", (), (Region((1.0, 2.0, 4.0, 6.0), label="cup"),), 40, 30, key=f"{coco}: image 7")]


def build_sample(image: Image.Image, record: Record, seed: int) -> dict:
    """A picklable sample builder for loader workers: the record's line number and the image width."""
    return {"line": torch.tensor(int(record.key.rsplit(":", 1)[1])), "width": torch.tensor(image.width)}


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_record_dataset_over_a_jsonl_index_in_loader_workers(tmp_path, context):
    Image.new("RGB", (5, 3)).save(tmp_path / "a.png")
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"image": "a.png", "caption": f"c{i}"}) for i in range(6)]
    lines[3] = "{broken"
    path.write_text("\n".join(lines) + "\n")
    dataset = RecordDataset(read_jsonl(path), tmp_path, build_sample)
    loader = DataLoader(dataset, batch_sampler=[[(i, 0) for i in range(6)]], num_workers=1,
                        multiprocessing_context=context, collate_fn=list)
    samples = next(iter(loader))
    assert [int(s["line"]) for s in samples] == [1, 2, 3, 5, 5, 6]  # line 4 is bad: line 5 replaces it
    assert [[i for i, _ in s["bad_records"]] for s in samples] == [[], [], [], [3], [], []]
    assert all(int(s["width"]) == 5 for s in samples)


def _old_batches(num_records, batch_size, seed, rank, world_size, count):
    """The sampler's formula before the order was cached: a fresh permutation for every micro-batch."""
    per_epoch = num_records // (batch_size * world_size)
    out = []
    for position in range(count):
        epoch, batch = divmod(position, per_epoch)
        order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed + epoch))
        start = (batch * world_size + rank) * batch_size
        out.append([(int(i), sample_seed(seed, epoch, int(i))) for i in order[start:start + batch_size]])
    return out


@pytest.mark.parametrize("rank", [0, 1])
def test_sampler_order_is_unchanged_and_resumes_exactly(rank):
    old = _old_batches(103, 4, 7, rank, 2, 40)  # 12 micro-batches an epoch: 40 spans 4 epochs
    assert list(islice(ResumableBatchSampler(103, 4, 7, rank, 2), 40)) == old
    assert list(islice(ResumableBatchSampler(103, 4, 7, rank, 2, start_batch=17), 23)) == old[17:]


def test_sampler_draws_one_permutation_per_epoch(monkeypatch):
    calls = []
    randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **kw: calls.append(a[0]) or randperm(*a, **kw))
    sampler = ResumableBatchSampler(1000, 10, seed=0)  # 100 micro-batches an epoch
    list(islice(sampler, 250))
    assert calls == [1000, 1000, 1000]
