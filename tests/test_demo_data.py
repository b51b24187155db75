"""The built-in demo dataset: determinism, valid boxes, class coverage, captions and the cache."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from finegrain.data import demo
from finegrain.data.demo import DEMO_CLASSES, ensure_demo_dataset, make_demo_dataset
from finegrain.data.images import load_image
from finegrain.data.readers import read_records


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=60, num_val=12, seed=3)


def test_classes():
    assert len(DEMO_CLASSES) == len(set(DEMO_CLASSES)) == 24
    assert DEMO_CLASSES[:5] == ["red circle", "red square", "red triangle", "red star", "green circle"]


def test_same_seed_same_bytes_other_seed_differs(small_demo, tmp_path):
    again = make_demo_dataset(tmp_path / "again", num_train=60, num_val=12, seed=3)
    for name in ("train.jsonl", "val.jsonl", "images/train/000007.png", "images/val/000011.png"):
        assert (again / name).read_bytes() == (small_demo / name).read_bytes()
    other = make_demo_dataset(tmp_path / "other", num_train=60, num_val=0, seed=4)
    assert (other / "train.jsonl").read_bytes() != (small_demo / "train.jsonl").read_bytes()
    train0 = np.asarray(load_image(small_demo / "images/train/000000.png"))
    val0 = np.asarray(load_image(small_demo / "images/val/000000.png"))
    assert not np.array_equal(train0, val0)  # train and val use different seed streams


def test_records_are_valid_region_text(small_demo):
    train, val = read_records(small_demo / "train.jsonl"), read_records(small_demo / "val.jsonl")
    assert (len(train), len(val)) == (60, 12)
    counts = [len(r.regions) for r in train]
    assert min(counts) >= 1 and max(counts) == 3
    for record in [*train, *val]:
        assert (record.width, record.height) == (64, 64)
        assert record.source == {"proposer": "demo:ground-truth", "captioner": "demo:template"}
        assert (small_demo / record.image).is_file()
        boxes = [r.box for r in record.regions]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert 12 <= max(x1 - x0, y1 - y0) <= 32
        for a, b in itertools.combinations(boxes, 2):
            overlap_w = min(a[2], b[2]) - max(a[0], b[0])
            overlap_h = min(a[3], b[3]) - max(a[1], b[1])
            assert overlap_w <= 0 or overlap_h <= 0, (record.image, a, b)
    assert {r.label for rec in train for r in rec.regions} == set(DEMO_CLASSES)


def test_captions_name_every_object_and_the_background(small_demo):
    for line in (small_demo / "train.jsonl").read_text().splitlines():
        obj = json.loads(line)
        assert len(obj["captions"]) == 2
        background = obj["captions"][0].rsplit(" on a ", 1)[1]
        assert background in {f"{b} background" for b in demo.BACKGROUNDS}
        for region in obj["regions"]:
            size, label = region["caption"].split(" ", 2)[1], region["label"]
            assert region["caption"] == f"a {size} {label}" and size in ("small", "large")
            assert label in DEMO_CLASSES
            for caption in obj["captions"]:
                assert region["caption"] in caption and background in caption


def test_tight_boxes_cover_the_shape_colour(small_demo):
    record = read_records(small_demo / "train.jsonl")[0]
    pixels = np.asarray(load_image(small_demo / record.image)).astype(int)
    for region in record.regions:
        colour = np.array(demo.COLOURS[region.label.split()[0]])
        match = np.abs(pixels - colour).sum(-1) <= 3
        x0, y0, x1, y1 = (int(v) for v in region.box)
        inside = match[y0:y1, x0:x1]
        assert inside.any(axis=0).all() and inside.any(axis=1).all()  # every row/column of the box is hit


def test_ensure_demo_dataset_builds_once_and_reuses(tmp_path, monkeypatch):
    calls = []

    def small(root):
        calls.append(root)
        return make_demo_dataset(root, num_train=3, num_val=2)

    monkeypatch.setattr(demo, "make_demo_dataset", small)
    monkeypatch.setenv("FINEGRAIN_CACHE", str(tmp_path / "cache"))
    root = ensure_demo_dataset()
    assert root == tmp_path / "cache" / "demo-v3" and (root / "val.jsonl").is_file()
    assert ensure_demo_dataset() == root and len(calls) == 1
    assert os.listdir(root.parent) == ["demo-v3"]  # no temporary directory left behind


def test_ensure_demo_dataset_loser_of_a_race_uses_the_winner(tmp_path, monkeypatch):
    root = tmp_path / "demo"

    def racing(tmp):
        make_demo_dataset(root, num_train=2, num_val=1, seed=9)  # the other process finishes first
        (root / "winner").write_text("")
        return make_demo_dataset(tmp, num_train=2, num_val=1)

    monkeypatch.setattr(demo, "make_demo_dataset", racing)
    assert ensure_demo_dataset(root) == root
    assert (root / "winner").exists()
    assert os.listdir(tmp_path) == ["demo"]


def test_label_maps_paint_each_shape_inside_its_box_and_the_background_elsewhere(small_demo):
    from PIL import Image

    from finegrain.data.demo import BACKGROUNDS, SEGMENTATION_CLASSES

    assert (small_demo / "segmentation_classes.txt").read_text().split("\n")[:-1] == SEGMENTATION_CLASSES
    for record in read_records(small_demo / "val.jsonl"):
        labels = np.asarray(Image.open(small_demo / record.image.replace("images/", "labels/")))
        assert labels.shape == (64, 64)
        background = [f"{kind} background" for kind in BACKGROUNDS if kind in record.captions[0]]
        shape_pixels = np.zeros_like(labels, dtype=bool)
        for region in record.regions:
            x0, y0, x1, y1 = (int(v) for v in region.box)
            inside = labels[y0:y1, x0:x1] == SEGMENTATION_CLASSES.index(region.label)
            # the box is the shape's tight box: the shape's pixels touch all four sides
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            shape_pixels[y0:y1, x0:x1] |= inside
        assert set(np.unique(labels[~shape_pixels])) == {SEGMENTATION_CLASSES.index(background[0])}
