"""Region proposers: ground-truth boxes (records, COCO instances and panoptic json), a random-weight torchvision
detector and its RPN on real photographs, and the ultralytics glue against a fake ``ultralytics`` module."""

from __future__ import annotations

import json
import math
import sys
import types
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from photos import photo
from torchvision.models import get_model_weights

from finegrain.annotate.base import Proposal
from finegrain.annotate.proposers import (
    DETECTOR_MIN_SCORE,
    GroundTruthProposer,
    TorchvisionProposer,
    YoloProposer,
    build_proposer,
    rpn_proposals,
)
from finegrain.data.readers import read_coco_instances
from finegrain.data.records import Record, Region
from finegrain.models.factory import PretrainedWeightsUnavailable

FAST_MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
MIN_SIZE, MAX_SIZE = 128, 256  # the transform's frame, far smaller than the photos


def _records(*images):
    return [Record(image) for image in images]


# ---------------------------------------------------------------------------------------------- ground truth


def test_gt_without_file_returns_each_records_regions():
    records = [Record("a.jpg", regions=(Region((1, 2, 3, 4), label="cat"), Region((5, 6, 7, 8), score=0.5))),
               Record("b.jpg")]
    proposer = GroundTruthProposer()
    assert proposer.propose([None, None], records) == [
        [Proposal((1, 2, 3, 4), None, "cat"), Proposal((5, 6, 7, 8), 0.5, None)], []]
    assert proposer.describe() == "gt:record regions"


def _instances_json():
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [0, 0, 100, 80], "iscrowd": 1},
            {"id": 12, "image_id": 1, "category_id": 7, "bbox": [1.5, 2.5, 3, 4], "score": 0.25},
            {"id": 13, "image_id": 2, "category_id": 3, "bbox": [5, 5, 10, 10]},
        ],
    }


def test_gt_reads_coco_instances_by_image_dir_and_file_name_skipping_crowd(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(_instances_json()))
    proposer = GroundTruthProposer(boxes=path, image_dir="val")
    out = proposer.propose([None] * 4, _records("val/a.jpg", "./val/b.jpg", "a.jpg", "val/missing.jpg"))
    assert out[0] == [Proposal((10, 20, 40, 60), None, "cat"), Proposal((1.5, 2.5, 4.5, 6.5), 0.25, "dog")]
    assert out[1] == [Proposal((5, 5, 15, 15), None, "cat")]
    assert out[2] == [] and out[3] == []  # without image_dir, or not in the json: no proposals
    assert proposer.describe() == f"gt:{path} image_dir=val"
    # the same boxes as the regions of the records finegrain's reader makes of this json
    records = read_coco_instances(path, image_dir="val")
    from_records = GroundTruthProposer().propose([None] * len(records), list(records))
    assert [[(p.box, p.label) for p in ps] for ps in from_records] == \
        [[(p.box, p.label) for p in ps] for ps in proposer.propose([None] * len(records), list(records))]


def test_gt_reads_panoptic_segments_info_boxes_without_pngs(tmp_path):
    data = {
        "images": [{"id": 5, "file_name": "p.jpg", "width": 64, "height": 48}],
        "categories": [{"id": 1, "name": "person", "isthing": 1}, {"id": 2, "name": "wall", "isthing": 0}],
        "annotations": [{"image_id": 5, "file_name": "p.png", "segments_info": [
            {"id": 1, "category_id": 2, "bbox": [0, 0, 64, 48], "iscrowd": 0, "area": 100},
            {"id": 2, "category_id": 1, "bbox": [8, 4, 16, 20], "iscrowd": 0, "area": 50},
            {"id": 3, "category_id": 1, "bbox": [30, 4, 16, 20], "iscrowd": 1, "area": 50}]}],
    }
    path = tmp_path / "panoptic.json"  # its PNG folder does not exist: boxes come from the json alone
    path.write_text(json.dumps(data))
    out = GroundTruthProposer(boxes=path).propose([None], _records("p.jpg"))
    assert out == [[Proposal((0, 0, 64, 48), None, "wall"), Proposal((8, 4, 24, 24), None, "person")]]


