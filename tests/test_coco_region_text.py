"""FineCLIP's COCO layout (captions json + proposals json + region-caption json) as region-text records."""

import json

import pytest
from PIL import Image

from finegrain.cli import main
from finegrain.config import load_config
from finegrain.data.coco_regions import read_coco_region_text, region_caption_key
from finegrain.data.loader import build_train_loader
from finegrain.data.readers import read_jsonl
from finegrain.data.records import RecordError, Region
from finegrain.data.sample import SampleBuilder
from finegrain.errors import ConfigError
from finegrain.models import get_tokenizer
from finegrain.sample_spec import SampleSpec
from finegrain.train.preflight import check_data_paths
from finegrain.train.trainer import Trainer

IMAGES = {1: "a.jpg", 2: "b.jpg", 3: "c.jpg", 4: "d.jpg"}


@pytest.fixture
def layout(tmp_path):
    """Four images in the proposals json: 1 good (one box captioned, one box whose key is missing), 2 has no
    caption, 3 has a malformed bbox, 4 good; image 5 has captions but no entry in the proposals json."""
    images = tmp_path / "train2017"
    images.mkdir()
    for name in [*IMAGES.values(), "e.jpg"]:
        Image.new("RGB", (64, 48), (120, 30, 200)).save(images / name)
    entries = [{"id": i, "file_name": name, "width": 64, "height": 48} for i, name in IMAGES.items()]
    captions = {"images": [*entries, {"id": 5, "file_name": "e.jpg", "width": 64, "height": 48}],
                "annotations": [{"id": 10, "image_id": 1, "caption": "a purple picture"},
                                {"id": 11, "image_id": 1, "caption": " a flat colour "},
                                {"id": 12, "image_id": 4, "caption": "another purple picture"},
                                {"id": 13, "image_id": 5, "caption": "not in the proposals"},
                                {"id": 14, "image_id": 3, "caption": "has a bad box"}]}
    proposals = {"images": entries, "categories": [{"id": 1, "name": "thing"}],
                 "annotations": [{"id": 1, "image_id": 1, "bbox": [1.7, 2.9, 20.6, 15.2], "category_id": 1},
                                 {"id": 2, "image_id": 1, "bbox": [30.0, 10.5, 12.9, 20.99], "category_id": 1},
                                 {"id": 3, "image_id": 2, "bbox": [0, 0, 10, 10], "category_id": 1},
                                 {"id": 4, "image_id": 3, "bbox": [1, 2, 3], "category_id": 1},
                                 {"id": 5, "image_id": 4, "bbox": [5.99, 6.5, 30.2, 20.7], "category_id": 1}]}
    region_captions = {"a.jpg_1_2_20_15.jpg": "the top left part",
                       "a.jpg_2_3_21_15.jpg": "rounded, not truncated: never used",
                       "b.jpg_0_0_10_10.jpg": "a region of an uncaptioned image",
                       "d.jpg_5_6_30_20.jpg": "the middle part"}
    paths = {}
    for name, data in (("captions", captions), ("regions", proposals), ("region_captions", region_captions)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(data))
    paths["root"] = images
    return paths


def test_region_caption_key_truncates_bbox_values_like_int():
    assert region_caption_key("x.jpg", [1.7, 2.9, 20.6, 15.2]) == "x.jpg_1_2_20_15.jpg"
    assert region_caption_key("x.jpg", [3, 4, 5, 6]) == "x.jpg_3_4_5_6.jpg"


def test_layout_gives_records_with_truncated_keys_missing_captions_and_counts(layout):
    records, summary = read_coco_region_text(layout["captions"], layout["regions"], layout["region_captions"])
    assert [r.image for r in records] == ["a.jpg", "d.jpg"]
    first, second = records[0], records[1]
    assert first.captions == ("a purple picture", "a flat colour")
    assert first.regions == (Region((1.7, 2.9, 1.7 + 20.6, 2.9 + 15.2), "the top left part"),
                             Region((30.0, 10.5, 30.0 + 12.9, 10.5 + 20.99), None))
    assert second.regions == (Region((5.99, 6.5, 5.99 + 30.2, 6.5 + 20.7), "the middle part"),)
    assert (first.width, first.height) == (64, 48)
    assert first.key == f"{layout['regions']}: image 1"
    assert (summary.images, summary.regions, summary.regions_without_caption) == (2, 3, 1)
    assert (summary.malformed, summary.unlisted_caption_images) == (2, 1)
    assert summary.missing_examples == ["a.jpg_30_10_12_20.jpg"]
    failures = dict(records.failures)
    assert "has no caption" in failures[f"{layout['regions']}: image 2"]
    assert "field 'bbox'" in failures[f"{layout['regions']}: image 3"]


