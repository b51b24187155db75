"""Readers (JSONL, CSV, COCO) and image loading: values, grouping and error messages."""

from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

from finegrain.data.images import ImageError, load_image, load_image_bytes
from finegrain.data.readers import (
    read_coco_captions,
    read_coco_instances,
    read_csv,
    read_jsonl,
    read_records,
)
from finegrain.data.records import RecordError, fit_boxes


def _png(width: int = 8, height: int = 6, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_json(path, obj) -> None:
    path.write_text(json.dumps(obj))


COCO_IMAGES = [{"id": 9, "file_name": "000009.jpg", "width": 640, "height": 480},
               {"id": 25, "file_name": "000025.jpg", "width": 100, "height": 50}]


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "grey.png"
    path.write_bytes(_png(8, 6, "L"))
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((0, 0)) == (128, 128, 128)


def test_load_image_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="absent.png.*not found"):
        load_image(tmp_path / "absent.png")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="garbage.jpg"):
        load_image(garbage)
    truncated = tmp_path / "truncated.png"
    data = _png(64, 64, "RGB")
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(truncated)


def test_load_image_bytes_names_the_member():
    assert load_image_bytes(_png(), "shard-0.tar:key.png").size == (8, 6)
    with pytest.raises(ImageError, match="shard-0.tar:key.jpg"):
        load_image_bytes(b"\xff\xd8 broken", "shard-0.tar:key.jpg")
    with pytest.raises(ImageError, match="empty"):
        load_image_bytes(b"", "x.png")


def test_read_jsonl_region_text_and_plain_caption_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    region_text = {"image": "a.png", "width": 64, "height": 64, "captions": ["two shapes"],
                   "regions": [{"box": [1, 2, 30, 40], "caption": "a red star", "label": "red star"}]}
    path.write_text(json.dumps(region_text) + "\n\n" + json.dumps({"image": "b.png", "caption": "a dog"}) + "\n")
    records = read_jsonl(path)
    assert [r.image for r in records] == ["a.png", "b.png"]
    assert records[0].regions[0].box == (1.0, 2.0, 30.0, 40.0)
    assert records[0].regions[0].label == "red star"
    assert records[1].captions == ("a dog",)
    assert records[1].key.endswith("data.jsonl:3")


@pytest.mark.parametrize("line, pattern", [
    ('{"image": "a.png", "caption": "x"', r"bad.jsonl:2: not valid JSON"),
    ('{"image": "a.png", "regions": {"box": [5, 5, 4, 9]}}', r"bad.jsonl:2: field 'regions' must be a list"),
    ('{"caption": "no image"}', r"bad.jsonl:2: field 'image'"),
])
def test_read_jsonl_errors_name_file_line_and_field(tmp_path, line, pattern):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "ok.png", "caption": "fine"}\n' + line + "\n")
    with pytest.raises(RecordError, match=pattern):
        read_jsonl(path, strict=True)
    records = read_jsonl(path)  # not strict: the line is indexed, and raises when it is used
    assert len(records) == 2 and records[0].image == "ok.png"
    with pytest.raises(RecordError, match=pattern):
        records[1]


def test_read_csv_and_tsv(tmp_path):
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('filepath,title\nimg/1.jpg,"a cat, sleeping"\nimg/2.jpg,a dog\n')
    records = read_csv(csv_path)
    assert [(r.image, r.captions) for r in records] == [("img/1.jpg", ("a cat, sleeping",)),
                                                        ("img/2.jpg", ("a dog",))]
    tsv_path = tmp_path / "pairs.tsv"
    tsv_path.write_text("path\ttext\nimg/3.jpg\ta bird, flying\n")
    records = read_csv(tsv_path, image_key="path", caption_key="text", sep="\t")
    assert records[0].captions == ("a bird, flying",)
    tsv_default = tmp_path / "default.tsv"
    tsv_default.write_text("filepath\ttitle\nimg/4.jpg\ta fish\n")
    assert read_records(tsv_default)[0].image == "img/4.jpg"