@pytest.mark.parametrize("edit, where, field", [
    (lambda d: d["annotations"][2].update(bbox=[1, 2, 3]), "annotations[2]", "bbox"),
    (lambda d: d["annotations"][3].update(bbox=[1, 2, -3, 4]), "annotations[3]", "bbox"),
    (lambda d: d["annotations"][0].update(category_id=99), "annotations[0]", "category_id"),
    (lambda d: d["annotations"][3].update(image_id=42), "annotations[3]", "image_id"),
    (lambda d: d["annotations"][2].update(score="high"), "annotations[2]", "score"),
    (lambda d: d["images"][1].pop("file_name"), "images[1]", "file_name"),
    (lambda d: d["categories"][1].update(name=None), "categories[1]", "name"),
])
def test_gt_malformed_entry_error_names_file_entry_and_field(tmp_path, edit, where, field):
    data = _instances_json()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        GroundTruthProposer(boxes=path)
    message = str(e.value)
    assert str(path) in message and f"{where}:" in message and f"'{field}'" in message, message


def test_gt_malformed_panoptic_segment_error_names_segment(tmp_path):
    data = {"images": [{"id": 1, "file_name": "p.jpg", "width": 8, "height": 8}],
            "categories": [{"id": 1, "name": "wall", "isthing": 0}],
            "annotations": [{"image_id": 1, "file_name": "p.png",
                             "segments_info": [{"id": 1, "category_id": 1, "bbox": "0 0 8 8"}]}]}
    path = tmp_path / "panoptic.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"panoptic\.json: annotations\[0\]\.segments_info\[0\]: field 'bbox'"):
        GroundTruthProposer(boxes=path)


# ---------------------------------------------------------------------------------------------- torchvision


@pytest.fixture(scope="module")
def photos():
    """Two photographs of different sizes and aspect ratios, both far larger than the transform's frame."""
    return [photo("coffee"), photo("astronaut")]  # 600x400, 512x512


@pytest.fixture(scope="module")
def detector_proposer():
    torch.manual_seed(0)
    return TorchvisionProposer(FAST_MODEL, weights="none", min_size=MIN_SIZE, max_size=MAX_SIZE, batch_size=1)


def _check_in_image(proposals, image):
    width, height = image.size
    for p in proposals:
        x0, y0, x1, y1 = p.box
        assert all(math.isfinite(v) for v in p.box)
        assert -1e-3 <= x0 <= x1 <= width + 1e-3 and -1e-3 <= y0 <= y1 <= height + 1e-3, (p.box, image.size)


def test_torchvision_detector_boxes_are_in_original_pixels(detector_proposer, photos):
    out = detector_proposer.propose(photos, _records("c.jpg", "a.jpg"))
    assert detector_proposer.detector.roi_heads.score_thresh == DETECTOR_MIN_SCORE == 0.001
    for proposals, image in zip(out, photos):
        assert 0 < len(proposals) <= 100  # Faster R-CNN's per-image cap
        _check_in_image(proposals, image)
        assert all(0 <= p.score <= 1 and p.label.isdigit() for p in proposals)  # random weights: class indices
        # boxes reach beyond the 128..256-pixel frame the model saw: they were mapped back to the photo
        assert max(p.box[2] for p in proposals) > 1.5 * MAX_SIZE * image.width / max(image.size)
    assert detector_proposer.describe() == f"torchvision:{FAST_MODEL} weights=none min_size=128 max_size=256"


def test_torchvision_mask_rcnn_proposes_boxes_without_its_mask_head(photos):
    torch.manual_seed(0)
    proposer = TorchvisionProposer("maskrcnn_resnet50_fpn", weights="none", min_size=64, max_size=96)
    assert not proposer.detector.roi_heads.has_mask()
    out = proposer.propose(photos[:1], _records("c.jpg"))
    assert len(out[0]) > 0
    _check_in_image(out[0], photos[0])


def test_torchvision_rpn_proposals_span_the_original_image(photos):
    torch.manual_seed(0)
    proposer = TorchvisionProposer(FAST_MODEL, weights="none", rpn=True, min_size=MIN_SIZE, max_size=MAX_SIZE)
    out = proposer.propose(photos, _records("c.jpg", "a.jpg"))
    for proposals, image in zip(out, photos):
        assert len(proposals) == 150  # this model's RPN keeps its top 150 after NMS at test time
        _check_in_image(proposals, image)
        assert all(0 <= p.score <= 1 and p.label is None for p in proposals)
        # RPN boxes are clipped to the resized image, then scaled: the largest reach its far edges exactly
        assert max(p.box[2] for p in proposals) == pytest.approx(image.width, rel=1e-5)
        assert max(p.box[3] for p in proposals) == pytest.approx(image.height, rel=1e-5)
    assert proposer.describe().endswith(" rpn min_size=128 max_size=256")


