"""Bad inputs on every fine-tuning reader and evaluation: each one either ends in one error before anything is
written (naming the file, the entry and the field) or, one bad record among many, is skipped and counted; never
a traceback after training, never trained on silently, never a metric that lies."""

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_finetune_detection import demo_task, det_config
from test_ovd import task as ovd_task

from finegrain.config import load_config
from finegrain.data.dataset import BadRecordCounter, RecordDataset
from finegrain.data.dense import DenseSampleBuilder, read_label
from finegrain.data.images import ImageError
from finegrain.data.readers import read_jsonl, read_records
from finegrain.data.records import Record, RecordError
from finegrain.data.segmentation import SegmentationFolder, read_label_map, segmentation_records
from finegrain.eval.detection import check_ground_truth, check_ground_truth_file, load_coco, lvis_metrics
from finegrain.eval.encode import evaluating
from finegrain.eval.prompts import load_class_names
from finegrain.finetune.detection import image_ids_by_file
from finegrain.objectives import EvalContext
from finegrain.sample_spec import DenseTargets, SampleSpec
from finegrain.train.trainer import Trainer, train

# ----- segmentation folders -----------------------------------------------------------------------------------

SEG = ("model.name=finegrain-tiny", "method.name=finetune-seg", "method.num_classes=4", "method.class_names=null",
       "method.reduce_zero_label=false", "method.scale=[64,32]", "method.crop=[32,32]", "method.channels=16",
       "method.aux_channels=8", "method.test_scale=[64,32]", "method.test_window=[32,32]",
       "method.test_stride=[16,16]", "data.batch_size=2", "data.num_workers=0", "optim.warmup_steps=0",
       "train.steps=1", "train.save_every=1", "train.eval_tasks=[segmentation]", "train.best_metric=null")


