"""Fine-tuning samples: geometry of boxes through resize / crop / flip, label maps and masks moved with the pixels,
and bad targets (label maps of another size, values beyond the classes, masks that do not decode) skipped and
counted."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from finegrain.config import DataSourceConfig
from finegrain.data.collate import collate
from finegrain.data.dataset import BadRecordCounter, RecordDataset
from finegrain.data.demo import DEMO_CLASSES, SEGMENTATION_CLASSES
from finegrain.data.dense import DenseSample, DenseSampleBuilder, crop, hflip, keep_ratio_size, pad, resize
from finegrain.data.geometry import Geometry
from finegrain.data.loader import resolve_source
from finegrain.data.records import Record, Region
from finegrain.sample_spec import DenseTargets, SampleSpec


def test_boxes_follow_a_crop_resize_and_flip_by_hand():
    # source box (20, 10)-(30, 20); crop (10, 0)-(50, 40) resized to 80x80 (x2): (20, 20)-(40, 40); flipped in 80 px
    geometry = Geometry.crop_resize((10, 0, 50, 40), (80, 80)).then(Geometry(1, 1, 0, 0, 80, 80, flip=True))
    boxes, kept, clipped = geometry.map_boxes(torch.tensor([[20.0, 10, 30, 20], [0, 0, 8, 8], [45, 30, 60, 50]]))
    assert boxes[0].tolist() == [40.0, 20.0, 60.0, 40.0]
    assert kept.tolist() == [True, False, True]  # the second box lies left of the crop
    assert boxes[2].tolist() == [0.0, 60.0, 10.0, 80.0] and clipped.tolist() == [False, False, True]


def test_composed_geometry_equals_its_steps_applied_in_turn():
    first, second = Geometry(2, 0.5, 10, 4, 100, 50, flip=True), Geometry(0.5, 2, 3, 1, 40, 90, flip=True)
    boxes = torch.tensor([[20.0, 10, 30, 20], [5, 5, 60, 40]])
    stepwise = second.map_boxes(first.map_boxes(boxes)[0])[0]
    assert torch.allclose(first.then(second).map_boxes(boxes)[0], stepwise)


def test_keep_ratio_size_is_mmcv_rescale():
    # 2048x512 scale: a 683x512 image fits its short side (factor 1.0); a 4000x1000 image its long side (0.512)
    assert keep_ratio_size(683, 512, (2048, 512)) == (683, 512)
    assert keep_ratio_size(4000, 1000, (2048, 512)) == (2048, 512)
    assert keep_ratio_size(640, 427, (1333, 800)) == (1199, 800)


def _sample(h=40, w=60):
    image = torch.arange(3 * h * w, dtype=torch.int64).reshape(3, h, w).remainder(256).to(torch.uint8)
    label = torch.zeros(h, w, dtype=torch.long)
    label[10:20, 30:50] = 3
    masks = (label == 3)[None].to(torch.uint8)
    return DenseSample(image, label, torch.tensor([[30.0, 10, 50, 20]]), torch.tensor([3]), masks)


def _box_of(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("step", [lambda s: resize(s, 120, 80), lambda s: crop(s, 5, 25, 20, 30), hflip,
                                  lambda s: pad(s, 64, 64, 255)])
def test_label_maps_masks_and_boxes_move_together(step):
    out = step(_sample())
    assert out.label.shape == out.masks.shape[1:] == out.image.shape[1:]
    assert _box_of(out.label == 3) == _box_of(out.masks[0]) == [round(v) for v in out.boxes[0].tolist()]


def test_padding_fills_labels_with_ignore_and_images_with_zero():
    out = pad(_sample(), 64, 64, 255)
    assert (out.label[40:] == 255).all() and (out.label[:, 60:] == 255).all() and (out.image[:, 40:] == 0).all()


def _demo_records():
    return resolve_source(DataSourceConfig(path="demo:train"))


SEG = DenseTargets("segmentation", len(SEGMENTATION_CLASSES), scale=(128, 64), ratio_range=(0.5, 2.0), crop=(64, 64),
                   cat_max_ratio=0.75, photometric=True, pad=(64, 64))


def test_segmentation_batches_of_demo_data_have_labels_of_its_classes_and_are_reproducible():
    records, root = _demo_records()
    dataset = RecordDataset(records, root, DenseSampleBuilder(SampleSpec(caption="none", augment="none", dense=SEG)))
    batch = collate([dataset[(i, 7 + i)] for i in range(4)])
    assert batch["image"].shape == (4, 3, 64, 64) and batch["label"].shape == (4, 64, 64)
    values = set(batch["label"].unique().tolist())
    assert values <= set(range(len(SEGMENTATION_CLASSES))) | {255} and len(values) > 2
    again = collate([dataset[(i, 7 + i)] for i in range(4)])
    assert torch.equal(batch["image"], again["image"]) and torch.equal(batch["label"], again["label"])


def test_instances_of_demo_data_carry_masks_inside_their_boxes():
    records, root = _demo_records()
    dense = DenseTargets("instances", len(DEMO_CLASSES), class_names=tuple(DEMO_CLASSES), masks=True, max_instances=4,
                         scale=(128, 128), ratio_range=(0.8, 1.5), crop=(96, 96), pad=(96, 96))
    dataset = RecordDataset(records, root, DenseSampleBuilder(SampleSpec(caption="none", augment="none", dense=dense)))
    batch = collate([dataset[(i, i)] for i in range(6)])
    valid = batch["instance_valid"].nonzero().tolist()  # the order of the concatenated mask rows
    assert batch["instance_masks"].shape == (len(valid), 96, 96) and batch["image_size"].shape == (6, 2)
    assert len(valid) >= 6
    for (i, j), mask in zip(valid, batch["instance_masks"]):
        x0, y0, x1, y1 = batch["instance_boxes"][i, j].tolist()  # clipped boxes are not recomputed (as mmdet)
        mx0, my0, mx1, my1 = _box_of(mask)
        assert x0 - 1 <= mx0 < mx1 <= x1 + 1 and y0 - 1 <= my0 < my1 <= y1 + 1


def _write(tmp_path, name, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(tmp_path / name)
    return name


def _dataset(tmp_path, records, dense):
    counter = BadRecordCounter(1.0, 0)
    build = DenseSampleBuilder(SampleSpec(caption="none", augment="none", dense=dense))
    return RecordDataset(records, tmp_path, build, max_bad_fraction=1.0), counter


def test_label_maps_of_another_size_or_beyond_the_classes_are_skipped_and_counted(tmp_path):
    image = _write(tmp_path, "a.png", np.full((16, 16, 3), 100))
    good = _write(tmp_path, "good.png", np.full((16, 16), 2))
    small = _write(tmp_path, "small.png", np.zeros((8, 16)))
    beyond = _write(tmp_path, "beyond.png", np.full((16, 16), 9))
    records = [Record(image, key="small", label_map=small), Record(image, key="beyond", label_map=beyond),
               Record(image, key="none"), Record(image, key="good", label_map=good)]
    dense = DenseTargets("segmentation", 4, scale=(16, 16), crop=(16, 16), pad=(16, 16), flip=0.0)
    dataset, counter = _dataset(tmp_path, records, dense)
    sample = dataset[(0, 0)]
    counter.update(sample["records_tried"], sample["bad_records"])
    assert (sample["label"] == 2).all() and counter.bad == 3
    messages = " | ".join(message for _, message in sample["bad_records"])
    assert "small.png: field 'label_map' is 16x8 (WxH) but its image is 16x16" in messages
    assert "beyond.png: field 'label_map' has value 9" in messages and "beyond the 4 classes" in messages
    assert "none: field 'label_map' is missing" in messages


def test_masks_that_do_not_decode_drop_their_instance_only_and_unlisted_classes_are_counted(tmp_path):
    image = _write(tmp_path, "a.png", np.full((32, 32, 3), 100))
    square = np.zeros((32, 32), dtype=np.uint8)
    square[4:12, 4:12] = 1
    rle = mask_utils.encode(np.asfortranarray(square))
    regions = (Region((4, 4, 12, 12), label="red square", mask={"size": [32, 32], "counts": rle["counts"].decode()}),
               Region((14, 14, 20, 20), label="red circle", mask=[[14, 14, 20]]),  # a polygon of 1.5 points
               Region((20, 20, 30, 30), label="blue star", mask=[[20, 20, 30, 20, 30, 30]]),
               Region((0, 0, 5, 5), label="not listed"))
    dense = DenseTargets("instances", 3, class_names=("red square", "red circle", "blue star"), masks=True,
                         max_instances=4, scale=(32, 32), pad=(32, 32), flip=0.0)
    dataset, _ = _dataset(tmp_path, [Record(image, regions=regions, width=32, height=32, key="rec")], dense)
    sample = dataset[(0, 0)]
    assert sample["instance_valid"].tolist() == [True, True, False, False]
    assert sample["instance_labels"][:2].tolist() == [0, 2] and sample["instances_unlisted"] == 1
    assert sample["instances_cut"] == 0
    assert torch.equal(sample["instance_masks"][0], torch.from_numpy(square))
    assert sample["instance_masks"][1].sum() > 0
    assert len(sample["bad_regions"]) == 1 and "rec: regions[1]: field 'mask' does not decode" in sample["bad_regions"][0]


def test_an_image_without_instances_gives_an_empty_valid_sample(tmp_path):
    image = _write(tmp_path, "a.png", np.full((32, 32, 3), 100))
    dense = DenseTargets("instances", 1, class_names=("thing",), masks=True, max_instances=3, scale=(32, 32),
                         pad=(32, 32))
    dataset, _ = _dataset(tmp_path, [Record(image, key="empty")], dense)
    sample = dataset[(0, 0)]
    assert not sample["instance_valid"].any() and sample["instance_masks"].shape == (0, 32, 32)


def test_instances_beyond_max_instances_are_left_out_and_counted(tmp_path):
    image = _write(tmp_path, "a.png", np.full((32, 32, 3), 100))
    regions = tuple(Region((2 * i, 2 * i, 2 * i + 8, 2 * i + 8), label="thing") for i in range(5))
    dense = DenseTargets("instances", 1, class_names=("thing",), max_instances=3, scale=(32, 32), pad=(32, 32),
                         flip=0.0)
    dataset, _ = _dataset(tmp_path, [Record(image, regions=regions, width=32, height=32, key="many")], dense)
    sample = dataset[(0, 0)]
    assert sample["instance_valid"].all() and sample["instances_cut"] == 2
    assert sample["instance_boxes"][:, 0].tolist() == [0, 2, 4]


def test_segmentation_folder_sources_become_records_with_label_maps(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    for folder in ("images/training", "annotations/training"):
        (base / folder).mkdir(parents=True)
    _write(base / "images/training", "ADE_1.jpg", np.zeros((8, 8, 3)))
    _write(base / "annotations/training", "ADE_1.png", np.zeros((8, 8)))
    _write(base / "annotations/training", "ADE_2.png", np.zeros((8, 8)))  # no image: a reader failure
    records, root = resolve_source(DataSourceConfig(path=f"ade20k-150:{tmp_path}@training"))
    assert root == base and len(records) == 1
    assert (records[0].image, records[0].label_map) == ("images/training/ADE_1.jpg", "annotations/training/ADE_1.png")
    assert len(records.failures) == 1 and "no image file for stem 'ADE_2'" in records.failures[0][1]


def test_region_masks_and_label_maps_survive_the_jsonl_and_packed_stores(tmp_path):
    from finegrain.data.readers import read_records
    from finegrain.data.record_store import PackedRecords

    record = Record("a.png", regions=(Region((1, 2, 3, 4), label="x", mask=[[1, 2, 3, 2, 3, 4]]),), width=8, height=8,
                    key="k", label_map="a_label.png")
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record.to_json()) + "\n")
    for read in (read_records(path)[0], PackedRecords.pack([record])[0]):
        assert read.label_map == "a_label.png" and read.regions[0].mask == [[1, 2, 3, 2, 3, 4]]