def test_layout_strict_raises_at_the_first_malformed_record(layout):
    with pytest.raises(RecordError, match="image 2: has no caption"):
        read_coco_region_text(layout["captions"], layout["regions"], layout["region_captions"], strict=True)


def test_region_captions_that_are_not_an_object_or_not_strings_are_errors_naming_the_file(layout):
    layout["region_captions"].write_text(json.dumps([["a.jpg_1_2_20_15.jpg", "x"]]))
    with pytest.raises(RecordError, match=r"region_captions\.json: must be a JSON object"):
        read_coco_region_text(layout["captions"], layout["regions"], layout["region_captions"])
    layout["region_captions"].write_text(json.dumps({"d.jpg_5_6_30_20.jpg": 7}))
    records, _ = read_coco_region_text(layout["captions"], layout["regions"], layout["region_captions"])
    assert [r.image for r in records] == ["a.jpg"]
    assert "key 'd.jpg_5_6_30_20.jpg' must map to a non-empty caption string" in dict(records.failures)[
        f"{layout['regions']}: image 4"]


def _overrides(layout, tmp_path):
    return ["model.name=finegrain-test", "method.name=clip", f"data.train.path={layout['captions']}",
            f"data.train.regions={layout['regions']}", f"data.train.region_captions={layout['region_captions']}",
            f"data.train.root={layout['root']}", "data.batch_size=2", "data.num_workers=0",
            "data.max_bad_fraction=0.6", "train.steps=2", f"train.output_dir={tmp_path / 'run'}"]


def test_config_needs_both_region_files_and_preflight_names_a_missing_one(layout, tmp_path):
    with pytest.raises(ConfigError, match="data.train.regions and data.train.region_captions go together"):
        load_config(None, [f"data.train.path={layout['captions']}", f"data.train.regions={layout['regions']}"])
    with pytest.raises(ConfigError, match="needs data.train.path to be the COCO captions .json"):
        load_config(None, ["data.train.path=x.jsonl", "data.train.regions=r.json", "data.train.region_captions=c.json"])
    cfg = load_config(None, [*_overrides(layout, tmp_path), f"data.train.region_captions={tmp_path / 'nope.json'}"])
    with pytest.raises(ConfigError, match=r"data.train.region_captions='.*nope.json': the file does not exist"):
        check_data_paths(cfg)


def test_layout_trains_through_the_config_loader_and_trainer(layout, tmp_path):
    cfg = load_config(None, _overrides(layout, tmp_path))
    spec = SampleSpec(augment="none", regions=True, max_regions=3)
    builder = SampleBuilder(spec, (32, 32), get_tokenizer("finegrain-test"))
    loader, _ = build_train_loader(cfg.data, builder, seed=0, rank=0, world_size=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 32, 32)
    assert sorted(batch["box_valid"].sum(1).tolist()) == [1, 2]  # d.jpg: 1 box, a.jpg: 2 boxes
    assert sorted(batch["region_text_valid"].sum(1).tolist()) == [1, 1]  # a.jpg's second box has no caption
    result = Trainer(cfg, progress_bar=False).fit()
    assert result.step == 2 and result.last_losses["loss"] > 0


def test_convert_writes_jsonl_equal_to_the_reader_records(layout, tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    assert main(["convert", "--captions", str(layout["captions"]), "--regions", str(layout["regions"]),
                 "--region-captions", str(layout["region_captions"]), "--image-dir", "train2017",
                 "--output", str(out)]) == 0
    assert "2 images, 3 regions, 1 regions without a region caption" in capsys.readouterr().out
    expected, _ = read_coco_region_text(layout["captions"], layout["regions"], layout["region_captions"],
                                        image_dir="train2017")
    assert [r.to_json() for r in read_jsonl(out, strict=True)] == [r.to_json() for r in expected]
    assert expected[0].image == "train2017/a.jpg"
