"""WebDataset shards: brace expansion, tar grouping, round trips and malformed samples."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from finegrain.data.records import Record, RecordError, Region
from finegrain.data.webdataset import expand_urls, iter_tar_samples, sample_to_record, write_shards


def test_expand_urls_ranges_lists_and_separators():
    assert expand_urls("shards/train-{000008..000011}.tar") == [
        "shards/train-000008.tar", "shards/train-000009.tar", "shards/train-000010.tar", "shards/train-000011.tar"]
    assert expand_urls("s-{8..10}.tar") == ["s-8.tar", "s-9.tar", "s-10.tar"]
    assert expand_urls("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
    assert expand_urls("a-{0..1}.tar::b.tar") == ["a-0.tar", "a-1.tar", "b.tar"]
    assert expand_urls(["a-{2..1}.tar", "c.tar"]) == ["a-2.tar", "a-1.tar", "c.tar"]
    with pytest.raises(ValueError):
        expand_urls("")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_iter_tar_samples_groups_consecutive_members_by_key(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        directory = tarfile.TarInfo("dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        _add(tar, "dir/a.JPG", b"A")
        _add(tar, "dir/a.seg.png", b"S")
        _add(tar, "dir/a.txt", b"cap a")
        _add(tar, "dir/._a.jpg", b"mac junk")
        _add(tar, "b.jpg", b"B")
        _add(tar, "b.txt", b"cap b")
    samples = list(iter_tar_samples(path))
    assert samples == [
        {"__key__": "dir/a", "__url__": str(path), "jpg": b"A", "seg.png": b"S", "txt": b"cap a"},
        {"__key__": "b", "__url__": str(path), "jpg": b"B", "txt": b"cap b"}]


def test_iter_tar_samples_rejects_duplicates_and_non_tar(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "k.jpg", b"1")
        _add(tar, "k.jpg", b"2")
    with pytest.raises(RecordError, match=r"dup.tar: sample k: member '.jpg' appears twice"):
        list(iter_tar_samples(path))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tar file" * 40)
    with pytest.raises(RecordError, match="junk.tar"):
        list(iter_tar_samples(junk))


def _records() -> list[tuple[Record, bytes]]:
    out = []
    for i in range(5):
        record = Record(f"train/{i:06d}.png", (f"caption {i}", f"other {i}"),
                        (Region((1.0, 2.0, 10.0 + i, 12.0), f"region {i}", "red star"),), 64, 64,
                        source={"proposer": "test"})
        out.append((record, bytes([i]) * (100 + i)))
    return out


def test_write_shards_round_trip(tmp_path):
    pairs = _records()
    paths = write_shards(pairs, str(tmp_path / "out" / "train-%06d.tar"), samples_per_shard=2)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not list((tmp_path / "out").glob("*.tmp"))
    urls = expand_urls(str(tmp_path / "out" / "train-{000000..000002}.tar"))
    samples = [s for url in urls for s in iter_tar_samples(url)]
    assert [s["__key__"] for s in samples] == [f"train/{i:06d}" for i in range(5)]
    assert [s["png"] for s in samples] == [image for _, image in pairs]
    assert samples[3]["txt"] == b"caption 3"
    for sample, (record, image) in zip(samples, pairs):
        parsed, image_bytes = sample_to_record(sample)
        assert image_bytes == image
        assert parsed.image == record.image  # the json carries no image: key + extension
        assert parsed.captions == record.captions and parsed.regions == record.regions
        assert (parsed.width, parsed.height, parsed.source) == (64, 64, {"proposer": "test"})
        assert parsed.key == f"{sample['__url__']}: sample {sample['__key__']}"
    again = write_shards(pairs, str(tmp_path / "again-%06d.tar"), samples_per_shard=2)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]  # deterministic shards


def test_write_shards_rejects_duplicate_keys_and_bad_suffix(tmp_path):
    record = Record("a/x.png", ("c",))
    with pytest.raises(ValueError, match="not unique"):
        write_shards([(record, b"1"), (record, b"2")], str(tmp_path / "s-%d.tar"), 10)
    with pytest.raises(ValueError, match="field 'image'"):
        write_shards([(Record("a/x.gif", ("c",)), b"1")], str(tmp_path / "t-%d.tar"), 10)


def test_sample_to_record_txt_and_metadata_json():
    sample = {"__key__": "k1", "__url__": "s.tar", "jpeg": b"J", "txt": b" a cat \n",
              "json": json.dumps({"url": "http://x", "caption": None, "width": 3}).encode()}
    record, image = sample_to_record(sample)  # img2dataset-style metadata json is not a record
    assert (record.image, record.captions, image) == ("k1.jpeg", ("a cat",), b"J")
    plain = {"__key__": "k2", "__url__": "s.tar", "png": b"P", "json": b'{"caption": "a dog"}'}
    assert sample_to_record(plain)[0].captions == ("a dog",)


@pytest.mark.parametrize("sample, pattern", [
    ({"txt": b"x"}, r"s.tar: sample k: no image member .*found .txt"),
    ({"jpg": b"J"}, r"s.tar: sample k: no caption"),
    ({"jpg": b"J", "txt": b"  "}, r"s.tar: sample k: field 'txt'"),
    ({"jpg": b"J", "json": b"{oops"}, r"s.tar: sample k: member '.json' is not valid JSON"),
    ({"jpg": b"J", "json": b'{"width": 8, "height": 8, "regions": 3}'}, r"s.tar: sample k: field 'regions' must"),
])
def test_sample_to_record_errors_name_url_and_key(sample, pattern):
    with pytest.raises(RecordError, match=pattern):
        sample_to_record({"__key__": "k", "__url__": "s.tar", **sample})