def test_rpn_proposals_are_the_rpns_own_boxes(photos):
    """The mirrored RPN forward gives the boxes ``RegionProposalNetwork.forward`` returns, mapped back."""
    from torchvision.transforms.functional import to_tensor

    torch.manual_seed(0)
    detector = TorchvisionProposer(FAST_MODEL, weights="none", min_size=MIN_SIZE).detector
    images = [to_tensor(image) for image in photos]
    with torch.inference_mode():
        ours = rpn_proposals(detector, images)
        batch, _ = detector.transform(images)
        boxes, _ = detector.rpn(batch, detector.backbone(batch.tensors))
        theirs = detector.transform.postprocess([{"boxes": b} for b in boxes], batch.image_sizes,
                                                [tuple(i.shape[-2:]) for i in images])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a["boxes"], b["boxes"])
        assert a["scores"].shape == (len(a["boxes"]),)


@pytest.mark.parametrize("checkpoint", [False, True], ids=["state_dict", "checkpoint_model_key"])
def test_torchvision_weights_file_round_trip(tmp_path, detector_proposer, photos, checkpoint):
    state = detector_proposer.detector.state_dict()
    path = tmp_path / "detector.pth"
    torch.save({"model": state, "epoch": 3} if checkpoint else state, path)
    # the same batches: a batch pads its images to one size, which changes a detector's output a little
    loaded = TorchvisionProposer(FAST_MODEL, weights=str(path), min_size=MIN_SIZE, max_size=MAX_SIZE, batch_size=1)
    records = _records("c.jpg", "a.jpg")
    theirs, ours = detector_proposer.propose(photos, records), loaded.propose(photos, records)
    assert [[p.box for p in ps] for ps in theirs] == [[p.box for p in ps] for ps in ours]
    assert [[p.score for p in ps] for ps in theirs] == [[p.score for p in ps] for ps in ours]
    coco = get_model_weights(FAST_MODEL).DEFAULT.meta["categories"]  # a file's classes: the default weights'
    assert all(p.label in coco for ps in ours for p in ps)
    assert loaded.describe() == f"torchvision:{FAST_MODEL} weights={path} min_size=128 max_size=256"


def test_torchvision_weights_file_of_another_model_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"other\.pth: not a state dict of torchvision " + FAST_MODEL):
        TorchvisionProposer(FAST_MODEL, weights=str(path))


@pytest.mark.parametrize("options, match", [
    ({"model": "fasterrcnn_nope"}, r"unknown model 'fasterrcnn_nope'; detection models: .*fasterrcnn_resnet50_fpn_v2"),
    ({"weights": "COCO_V9"}, r"weights 'COCO_V9' is not a file, 'none' or a weights name of .* \(COCO_V1, DEFAULT\)"),
    ({"model": "ssdlite320_mobilenet_v3_large", "rpn": True}, r"rpn=True needs a two-stage model"),
    ({"model": "ssdlite320_mobilenet_v3_large", "min_size": 100}, r"does not take min_size"),
    ({"batch_size": 0}, r"batch_size must be >= 1"),
])
def test_torchvision_bad_options_are_named(options, match):
    options = {"model": FAST_MODEL, "weights": "none"} | options
    with pytest.raises(ValueError, match=match):
        TorchvisionProposer(**options)


# ---------------------------------------------------------------------------------------------- ultralytics


class _FakeModel:
    """Shaped like an ultralytics ``YOLO`` / ``FastSAM``: ``predict(list of PIL images, **options)`` returns one
    ``Results``-like object per image (``boxes.xyxy`` (N, 4), ``boxes.conf`` (N,), ``boxes.cls`` (N,), ``names``)."""

    names: ClassVar[dict[int, str]] = {0: "person", 1: "dog"}

    def __init__(self, weights):
        self.weights, self.calls = weights, []

    def predict(self, source, **options):
        self.calls.append((len(source), options))
        results = []
        for image in source:
            w, h = image.size
            boxes = SimpleNamespace(xyxy=torch.tensor([[0.0, 1.0, w / 2, h / 2], [2.0, 3.0, w, h]]),
                                    conf=torch.tensor([0.9, 0.125]), cls=torch.tensor([1.0, 0.0]))
            results.append(SimpleNamespace(boxes=boxes, names=self.names))
        return results