def seg_folder(root: Path, count: int = 6) -> Path:
    """``root/images/im<i>.png`` (32x32 RGB) beside ``root/labels/im<i>.png`` (classes 0..3), every stem in
    ``train.txt`` and ``val.txt``."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(count):
        Image.new("RGB", (32, 32), (30 * i, 60, 90)).save(root / "images" / f"im{i}.png")
        label = np.random.default_rng(i).integers(0, 4, size=(32, 32)).astype(np.uint8)
        Image.fromarray(label).save(root / "labels" / f"im{i}.png")
    for split in ("train", "val"):
        (root / f"{split}.txt").write_text("".join(f"im{i}\n" for i in range(count)))
    return root


def seg_config(tmp_path, train_root, val_root=None, *overrides):
    return load_config(None, [*SEG, f"data.train.path=segfolder:{train_root}@train",
                              f"data.val.path=segfolder:{val_root or train_root}@val",
                              f"train.output_dir={tmp_path / 'run'}", *overrides])


def test_a_folder_image_without_a_label_map_and_a_label_map_without_an_image_are_skipped_and_counted(tmp_path):
    """Without a split file every label map is used: an image beside them without one was left out unsaid."""
    root = seg_folder(tmp_path / "data")
    (root / "labels" / "im2.png").unlink()
    (root / "images" / "im4.png").unlink()
    records = segmentation_records(SegmentationFolder(root, "images", "labels", []))
    assert [r.image for r in records] == ["images/im0.png", "images/im1.png", "images/im3.png", "images/im5.png"]
    reasons = [message for _, message in records.failures]
    assert any(f"{root / 'images' / 'im2.png'}: no label map {root / 'labels' / 'im2.png'}" in r for r in reasons)
    assert any("no image file for stem 'im4'" in r for r in reasons) and len(reasons) == 2


def test_a_split_file_with_a_byte_order_mark_blank_lines_and_crlf_lists_its_stems(tmp_path):
    root = seg_folder(tmp_path / "data", 3)
    (root / "train.txt").write_bytes("\ufeffim0\r\n\r\n im1 \r\nim2\r\n".encode())
    assert SegmentationFolder(root, "images", "labels", [], split="train.txt").stems == ["im0", "im1", "im2"]


@pytest.mark.parametrize("make, said", [
    (lambda root: None, "split file .*val.txt is empty"),
    (lambda root: (root / "val.txt").unlink(), "no label maps \\(\\*.png\\) in .*labels"),
])
def test_an_empty_segmentation_folder_is_one_error_naming_it(tmp_path, make, said):
    root = seg_folder(tmp_path / "data", 0)
    make(root)
    with pytest.raises(ValueError, match=f"segmentation folder: {said}"):
        SegmentationFolder(root, "images", "labels", [], split="val.txt" if (root / "val.txt").exists() else None)


def test_a_colour_label_map_is_one_line_saying_so_and_a_16_bit_one_is_read(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (4, 4), (255, 0, 0)).save(rgb)
    with pytest.raises(ImageError) as error:  # skipped and counted where pairs are read
        read_label_map(rgb)
    assert str(error.value) == (f"{rgb}: a label map must be single-channel (mode L, P or I) class indices, got mode "
                                "'RGB' (a colour-coded label map? map its colours to class indices)")
    wide = tmp_path / "wide.png"
    Image.fromarray(np.array([[0, 3], [300, 2]], dtype=np.uint16)).save(wide)
    assert read_label_map(wide).tolist() == [[0, 3], [300, 2]]
    with pytest.raises(RecordError, match="value 300 .* beyond the 4 classes"):
        read_label(wide, 2, 2, DenseTargets("segmentation", 4, scale=(16, 16), crop=(16, 16), pad=(16, 16)))


def test_a_label_map_without_a_labelled_pixel_is_a_bad_record_skipped_and_counted(tmp_path):
    """Every pixel the ignore index (here: label 0 with reduce_zero_label) teaches nothing and scores nothing."""
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "zero.png")
    Image.fromarray(np.ones((16, 16), dtype=np.uint8)).save(tmp_path / "one.png")
    dense = DenseTargets("segmentation", 4, reduce_zero_label=True, scale=(16, 16), crop=(16, 16), pad=(16, 16))
    with pytest.raises(RecordError, match="zero.png: field 'label_map' has no labelled pixel: every value is the "
                                          "ignore index 255 after reduce_zero_label=True \\(0 is ignored with it"):
        read_label(tmp_path / "zero.png", 16, 16, dense)
    records = [Record("a.png", key="empty", label_map="zero.png"), Record("a.png", key="good", label_map="one.png")]
    dataset = RecordDataset(records, tmp_path, DenseSampleBuilder(SampleSpec(caption="none", augment="none",
                                                                             dense=dense)), max_bad_fraction=1.0)
    sample = dataset[(0, 0)]
    counter = BadRecordCounter(1.0, 0)
    counter.update(sample["records_tried"], sample["bad_records"])
    assert counter.bad == 1 and (sample["label"] == 0).all()


def _colour_labels(root):
    for path in (root / "labels").iterdir():
        Image.open(path).convert("RGB").save(path)


def _labels_beyond(root):
    for path in (root / "labels").iterdir():
        Image.fromarray(np.full((32, 32), 7, dtype=np.uint8)).save(path)


def _unlabelled(root):
    for path in (root / "labels").iterdir():
        Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(path)


def _images_not_images(root):
    for path in (root / "images").iterdir():
        path.write_bytes(b"not an image")


@pytest.mark.parametrize("spoil, said", [
    (_colour_labels, "got mode 'RGB' \\(a colour-coded label map"),
    (_labels_beyond, "field 'label_map' has value 7 .*beyond the 4 classes"),
    (_unlabelled, "field 'label_map' has no labelled pixel"),
    (_images_not_images, "im0.png: cannot decode image"),
])
def test_training_pairs_failing_from_the_first_on_are_one_error_before_anything_is_written(tmp_path, spoil, said):
    """Before: the run folder was written and the first step stopped on the streak of failures."""
    good, bad = seg_folder(tmp_path / "good"), seg_folder(tmp_path / "bad")
    spoil(bad)
    with pytest.raises(ValueError, match=f"data.train.path='segfolder:{bad}@train': 6 consecutive records failed "
                                         f"to load \\(records 0..5 of 6\\)(.|\\n)*{said}"):
        Trainer(seg_config(tmp_path, bad, good, "method.reduce_zero_label=true" if spoil is _unlabelled else
                           "method.reduce_zero_label=false"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spoil, said", [
    (_colour_labels, "got mode 'RGB'"),
    (_unlabelled, "has no labelled pixel"),
    (lambda root: [p.unlink() for p in (root / "labels").iterdir()], "label map not found"),
])
def test_held_out_pairs_none_of_which_can_be_scored_are_an_error_before_training(tmp_path, spoil, said):
    """Before: the evaluation after training raised (no labelled pixels / none of the images could be used)."""
    good, bad = seg_folder(tmp_path / "good"), seg_folder(tmp_path / "bad")
    spoil(bad)
    with pytest.raises(ValueError, match=f"segmentation: none of the 6 held-out images of data.val.path=segfolder:"
                                         f"{bad}@val can be used; first errors: .*{said}"):
        Trainer(seg_config(tmp_path, good, bad, "method.reduce_zero_label=true" if spoil is _unlabelled else
                           "method.reduce_zero_label=false"))
    assert not (tmp_path / "run").exists()


def test_held_out_pairs_that_cannot_be_scored_and_stems_without_an_image_are_left_out_and_counted(tmp_path):
    """A colour label map, one without a labelled pixel and a stem without an image file among 6: scored on the
    other 3 and counted beside them (the stem the reader skipped was not counted before)."""
    good, val = seg_folder(tmp_path / "good"), seg_folder(tmp_path / "val")
    Image.open(val / "labels" / "im1.png").convert("RGB").save(val / "labels" / "im1.png")
    Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(val / "labels" / "im2.png")
    (val / "images" / "im3.png").unlink()
    result = train(seg_config(tmp_path, good, val), progress_bar=False)
    assert result.eval_metrics["segmentation/num_images"] == 3
    assert result.eval_metrics["segmentation/skipped_images"] == 3


# ----- COCO / LVIS instances json as held-out ground truth ------------------------------------------------------


def coco_json(tmp_path: Path, count: int = 4) -> Path:
    """``count`` 64x48 images on disk with two boxes each (polygon masks), categories with non-contiguous ids,
    and ``names.txt`` listing both."""
    images, annotations = [], []
    for i in range(count):
        Image.new("RGB", (64, 48), (40 * i, 60, 90)).save(tmp_path / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": 64, "height": 48})
        for category, (x, y, w, h) in ((7, (4, 4, 20, 16)), (3, (30, 10, 24, 30))):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "red circle"}, {"id": 3, "name": "blue square"}]}
    (tmp_path / "gt.json").write_text(json.dumps(data))
    (tmp_path / "names.txt").write_text("red circle\nblue square\n")
    return tmp_path / "gt.json"


def as_lvis(data: dict) -> dict:
    data = copy.deepcopy(data)
    for image in data["images"]:
        image.update(neg_category_ids=[], not_exhaustive_category_ids=[])
    for category in data["categories"]:
        category["frequency"] = "f"
    for ann in data["annotations"]:
        del ann["iscrowd"]
    return data


def _set(part, index, **fields):
    return lambda data: data[part][index].update(fields)


def _drop(part, index, field):
    return lambda data: data[part][index].pop(field)


HELD_OUT_JSON = [  # (edit, what the error says, LVIS) -- the first block failed after training or scored wrongly
    (_drop("images", 0, "file_name"), ("images\\[0\\] \\(id 1\\): field 'file_name' \\(or LVIS's 'coco_url'\\) must be "
                                      "a non-empty string"), False),
    (_drop("images", 0, "width"), "images\\[0\\] \\(id 1\\): field 'width' must be a positive integer, got None", False),
    (_drop("images", 0, "id"), "images\\[0\\] \\(id None\\): field 'id' must be a positive integer", False),
    (lambda d: d["images"].append({**d["images"][0], "file_name": "im1.png"}),
     "images\\[4\\] \\(id 1\\): field 'id' is duplicated", False),
    (lambda d: d["categories"].append({"id": 9}), ("categories\\[2\\] \\(id 9\\): field 'name' must be a non-empty "
                                                  "string, got None"), False),
    (lambda d: d["categories"].append({"id": 9, "name": "red circle"}),
     "categories\\[2\\] \\(id 9\\): field 'name' 'red circle' is also categories\\[0\\]'s", False),
    (lambda d: d["categories"].append({"id": 7, "name": "green"}),
     "categories\\[2\\] \\(id 7\\): field 'id' is also categories\\[0\\]'s", False),
    (lambda d: d["annotations"].append(5), "annotations\\[8\\] must be an object, got int", False),
    (_drop("annotations", 1, "id"), "annotations\\[1\\] \\(id None\\): field 'id' must be a positive integer", False),
    (_set("annotations", 1, id=0), ("annotations\\[1\\] \\(id 0\\): field 'id' must be a positive integer \\(pycocotools "
                                   "and lvis take an id of 0 for 'unmatched'\\)"), False),
    (_set("annotations", 1, id=1), "annotations\\[1\\] \\(id 1\\): field 'id' is also annotations\\[0\\]'s", False),
    (_drop("annotations", 0, "area"), "annotations\\[0\\] \\(id 1\\): field 'area' must be a number >= 0", False),
    (_drop("annotations", 0, "iscrowd"), "annotations\\[0\\] \\(id 1\\): field 'iscrowd' must be 0 or 1", False),
    (_set("annotations", 0, bbox=[70, 4, 10, 10]), ("annotations\\[0\\] \\(id 1\\): field 'bbox' \\[70, 4, 10, 10\\] "
                                                   "lies wholly outside its 64x48 image"), False),
    (_set("annotations", 0, bbox=[4, -20, 10, 10]), "field 'bbox' \\[4, -20, 10, 10\\] lies wholly outside", False),
    (_drop("categories", 0, "frequency"), "categories\\[0\\] \\(id 7\\): field 'frequency' must be 'r', 'c' or 'f'",
     True),
    (_drop("images", 2, "neg_category_ids"), "images\\[2\\] \\(id 3\\): field 'neg_category_ids' must be a list", True),
    (_drop("images", 2, "not_exhaustive_category_ids"), "field 'not_exhaustive_category_ids' must be a list", True),
    # already refused before step one (pinned)
    (lambda d: d.pop("categories"), "field\\(s\\) \\['categories'\\] missing or not lists", False),
    (_set("annotations", 0, image_id=99), "annotations\\[0\\] \\(id 1\\): field 'image_id' 99 is not an image", False),
    (_set("annotations", 0, category_id=99), "field 'category_id' 99 is not a category of the json", False),
    (_set("annotations", 0, bbox=[4, 4, -5, 10]), ("field 'bbox' must be \\[x, y, width, height\\] with width, height "
                                                  ">= 0, got \\[4, 4, -5, 10\\]"), False),
    (_set("annotations", 0, bbox=["4", 4, 5, 10]), "field 'bbox' must be .*got \\['4', 4, 5, 10\\]", False),
    (_set("annotations", 0, bbox=[1, 1, float("nan"), 3]), "field 'bbox' must be .*got \\[1, 1, nan, 3\\]", False),
    (_set("annotations", 0, segmentation=[[1, 2, 10, 2, 10, 10, 5]]), ("field 'mask' does not decode \\(polygons must "
                                                                     "be lists of at least 3 x, y pairs"), False),
    (_set("annotations", 0, segmentation={"size": [10, 10], "counts": [100]}),
     "field 'mask' does not decode \\(an RLE mask must have size \\[48, 64\\], got \\[10, 10\\]", False),
]


@pytest.mark.parametrize("edit, said, lvis", HELD_OUT_JSON)
def test_held_out_json_entries_the_libraries_fail_on_or_misscore_are_one_error(tmp_path, edit, said, lvis):
    data = json.loads(coco_json(tmp_path).read_text())
    data = as_lvis(data) if lvis else data
    edit(data)
    with pytest.raises(ValueError, match=f"^gt\\.json: .*{said}"):
        check_ground_truth(data, "gt.json", ["red circle", "blue square"], masks=True, lvis=lvis)


def test_the_held_out_json_is_checked_before_anything_is_written(tmp_path):
    gt = coco_json(tmp_path)
    data = json.loads(gt.read_text())
    del data["annotations"][2]["area"]  # before: a KeyError in pycocotools after training
    gt.write_text(json.dumps(data))
    names = tmp_path / "names.txt"
    with pytest.raises(ValueError, match="field 'area' must be a number"):
        Trainer(det_config(tmp_path, tmp_path, f"data.train.path={gt}", f"data.train.root={tmp_path}",
                           f"data.val.path={gt}", f"data.val.root={tmp_path}", f"method.class_names={names}",
                           "train.eval_tasks=[detection]"))
    assert not (tmp_path / "run").exists()


def test_lvis_needs_no_iscrowd_and_boxes_without_area_are_said_not_refused(tmp_path, caplog):
    data = as_lvis(json.loads(coco_json(tmp_path).read_text()))
    data["annotations"][3]["bbox"] = [10, 10, 0, 5]  # pycocotools scores it as a miss no detection can match
    with caplog.at_level(logging.WARNING):
        check_ground_truth(data, "gt.json", ["red circle"], lvis=True)
    assert "gt.json: 1 annotation(s) have a box without area" in caplog.text and "annotations[3] (id 4)" in caplog.text


def test_a_held_out_json_with_a_byte_order_mark_and_lvis_images_named_by_coco_url_are_scored(tmp_path):
    """Before: pycocotools and lvis could not read a json with a byte-order mark (the readers can), and the
    detection evaluation looked up every image's 'file_name' (LVIS has 'coco_url')."""
    data = as_lvis(json.loads(coco_json(tmp_path).read_text()))
    for image in data["images"]:
        image["coco_url"] = f"http://images.cocodataset.org/val2017/{image.pop('file_name')}"
    path = tmp_path / "lvis.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    assert check_ground_truth_file(path, ["red circle"], lvis=True) == data
    records = read_records(path)
    assert records[1].image == "val2017/im1.png"
    assert image_ids_by_file(load_coco(str(path)), list(records), str(path)) == [1, 2, 3, 4]
    found = [{"image_id": 1, "category_id": 7, "bbox": [4, 4, 20, 16], "score": 0.9},
             {"image_id": 1, "category_id": 3, "bbox": [30, 10, 24, 30], "score": 0.8}]
    assert lvis_metrics(str(path), found, image_ids=[1])["ap50"] == pytest.approx(100.0)


