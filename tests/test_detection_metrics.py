"""COCO detection metrics with open-vocabulary class groups, against hand-computed average precisions."""

import math

import pytest

from finegrain.eval.detection import OV_COCO_GROUPS, detection_metrics, load_coco
from finegrain.eval.prompts import load_class_names


def ground_truth():
    """Two 100x100 images; 'cat' (id 1) has 2 boxes, 'dog' (id 2) 1 box, 'cow' (id 3) none."""
    boxes = [(1, 1, [10, 10, 40, 40]), (2, 1, [50, 50, 40, 40]), (1, 2, [60, 0, 30, 30])]
    return load_coco({
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "cow"}],
        "annotations": [{"id": i + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3],
                         "iscrowd": 0} for i, (img, cat, box) in enumerate(boxes)]})


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_ap50_per_class_and_group_means_equal_the_hand_computed_101_point_average():
    """cat: hit (0.9), miss (0.8), hit (0.7): precision 1 up to recall 0.5, then 2/3 -> (51 + 50 * 2/3) / 101.
    dog: its only detection misses -> 0. cow has no ground truth and is left out of the means."""
    detections = [det(1, 1, [10, 10, 40, 40], 0.9), det(2, 1, [0, 0, 5, 5], 0.8), det(2, 1, [50, 50, 40, 40], 0.7),
                  det(1, 2, [0, 60, 30, 30], 0.95), det(1, 3, [0, 0, 10, 10], 0.5)]
    metrics = detection_metrics(ground_truth(), detections, groups={"novel": ["cat"], "base": ["dog", "cow"]})
    cat_ap50 = 100 * (51 + 50 * 2 / 3) / 101
    assert metrics["AP50_novel"] == pytest.approx(cat_ap50)
    assert metrics["AP50_base"] == pytest.approx(0.0)
    assert metrics["AP50_all"] == pytest.approx(cat_ap50 / 2)
    assert metrics["AP50"] == pytest.approx(cat_ap50 / 2)  # pycocotools' summary agrees on this data
    assert metrics["AP"] == pytest.approx(cat_ap50 / 2)  # exact boxes: every IoU threshold is met


def test_perfect_detections_score_100_and_none_score_0():
    gt = ground_truth()
    perfect = [det(a["image_id"], a["category_id"], a["bbox"], 1.0) for a in gt.dataset["annotations"]]
    assert detection_metrics(gt, perfect)["AP"] == pytest.approx(100.0)
    empty = detection_metrics(gt, [], groups={"novel": ["cat"]})
    assert empty["AP"] == 0.0 and empty["AP50_novel"] == 0.0


def test_group_of_classes_without_ground_truth_is_nan():
    metrics = detection_metrics(ground_truth(), [det(1, 1, [10, 10, 40, 40], 0.9)], groups={"unseen": ["cow"]})
    assert math.isnan(metrics["AP50_unseen"])


@pytest.mark.parametrize("bad, message", [
    ({"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}, "image_id 7"),
    ({"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1], "score": 1.0}, "category_id 9"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1], "score": 1.0}, "width, height >= 0"),
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": float("nan")}, "finite"),
    ({"image_id": 1, "category_id": 1, "score": 1.0}, "missing field"),
])
def test_unusable_detection_is_named(bad, message):
    with pytest.raises(ValueError, match=f"detection 1: .*{message}"):
        detection_metrics(ground_truth(), [det(1, 1, [10, 10, 40, 40], 0.9), bad])


def test_group_naming_an_unknown_class_is_refused():
    with pytest.raises(ValueError, match="'unseen'.*'horse'"):
        detection_metrics(ground_truth(), [], groups={"unseen": ["horse"]})


def test_ov_coco_split_is_the_published_48_base_and_17_novel_classes():
    base, novel = (load_class_names(OV_COCO_GROUPS[g]) for g in ("base", "novel"))
    assert len(base) == 48 and len(novel) == 17 and not set(base) & set(novel)
    assert novel == ["airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
                     "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"]
    assert {"person", "tv", "toothbrush", "refrigerator"} <= set(base)


def test_ov_lvis_split_is_the_released_866_base_and_337_rare_novel_classes():
    base, novel = load_class_names("ov-lvis-base"), load_class_names("ov-lvis-novel")
    assert len(base) == 866 and len(novel) == 337 and not set(base) & set(novel)
    assert novel[:3] == ["applesauce", "apricot", "arctic_(type_of_shoe)"] and "aerosol_can" in base


def test_mask_ap_of_exact_masks_is_100_and_of_shifted_masks_lower():
    import numpy as np
    from pycocotools import mask as mask_utils

    gt = ground_truth()
    for a in gt.dataset["annotations"]:  # polygon masks: the boxes themselves
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    gt = load_coco(gt.dataset)

    def rle(box, shift=0):
        m = np.zeros((100, 100), dtype=np.uint8, order="F")
        x, y, w, h = box
        m[y:y + h, x + shift:x + w + shift] = 1
        code = mask_utils.encode(m)
        code["counts"] = code["counts"].decode()
        return code

    anns = gt.dataset["annotations"]
    exact = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": rle(a["bbox"]),
              "score": 1.0} for a in anns]
    assert detection_metrics(gt, exact, iou_type="segm")["AP"] == pytest.approx(100.0, abs=1e-6)
    shifted = [{**d, "segmentation": rle(a["bbox"], shift=8)} for d, a in zip(exact, anns)]
    metrics = detection_metrics(gt, shifted, iou_type="segm")
    assert metrics["AP50"] == pytest.approx(100.0) and metrics["AP"] < 100.0