def test_read_csv_errors(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,caption\nimg/1.jpg,a cat\n")
    with pytest.raises(RecordError, match=r"pairs.csv: no column 'title'.*\['filepath', 'caption'\]"):
        read_csv(path)
    path.write_text("filepath,title\nimg/1.jpg,a cat\nimg/2.jpg,  \n")
    with pytest.raises(RecordError, match=r"pairs.csv:3: field 'title'"):
        read_csv(path, strict=True)
    records = read_csv(path)
    assert [r.image for r in records] == ["img/1.jpg"]
    assert [key for key, _ in records.failures] == [f"{path}:3"]


def test_read_coco_captions_groups_captions_per_image(tmp_path):
    path = tmp_path / "captions_val.json"
    _write_json(path, {"images": COCO_IMAGES, "annotations": [
        {"id": 1, "image_id": 25, "caption": "A giraffe. "},
        {"id": 2, "image_id": 9, "caption": "A plate of food."},
        {"id": 3, "image_id": 25, "caption": "Tall animal."}]})
    records = read_coco_captions(path, image_dir="val2017")
    assert [(r.image, r.captions, r.width, r.height) for r in records] == [
        ("val2017/000009.jpg", ("A plate of food.",), 640, 480),
        ("val2017/000025.jpg", ("A giraffe.", "Tall animal."), 100, 50)]
    assert [r.image for r in read_records(path)] == ["000009.jpg", "000025.jpg"]


def test_read_coco_captions_unknown_image_id(tmp_path):
    path = tmp_path / "captions.json"
    _write_json(path, {"images": COCO_IMAGES, "annotations": [{"id": 7, "image_id": 3, "caption": "x"}]})
    with pytest.raises(RecordError, match=r"captions.json: annotation 7: field 'image_id' 3"):
        read_coco_captions(path, strict=True)
    records = read_coco_captions(path)
    assert len(records) == 2 and [key for key, _ in records.failures] == [f"{path}: annotation 7"]


def _instances(annotations):
    return {"images": COCO_IMAGES, "annotations": annotations,
            "categories": [{"id": 1, "name": "bowl"}, {"id": 2, "name": "giraffe"}]}


def test_read_coco_instances_converts_xywh_and_leaves_geometry_to_fit_boxes(tmp_path):
    path = tmp_path / "instances.json"
    _write_json(path, _instances([
        {"id": 1, "image_id": 9, "category_id": 1, "bbox": [10.5, 20, 30, 40.25], "iscrowd": 0},
        {"id": 2, "image_id": 9, "category_id": 2, "bbox": [0, 0, 640, 480], "iscrowd": 1},
        {"id": 3, "image_id": 25, "category_id": 2, "bbox": [5, 5, 0, 10], "iscrowd": 0},
        {"id": 4, "image_id": 25, "category_id": 2, "bbox": [50, 10, 60, 40], "iscrowd": 0}]))
    records = read_records(path)
    assert records.failures == []
    first, second = records
    assert first.image == "000009.jpg" and first.captions == ()
    assert [(r.box, r.label) for r in first.regions] == [((10.5, 20.0, 40.5, 60.25), "bowl")]
    # zero-area and partly-outside boxes are kept; fit_boxes drops (5, 5, 5, 15) and clips x1 110 -> 100
    assert [r.box for r in second.regions] == [(5.0, 5.0, 5.0, 15.0), (50.0, 10.0, 110.0, 50.0)]
    kept, clipped, dropped = fit_boxes(second.regions, second.width, second.height, second.key)
    assert [r.box for r in kept] == [(50.0, 10.0, 100.0, 50.0)] and (clipped, dropped) == (1, 1)


@pytest.mark.parametrize("annotation, pattern", [
    ({"id": 5, "image_id": 25, "category_id": 1, "bbox": [60, 10, -50, 10]},
     r"inst.json: image 25: annotation 5: field 'bbox'.*negative width or height"),
    ({"id": 6, "image_id": 25, "category_id": 99, "bbox": [1, 1, 5, 5]},
     r"inst.json: image 25: annotation 6: field 'category_id' 99"),
    ({"id": 7, "image_id": 9, "category_id": 1, "bbox": [1, 1, 5]},
     r"inst.json: image 9: annotation 7: field 'bbox'"),
])
def test_read_coco_instances_errors(tmp_path, annotation, pattern):
    path = tmp_path / "inst.json"
    _write_json(path, _instances([annotation]))
    with pytest.raises(RecordError, match=pattern):
        read_coco_instances(path, strict=True)
    records = read_coco_instances(path)  # not strict: the bad annotation's region is dropped, its image kept
    assert len(records) == 2 and records.failures == []
    (image,) = [r for r in records if r.bad_regions]
    assert image.regions == () and re.search(pattern, image.bad_regions[0])


def test_read_coco_bad_image_entry_and_bad_json(tmp_path):
    path = tmp_path / "c.json"
    _write_json(path, {"images": [{"id": 4, "file_name": "a.jpg", "width": 0, "height": 5}], "annotations": []})
    with pytest.raises(RecordError, match=r"c.json: image 4: field 'width'"):
        read_coco_captions(path, strict=True)
    path.write_text('{"images": [')
    with pytest.raises(RecordError, match=r"c.json: not valid JSON"):
        read_records(path)


def test_read_records_rejects_unknown_suffix(tmp_path):
    with pytest.raises(RecordError, match=r"data.parquet.*supported: .jsonl, .csv, .tsv, .json"):
        read_records(tmp_path / "data.parquet")
