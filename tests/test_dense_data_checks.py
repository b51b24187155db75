"""Fine-tuning data checked before step one: masks decode exactly or are dropped and counted, held-out ground truth
that the metric library cannot score and data without targets are one error naming the file, record and field
before training, held-out images that cannot be read are left out of the score."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from test_finetune_detection import _coco_gt, demo_task, det_config

from finegrain.data.dense import DenseSampleBuilder, decode_mask, rle_counts
from finegrain.data.images import load_image
from finegrain.data.readers import read_jsonl, read_records
from finegrain.data.records import RecordError
from finegrain.eval.detection import detection_metrics, load_coco
from finegrain.objectives import EvalContext
from finegrain.train.trainer import Trainer


def test_an_rle_whose_runs_do_not_cover_the_image_is_refused_not_decoded_from_memory():
    full = np.zeros((20, 30), dtype=np.uint8, order="F")
    full[3:9, 4:17] = 1
    rle = mask_utils.encode(full)
    assert sum(rle_counts(rle["counts"])) == 600
    assert (decode_mask({"size": [20, 30], "counts": rle["counts"].decode()}, 30, 20, "r") == full).all()
    short = mask_utils.encode(np.asfortranarray(np.ones((5, 30), dtype=np.uint8)))["counts"].decode()
    with pytest.raises(RecordError, match="r: regions\\[0\\]: field 'mask' does not decode \\(its run lengths cover "
                                          "150 pixels, not the 30x20 = 600"):
        decode_mask({"size": [20, 30], "counts": short}, 30, 20, "r: regions[0]")
    with pytest.raises(RecordError, match="cover 10 pixels"):
        decode_mask({"size": [20, 30], "counts": [4, 6]}, 30, 20, "r")  # an uncompressed RLE, too short


def test_a_short_rle_in_training_drops_its_instance_and_is_counted(tiny_data, tiny_records):
    short = mask_utils.encode(np.asfortranarray(np.ones((8, 64), dtype=np.uint8)))["counts"].decode()

    def spoil(record):
        good = record["regions"][0]
        return {**record, "regions": [good, {**good, "mask": {"size": [64, 64], "counts": short}}]}

    record = read_jsonl(tiny_records("train", spoil, "short.jsonl"))[0]
    _, task = demo_task()
    sample = DenseSampleBuilder(task.sample_spec())(load_image(record.image), record, 0)
    assert int(sample["instance_valid"].sum()) == 1
    assert len(sample["bad_regions"]) == 1 and "run lengths cover 512 pixels" in sample["bad_regions"][0]


@pytest.mark.parametrize("segmentation, said", [
    ([], "annotations\\[0\\] \\(id 1\\): field 'segmentation' is empty or missing"),
    ([[1, 2, 10, 2]], ("annotations\\[0\\] \\(id 1\\): field 'mask' does not decode \\(polygons must be lists of "
                       "at least 3 x, y pairs")),
])
def test_held_out_masks_pycocotools_cannot_score_are_an_error_before_training(tiny_data, tmp_path, segmentation, said):
    gt_path = _coco_gt(tmp_path)
    gt = json.loads(gt_path.read_text())
    gt["annotations"][0]["segmentation"] = segmentation
    gt_path.write_text(json.dumps(gt))
    names = tmp_path / "names.txt"
    names.write_text("red circle\nblue square\n")
    overrides = [f"data.val.path={gt_path}", f"data.val.root={tmp_path}", f"method.class_names={names}",
                 f"data.train.path={gt_path}", f"data.train.root={tmp_path}", "train.eval_tasks=[detection]"]
    with pytest.raises(ValueError, match=f"{gt_path}: {said}"):
        Trainer(det_config(tiny_data, tmp_path, *overrides))
    assert not (tmp_path / "run").exists()  # nothing written
    Trainer(det_config(tiny_data, tmp_path, *overrides, "method.masks=false", "data.batch_size=2",
                      "method.drop_empty=false",
                      output="boxes")).release_run_folder()


def test_held_out_json_without_the_class_names_is_an_error_before_training(tiny_data, tmp_path):
    gt_path = _coco_gt(tmp_path)
    names = tmp_path / "names.txt"
    names.write_text("red circle\ngreen star\n")
    with pytest.raises(ValueError, match="classes \\['green star'\\] are not among its 2 categories"):
        Trainer(det_config(tiny_data, tmp_path, f"data.val.path={gt_path}", f"data.val.root={tmp_path}",
                           f"method.class_names={names}", "train.eval_tasks=[detection]",
                           f"data.train.path={gt_path}", f"data.train.root={tmp_path}"))


def test_a_captions_json_as_detection_data_is_an_error_naming_what_was_expected(tiny_data, tmp_path):
    """COCO's captions json sits beside the instances json: every image, no box."""
    captions = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                "annotations": [{"id": 1, "image_id": 1, "caption": "a red circle"}]}
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(captions))
    with pytest.raises(ValueError, match="none of its 1 records has a region labelled with one of the task's 24 "
                                         "classes .* a COCO instances json, not a captions json"):
        Trainer(det_config(tiny_data, tmp_path, f"data.train.path={path}", f"data.train.root={tmp_path}",
                           "method.drop_empty=false"))