# ----- held-out images and records ------------------------------------------------------------------------------


def test_held_out_images_none_of_which_can_be_read_are_an_error_before_training(tmp_path):
    """A wrong data.val.root: before, every image was found missing by the evaluation after training."""
    gt = coco_json(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    names = tmp_path / "names.txt"
    with pytest.raises(ValueError, match=f"detection: none of the 4 held-out images of data.val.path={gt} \\(images "
                                         f"under {tmp_path / 'elsewhere'}\\) can be used; first errors: "
                                         f"{tmp_path / 'elsewhere' / 'im0.png'}: image file not found"):
        Trainer(det_config(tmp_path, tmp_path, f"data.train.path={gt}", f"data.train.root={tmp_path}",
                           f"data.val.path={gt}", f"data.val.root={tmp_path / 'elsewhere'}",
                           f"method.class_names={names}", "train.eval_tasks=[detection]"))
    assert not (tmp_path / "run").exists()
    _, method = ovd_task(base_classes=str(names), novel_classes=str(_names(tmp_path, "novel.txt", "green star")))
    data = json.loads(gt.read_text())
    data["categories"].append({"id": 11, "name": "green star"})
    gt.write_text(json.dumps(data))
    context = EvalContext(list(read_records(gt)), tmp_path / "elsewhere", str(gt), torch.device("cpu"), 2)
    with pytest.raises(ValueError, match="ovd: none of the 4 held-out images .* image file not found"):
        method.check_held_out("ovd", context)


def _names(tmp_path, name, *names):
    (tmp_path / name).write_text("".join(f"{n}\n" for n in names))
    return tmp_path / name


def test_held_out_images_of_another_size_than_their_ground_truth_are_left_out_and_counted(tiny_data, tmp_path):
    """The ground truth's boxes are in the size it gives the image: before, an image of another size was scored
    against misplaced boxes."""
    from dataclasses import replace

    records = read_records(tiny_data / "val.jsonl")[:3]
    torch.manual_seed(0)
    model, task = demo_task()
    task.eval()

    def scores(chosen):
        with torch.no_grad():
            return task.evaluate("detection", model, EvalContext(chosen, tiny_data, "demo:val", torch.device("cpu"), 2))

    resized = replace(records[2], width=records[2].width * 2, height=records[2].height * 2)
    with_resized = scores([*records[:2], resized])
    assert (with_resized["num_images"], with_resized["skipped_images"]) == (2, 1)
    assert with_resized["bbox_ap50"] == pytest.approx(scores(list(records[:2]))["bbox_ap50"], nan_ok=True)
    _, boxes = demo_task(masks="false")
    with pytest.raises(ValueError, match="none of the 1 held-out images .*fields 'width'/'height' say 128x128"):
        boxes.check_held_out("detection", EvalContext([resized], tiny_data, "demo:val", torch.device("cpu"), 2))
    _, method = ovd_task()
    with pytest.raises(RecordError, match="the ground truth says 128x128 but the image is 64x64"):
        method.load_pixels([tiny_data / records[2].image], [(128, 128)])
    context = EvalContext([resized], tiny_data, "demo:val", torch.device("cpu"), 2)
    with pytest.raises(ValueError, match="ovd: none of the 1 held-out images .*says 128x128 but the image is 64x64"):
        method.check_held_out("ovd", context)


def test_ov_lvis_needs_an_lvis_json_as_held_out_data(tiny_data):
    """Before: the lvis package failed to read demo:val / a JSONL file as its json after training."""
    _, method = ovd_task(protocol="ov-lvis")
    records = list(read_records(tiny_data / "val.jsonl"))[:2]
    with pytest.raises(ValueError, match="method.protocol=ov-lvis scores against an LVIS json as data.val.path, got "
                                         "'demo:val'"):
        method.check_held_out("ovd", EvalContext(records, tiny_data, "demo:val", torch.device("cpu"), 2))


def test_held_out_regions_without_a_mask_are_an_error_when_masks_are_scored(tiny_data, tmp_path, tiny_records):
    """Before: the ground truth built from the records left such a region out, and its detections counted as
    false positives."""
    spoiled = iter(range(10**6))

    def edit(record):
        if next(spoiled) == 1:
            record["regions"][0].pop("mask")
        return record

    path = tiny_records("val", edit, "val.jsonl")
    records = list(read_jsonl(path))
    _, task = demo_task()
    with pytest.raises(ValueError, match=f"{path}:2: regions\\[0\\]: field 'mask' is missing: mask AP needs a mask"):
        task.check_held_out("detection", EvalContext(records, tmp_path, str(path), torch.device("cpu"), 2))
    _, boxes = demo_task(masks="false")
    boxes.check_held_out("detection", EvalContext(records, tmp_path, str(path), torch.device("cpu"), 2))


def test_held_out_records_the_reader_left_out_are_counted_with_the_skipped_images(tiny_data, tmp_path, tiny_records):
    """Before: a malformed held-out line was only logged; the scores' counts did not show it."""
    path = tiny_records("val", lambda record: record, "val.jsonl")
    path.write_text("\n".join([*path.read_text().splitlines()[:4], "{not json"]) + "\n")
    trainer = Trainer(det_config(tiny_data, tmp_path, f"data.val.path={path}", "train.eval_tasks=[detection]"))
    try:
        records, root = trainer.val_source
        context = trainer.eval_context(records, root)
        assert (len(records), context.skipped) == (4, 1)
        with evaluating(trainer.module):
            metrics = trainer.method.evaluate("detection", trainer.model, context)
        assert (metrics["num_images"], metrics["skipped_images"]) == (4, 1)
    finally:
        trainer.release_run_folder()


# ----- class lists and training data ----------------------------------------------------------------------------


def test_class_lists_with_a_byte_order_mark_blank_lines_utf16_or_repeats(tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes("\ufeffred circle\r\n\r\n  blue square \n\n".encode())
    assert load_class_names(str(path)) == ["red circle", "blue square"]  # before: '\ufeffred circle'
    path.write_text("red circle\nblue square\n", encoding="utf-16")
    with pytest.raises(ValueError, match=f"{path}:1: UTF-16 text: save it as UTF-8"):
        load_class_names(str(path))
    listed = tmp_path / "names.json"
    listed.write_text('["red circle", ')
    with pytest.raises(ValueError, match=f"{listed}: not valid JSON"):
        load_class_names(str(listed))
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="the list is empty"):
        load_class_names(str(path))
    path.write_text("red circle\nred circle\n")
    with pytest.raises(ValueError, match="must be distinct; repeated: \\['red circle'\\]"):
        load_class_names(str(path))


def test_classes_that_label_no_training_region_are_said_before_step_one(tmp_path, capsys):
    """A class-list name that is not one of the data's labels (a typo) would never be learned, unsaid before."""
    gt = coco_json(tmp_path)
    names = _names(tmp_path, "typo.txt", "red circle", "blue sqare")
    Trainer(det_config(tmp_path, tmp_path, f"data.train.path={gt}", f"data.train.root={tmp_path}",
                       f"data.val.path={gt}", f"data.val.root={tmp_path}",
                       f"method.class_names={names}")).release_run_folder()
    err = capsys.readouterr().err
    assert "warning: data.train: the task's classes ['blue sqare'] (1 of 2) label no region of its 4 records" in err


def test_masks_asked_of_training_data_without_any_mask_are_one_error(tmp_path, tiny_data, tiny_records):
    """Before: every instance was dropped as a bad region and the run trained on images without instances."""
    path = tiny_records("train", lambda r: {**r, "regions": [
        {k: v for k, v in region.items() if k != "mask"} for region in r["regions"]]}, "boxes.jsonl")
    with pytest.raises(ValueError, match=f"data.train.path='{path}': none of its 96 records has a region with a mask "
                                         ".*method.masks=false trains boxes only"):
        Trainer(det_config(tiny_data, tmp_path, f"data.train.path={path}"))
    assert not (tmp_path / "run").exists()
    Trainer(det_config(tiny_data, tmp_path, f"data.train.path={path}", "method.masks=false")).release_run_folder()


def test_region_text_records_for_detection_drop_and_count_bad_boxes_and_skip_records_without_an_image(tmp_path):
    """Pinned: a box outside the image or without area is dropped and counted, a label outside the class list is
    counted, a line without 'image' is a bad record."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    regions = [{"box": [4, 4, 12, 12], "label": "thing"}, {"box": [40, 40, 50, 50], "label": "thing"},
               {"box": [5, 5, 5, 20], "label": "thing"}, {"box": [2, 2, 9, 9], "label": "other"}]
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"regions": regions}) + "\n"
                    + json.dumps({"image": "a.png", "width": 32, "height": 32, "regions": regions}) + "\n")
    dense = DenseTargets("instances", 1, class_names=("thing",), max_instances=4, scale=(32, 32), pad=(32, 32),
                         flip=0.0)
    dataset = RecordDataset(read_jsonl(path), tmp_path, DenseSampleBuilder(SampleSpec(
        caption="none", augment="none", dense=dense)), max_bad_fraction=1.0)
    sample = dataset[(0, 0)]
    assert sample["instance_valid"].tolist() == [True, False, False, False]
    assert (sample["boxes_dropped"], sample["instances_unlisted"]) == (2, 1)
    assert [message for _, message in sample["bad_records"]] == [(f"{path}:1: field 'image' must be a non-empty path "
                                                                 "string")]