@pytest.fixture
def fake_ultralytics(monkeypatch):
    module = types.ModuleType("ultralytics")
    module.YOLO = type("YOLO", (_FakeModel,), {})
    module.FastSAM = type("FastSAM", (_FakeModel,), {"names": {0: "object"}})
    monkeypatch.setitem(sys.modules, "ultralytics", module)
    return module


def test_yolo_glue_reads_boxes_scores_and_class_names_in_batches(fake_ultralytics, photos):
    proposer = build_proposer("yolo", weights="yolov9c.pt", batch_size=2, device="cuda:1")
    assert type(proposer.model).__name__ == "YOLO" and proposer.model.weights == "yolov9c.pt"
    out = proposer.propose(photos + [photos[0]], _records("c.jpg", "a.jpg", "c2.jpg"))
    assert out[0] == [Proposal((0.0, 1.0, 300.0, 200.0), pytest.approx(0.9), "dog"),
                      Proposal((2.0, 3.0, 600.0, 400.0), 0.125, "person")]
    assert out[1][1].box == (2.0, 3.0, 512.0, 512.0) and len(out) == 3
    expected = {"imgsz": 640, "conf": 0.001, "iou": 0.7, "device": "cuda:1", "verbose": False}
    assert proposer.model.calls == [(2, expected), (1, expected)]
    assert proposer.describe() == "yolo:yolov9c.pt imgsz=640 conf=0.001 iou=0.7"


def test_fastsam_glue_has_scores_and_no_labels(fake_ultralytics, photos):
    proposer = build_proposer("fastsam", weights="FastSAM-s.pt", imgsz=1024, conf=0.4, iou=0.9)
    assert type(proposer.model).__name__ == "FastSAM"
    out = proposer.propose(photos[:1], _records("c.jpg"))
    assert [(p.box, p.label) for p in out[0]] == [((0.0, 1.0, 300.0, 200.0), None), ((2.0, 3.0, 600.0, 400.0), None)]
    assert [p.score for p in out[0]] == pytest.approx([0.9, 0.125])
    assert proposer.describe() == "fastsam:FastSAM-s.pt imgsz=1024 conf=0.4 iou=0.9"


def test_yolo_without_ultralytics_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", None)  # makes `import ultralytics` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'finegrain\[yolo\]'"):
        YoloProposer("yolov9c.pt")


# ---------------------------------------------------------------------------------------------- build_proposer


def test_build_proposer_gt_and_torchvision(tmp_path):
    assert isinstance(build_proposer("gt"), GroundTruthProposer)
    proposer = build_proposer("torchvision", model=FAST_MODEL, weights="none", rpn=True)
    assert isinstance(proposer, TorchvisionProposer) and proposer.rpn


@pytest.mark.parametrize("name, options, match", [
    ("detr", {}, r"unknown proposer 'detr'; choose one of: gt, torchvision, yolo, fastsam"),
    ("torchvision", {"score_thresh": 0.5}, r"unknown option\(s\) score_thresh; valid options: model, weights, rpn"),
    ("yolo", {"kind": "fastsam", "weights": "x.pt"}, r"unknown option\(s\) kind; valid options: weights, device"),
    ("fastsam", {}, r"proposer 'fastsam': option\(s\) weights must be given"),
])
def test_build_proposer_errors_list_valid_choices(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_proposer(name, **options)


# ----- offline: one line naming what to download or pass -----------------------------------------------------
def _no_network(address, timeout):
    raise OSError("no route to host")


def test_torchvision_default_weights_offline_fail_at_once_naming_the_file_to_pass(tmp_path, monkeypatch):
    from finegrain.models import factory

    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    monkeypatch.setattr(factory.socket, "create_connection", _no_network)
    with pytest.raises(PretrainedWeightsUnavailable, match=r"download.pytorch.org is unreachable.*download "
                                                           r"https://download.pytorch.org/models/.*--weights FILE"):
        TorchvisionProposer(FAST_MODEL, weights="DEFAULT")


def test_torchvision_weights_download_failure_behind_a_proxy_names_the_file_to_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # a proxy that refuses connections
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    with pytest.raises(PretrainedWeightsUnavailable, match=r"cannot be downloaded \(.*\): download https://.*"
                                                           r"--weights FILE"):
        TorchvisionProposer(FAST_MODEL, weights="DEFAULT")