def test_held_out_images_that_cannot_be_read_are_left_out_of_the_score_not_counted_as_misses(tiny_data, tmp_path):
    records = read_records(tiny_data / "val.jsonl")[:3]
    torch.manual_seed(0)
    model, task = demo_task()
    task.eval()

    def scores(chosen):
        context = EvalContext(chosen, tiny_data, "demo:val", torch.device("cpu"), 2)
        with torch.no_grad():
            return task.evaluate("detection", model, context)

    readable = scores(records[:2])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    from dataclasses import replace
    with_broken = scores([*records[:2], replace(records[2], image=str(broken))])
    assert (with_broken["num_images"], with_broken["skipped_images"]) == (2, 1)
    assert {k: v for k, v in with_broken.items() if k not in ("skipped_images",)} == pytest.approx(
        {k: v for k, v in readable.items() if k not in ("skipped_images",)}, nan_ok=True)


def test_scores_cover_only_the_images_scored():
    """Ground truth on two images, a perfect detection on the first: scored over the first only AP is 100, over
    both the second's box is a miss."""
    gt = load_coco({"images": [{"id": 1, "width": 50, "height": 50}, {"id": 2, "width": 50, "height": 50}],
                    "categories": [{"id": 1, "name": "a"}],
                    "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [5, 5, 20, 20], "area": 400,
                                     "iscrowd": 0} for i in (1, 2)]})
    found = [{"image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 20], "score": 0.9}]
    assert detection_metrics(gt, found, image_ids=[1])["AP50"] == pytest.approx(100.0)
    assert detection_metrics(gt, found)["AP50"] < 60


def test_resuming_a_checkpoint_of_another_method_or_class_list_is_one_line_naming_it(tiny_data, tmp_path, capsys):
    from finegrain.cli import main
    from finegrain.train.trainer import train

    det = train(det_config(tiny_data, tmp_path, "train.steps=1", "train.save_every=1", output="det"),
                progress_bar=False)
    checkpoint = det.output_dir / "step_00000001.pt"
    seg = ["train", "--config", "demo-finetune-seg", "--no-progress", f"data.train.path={tiny_data / 'train.jsonl'}",
           "data.val=null", "train.eval_tasks=[]", "train.best_metric=null", "data.num_workers=0",
           f"train.output_dir={tmp_path / 'seg'}", "--resume", str(checkpoint)]
    assert main(seg) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume {checkpoint}: a checkpoint of method 'finetune-det'" in err
    names = tmp_path / "names.txt"
    names.write_text("red circle\nblue square\n")
    with pytest.raises(ValueError, match=f"--resume {checkpoint}: a checkpoint of method.class_names='demo'"):
        Trainer(det_config(tiny_data, tmp_path, f"method.class_names={names}", output="other"), resume=str(checkpoint))
