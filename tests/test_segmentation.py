"""Open-vocabulary segmentation: the folder layouts (ADE20K, Pascal Context-59), the mIoU / mAcc / aAcc
metric against hand-computed values, sliding windows, and the evaluator with an oracle and a real model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from photos import CATEGORIES, PHOTOS, category_map, photo
from PIL import Image
from torch import nn

from finegrain.data.images import ImageError
from finegrain.data.segmentation import SegmentationFolder
from finegrain.eval.classification import class_text_embeddings
from finegrain.eval.prompts import load_class_names
from finegrain.eval.segmentation import (
    ConfusionMatrix,
    SlideInference,
    evaluate_segmentation,
    predict_segmentation,
    run_segmentation,
    window_boxes,
)
from finegrain.models import create_model, get_tokenizer

NAMES = sorted(PHOTOS)  # astronaut, chelsea, coffee, rocket

# ----- folder layouts -----------------------------------------------------------------------------------


def write_ade(root, names=NAMES):
    """ADE20K layout: labels 1.. = CATEGORIES, 0 = unlabelled ("other")."""
    images = root / "ADEChallengeData2016/images/validation"
    labels = root / "ADEChallengeData2016/annotations/validation"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for name in names:
        photo(name).save(images / f"{name}.jpg", quality=95)
        semantic = category_map(name)
        Image.fromarray(np.where(semantic == 255, 0, semantic + 1).astype(np.uint8)).save(labels / f"{name}.png")
    return root


def write_context(root, split=("astronaut", "coffee", "rocket")):
    """Pascal Context layout with palette (mode P) label maps: 0 = background, 1.. = CATEGORIES; every photo
    is written, the val split lists three."""
    voc = root / "VOCdevkit/VOC2010"
    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (voc / sub).mkdir(parents=True)
    for name in NAMES:
        photo(name).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        semantic = category_map(name)
        label = Image.fromarray(np.where(semantic == 255, 0, semantic + 1).astype(np.uint8)).convert("P")
        label.save(voc / "SegmentationClassContext" / f"{name}.png")
    (voc / "ImageSets/SegmentationContext/val.txt").write_text("".join(f"{n}\n" for n in split))
    return root


def test_ade20k_preset_reduces_zero_label(tmp_path):
    data = SegmentationFolder.preset("ade20k-150", write_ade(tmp_path), class_names=list(CATEGORIES))
    assert data.stems == NAMES
    for i, name in enumerate(NAMES):
        sample = data[i]
        assert sample.stem == name and sample.label.dtype == torch.int64
        # file 0 -> 255 (ignored), file k + 1 -> class k
        assert torch.equal(sample.label, torch.from_numpy(category_map(name).astype(np.int64)))
        assert sample.image.size == photo(name).size


def test_presets_default_to_the_standard_class_lists(tmp_path):
    ade = SegmentationFolder.preset("ade20k-150", write_ade(tmp_path / "a", ["coffee"]))
    names = load_class_names(ade.class_names)
    assert len(names) == 150 and names[:3] == ["wall", "building", "sky"] and names[7] == "bed"
    assert names[-1] == "flag"
    context = SegmentationFolder.preset("pascal-context-59", write_context(tmp_path / "c"))
    names = load_class_names(context.class_names)
    assert len(names) == 59 and names[0] == "aeroplane" and names[-1] == "wood" and "background" not in names


def test_pascal_context_preset_reads_the_split_and_palette_labels(tmp_path):
    data = SegmentationFolder.preset("pascal-context-59", write_context(tmp_path))
    assert data.stems == ["astronaut", "coffee", "rocket"]
    sample = data[1]
    assert sample.stem == "coffee"
    assert torch.equal(sample.label, torch.from_numpy(category_map("coffee").astype(np.int64)))


def test_preset_accepts_the_layout_folder_itself(tmp_path):
    write_ade(tmp_path, ["chelsea"])
    data = SegmentationFolder.preset("ade20k-150", tmp_path / "ADEChallengeData2016")
    assert data.stems == ["chelsea"]


def test_generic_folder_keeps_labels_and_custom_ignore_index(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    Image.new("RGB", (3, 2)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.array([[0, 1, 7], [2, 7, 0]], dtype=np.uint8)).save(tmp_path / "lab" / "a.png")
    plain = SegmentationFolder(tmp_path, "img", "lab", ["x", "y", "z"], ignore_index=7)
    assert plain[0].label.tolist() == [[0, 1, 7], [2, 7, 0]]
    reduced = SegmentationFolder(tmp_path, "img", "lab", ["x", "y"], reduce_zero_label=True, ignore_index=7)
    assert reduced[0].label.tolist() == [[7, 0, 7], [1, 7, 7]]


def test_label_map_of_another_size_is_an_error_naming_the_file(tmp_path):
    write_ade(tmp_path, ["coffee"])
    label = tmp_path / "ADEChallengeData2016/annotations/validation/coffee.png"
    Image.new("L", (10, 10)).save(label)
    data = SegmentationFolder.preset("ade20k-150", tmp_path)
    with pytest.raises(ValueError, match=r"coffee\.png.*10x10.*same size"):
        data[0]


def test_unreadable_pairs_raise_image_errors_and_bad_layouts_name_the_field(tmp_path):
    write_context(tmp_path, split=("astronaut", "missing"))
    voc = tmp_path / "VOCdevkit/VOC2010"
    (voc / "SegmentationClassContext/astronaut.png").write_bytes(b"not a png")
    data = SegmentationFolder.preset("pascal-context-59", tmp_path)
    with pytest.raises(ImageError, match="astronaut.png.*cannot decode"):
        data[0]
    with pytest.raises(ImageError, match="no image file for stem 'missing'"):
        data[1]
    Image.new("RGB", (4, 4)).save(voc / "SegmentationClassContext/astronaut.png")
    with pytest.raises(ImageError, match="single-channel"):
        data[0]
    with pytest.raises(ValueError, match="labels directory"):
        SegmentationFolder(voc, "JPEGImages", "nowhere", ["x"])
    with pytest.raises(ValueError, match="split file .*test.txt"):
        SegmentationFolder.preset("pascal-context-59", tmp_path, split="test")
    with pytest.raises(ValueError, match="unknown segmentation preset"):
        SegmentationFolder.preset("cityscapes", tmp_path)


# ----- the metric ---------------------------------------------------------------------------------------


def test_perfect_predictor_scores_100():
    confusion = ConfusionMatrix(len(CATEGORIES))
    for name in NAMES:
        label = torch.from_numpy(category_map(name).astype(np.int64))
        confusion.update(label.clamp(max=3), label.where(label < 4, 255))  # classes >= 4 ignored: never counted
    assert confusion.metrics() == {"miou": 100.0, "macc": 100.0, "aacc": 100.0}


def test_known_confusion_gives_hand_computed_iou_and_accuracy():
    label = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 255, 255])
    pred = torch.tensor([0, 0, 1, 3, 1, 2, 2, 2, 0, 1, 4])
    confusion = ConfusionMatrix(5)
    confusion.update(pred, label)
    # class 0: TP 2, label 4, predicted 3 -> IoU 2/5, acc 2/4
    # class 1: TP 1, label 2, predicted 2 -> IoU 1/3, acc 1/2
    # class 2: TP 2, label 3, predicted 3 -> IoU 2/4, acc 2/3
    # class 3: never labelled, predicted once -> IoU 0 (counts in mIoU), acc undefined (left out of mAcc)
    # class 4: predicted only on an ignored pixel -> absent everywhere, left out of both
    iou = confusion.per_class_iou()
    assert iou[:4].tolist() == pytest.approx([40.0, 100 / 3, 50.0, 0.0]) and iou[4].isnan()
    acc = confusion.per_class_accuracy()
    assert acc[:3].tolist() == pytest.approx([50.0, 50.0, 200 / 3]) and acc[3:].isnan().all()
    metrics = confusion.metrics()
    assert metrics["miou"] == pytest.approx((40 + 100 / 3 + 50 + 0) / 4)
    assert metrics["macc"] == pytest.approx((50 + 50 + 200 / 3) / 3)
    assert metrics["aacc"] == pytest.approx(100 * 5 / 9)


def test_ignored_pixels_never_count():
    label = torch.tensor([[0, 1], [255, 255]])
    confusion = ConfusionMatrix(2)
    confusion.update(torch.tensor([[0, 1], [1, 0]]), label)
    assert confusion.counts.tolist() == [[1, 0], [0, 1]]
    assert confusion.metrics()["miou"] == 100.0
    with pytest.raises(ValueError, match="no labelled pixels"):
        ConfusionMatrix(2).metrics()


def test_label_outside_the_class_list_is_an_error_naming_the_file():
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"x\.png: label value 3 .*\[0, 2\]"):
        confusion.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 3], [255, 1]]), "x.png")


# ----- sliding windows ----------------------------------------------------------------------------------


def test_window_boxes_match_mmseg_slide_inference():
    # rows: (10 - 4 + 2) // 3 + 1 = 3 starting at 0, 3, 6; columns: one window as wide as the image
    assert window_boxes(10, 3, (4, 4), (3, 3)) == [(0, 0, 4, 3), (3, 0, 7, 3), (6, 0, 10, 3)]
    # the last column is moved back to end at the border: starts 0, 5, then 9 (not 10)
    assert [b[1] for b in window_boxes(4, 15, (4, 6), (4, 5))] == [0, 5, 9]


@pytest.mark.parametrize(("height", "width", "window", "stride"),
                         [(23, 17, (8, 8), (5, 3)), (8, 8, (8, 8), (4, 4)), (5, 30, (8, 6), (8, 6)),
                          (448, 597, (224, 224), (112, 112))])
def test_sliding_windows_cover_every_pixel(height, width, window, stride):
    counts = torch.zeros(height, width, dtype=torch.int64)
    boxes = window_boxes(height, width, window, stride)
    for y0, x0, y1, x1 in boxes:
        assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width
        assert (y1 - y0, x1 - x0) == (min(window[0], height), min(window[1], width))
        counts[y0:y1, x0:x1] += 1
    assert counts.min() >= 1
    assert len(set(boxes)) == len(boxes)


class WindowMeanModel(nn.Module):
    """Dense map of two channels, constant over a window: (mean of the window's red channel, 0). It records
    the input shapes it sees."""

    patch_size = (4, 4)
    image_size = (4, 8)

    def __init__(self):
        super().__init__()
        self.shapes = []

    def encode_dense(self, images, mode="v_only"):
        self.shapes.append(tuple(images.shape))
        assert images.shape[-2] % 4 == 0 and images.shape[-1] % 4 == 0
        b, _, h, w = images.shape
        mean = images[:, 0].mean(dim=(1, 2))
        return torch.stack([mean, torch.zeros_like(mean)], 1)[:, :, None, None].expand(b, 2, h // 4, w // 4)


def test_overlapping_window_logits_are_averaged():
    slide = SlideInference((0, 0, 0), (1, 1, 1), (4, 4), short_side=None, window=(4, 8), stride=(4, 4))
    model = WindowMeanModel()
    pixels = torch.zeros(3, 4, 12)
    pixels[0, :, 4:8], pixels[0, :, 8:] = 6.0, 12.0
    logits = slide.logits(lambda x: torch.einsum("bdhw,cd->bchw", model.encode_dense(x), torch.eye(2)), pixels)
    # windows [0, 8) (mean 3) and [4, 12) (mean 9): columns 4..7 lie in both -> (3 + 9) / 2
    expected = torch.tensor([3.0] * 4 + [6.0] * 4 + [9.0] * 4).expand(4, 12)
    assert torch.allclose(logits[0], expected) and torch.all(logits[1] == 0)
    assert model.shapes == [(2, 3, 4, 8)]  # both windows in one batch


def test_windows_off_the_patch_grid_are_padded_and_cropped():
    model = WindowMeanModel()
    slide = SlideInference((0, 0, 0), (1, 1, 1), (4, 4), short_side=None, window=None)
    pixels = torch.full((3, 6, 7), 2.0)
    logits = slide.logits(lambda x: torch.einsum("bdhw,cd->bchw", model.encode_dense(x), torch.eye(2)), pixels)
    assert model.shapes == [(1, 3, 8, 8)]  # padded to the patch grid with zeros
    assert logits.shape == (2, 6, 7) and torch.allclose(logits[0], torch.full((6, 7), 2.0 * 42 / 64))


def test_resize_keeps_the_aspect_ratio_with_short_side_and_long_side_cap():
    slide = SlideInference((0, 0, 0), (1, 1, 1), (4, 4), short_side=448)
    assert slide.pixels(Image.new("RGB", (683, 512)), "cpu").shape == (3, 448, 598)  # 683 * 448 / 512 = 597.6
    assert slide.pixels(Image.new("RGB", (5000, 100)), "cpu").shape == (3, 41, 2048)  # long side capped


# ----- the evaluator with an oracle: 100 iff files, labels, windows and metrics are wired right ----------

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
COLOURS = list(PALETTE)


def colour_tokenizer(texts):
    found = [[COLOURS.index(w) for w in re.findall(r"[a-z]+", t) if w in PALETTE] for t in texts]
    assert all(len(f) == 1 for f in found), texts
    return torch.tensor(found)


class ColourOracle(nn.Module):
    """Every pixel's feature is the one-hot of its nearest palette colour; text, of the colour it names."""

    image_size = (16, 16)
    patch_size = (1, 1)

    def __init__(self):
        super().__init__()
        self.palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255

    def encode_text(self, tokens, normalize=False):
        assert not self.training and not torch.is_grad_enabled()
        return F.one_hot(tokens[:, 0], len(PALETTE)).float()

    def encode_dense(self, images, mode="v_only"):
        assert not self.training and not torch.is_grad_enabled()
        b, _, h, w = images.shape
        nearest = torch.cdist(images.permute(0, 2, 3, 1).reshape(-1, 3), self.palette).argmin(dim=1)
        return F.one_hot(nearest, len(PALETTE)).float().view(b, h, w, -1).permute(0, 3, 1, 2)


def write_colour_folder(root, num_images=3, size=(40, 24)):
    """Images of coloured rectangles (PNG, lossless) with their class maps; a white band is unlabelled."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    colours = np.array(list(PALETTE.values()) + [(255, 255, 255)], dtype=np.uint8)
    for i in range(num_images):
        label = rng.integers(0, 3, size=(size[1] // 8, size[0] // 8)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
        label[:, :3] = 255
        Image.fromarray(colours[np.where(label == 255, 3, label)]).save(root / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "labels" / f"im{i}.png")
    (root / "classes.txt").write_text("\n".join(COLOURS) + "\n")
    return SegmentationFolder(root, "images", "labels", str(root / "classes.txt"))


def test_oracle_scores_100_through_the_evaluator(tmp_path):
    data = write_colour_folder(tmp_path)
    kwargs = {"templates": ["a {} region"], "short_side": None, "mean": (0, 0, 0), "std": (1, 1, 1),
              "progress": False}
    for options in ({"window": 16, "stride": 5}, {"inference": "whole"}):
        metrics = evaluate_segmentation(ColourOracle(), data, colour_tokenizer, **kwargs, **options)
        assert metrics == {"miou": 100.0, "macc": 100.0, "aacc": 100.0, "num_images": 3, "skipped_images": 0}


def test_unreadable_pairs_are_skipped_and_counted(tmp_path):
    data = write_colour_folder(tmp_path, num_images=4)
    (tmp_path / "images" / "im1.png").write_bytes(b"broken")
    (tmp_path / "labels" / "im2.png").write_bytes(b"broken")
    result = run_segmentation(ColourOracle(), data, colour_tokenizer, templates=["{}"], short_side=None,
                              mean=(0, 0, 0), std=(1, 1, 1), progress=False)
    assert (result.num_images, result.skipped_images) == (2, 2)
    assert result.metrics()["miou"] == 100.0
    assert set(result.per_class()) == set(COLOURS)
    for path in ("images/im0.png", "images/im3.png", "labels/im0.png", "labels/im3.png"):
        (tmp_path / path).write_bytes(b"broken")
    with pytest.raises(ValueError, match="none of the 4 images"):
        run_segmentation(ColourOracle(), data, colour_tokenizer, templates=["{}"], mean=(0, 0, 0), std=(1, 1, 1),
                         progress=False)


def test_size_mismatch_stops_the_evaluator_naming_the_file(tmp_path):
    data = write_colour_folder(tmp_path)
    Image.new("L", (5, 5)).save(tmp_path / "labels" / "im2.png")
    with pytest.raises(ValueError, match=r"im2\.png: label map is 5x5"):
        run_segmentation(ColourOracle(), data, colour_tokenizer, templates=["{}"], short_side=None,
                         mean=(0, 0, 0), std=(1, 1, 1), progress=False)


def test_known_wrong_class_list_gives_the_known_per_class_values(tmp_path):
    # classes listed as (green, red, blue): the oracle still predicts by colour name, so labels 0 and 1 swap
    data = write_colour_folder(tmp_path)
    result = run_segmentation(ColourOracle(), data, colour_tokenizer, class_names=["green", "red", "blue"],
                              templates=["{}"], short_side=None, mean=(0, 0, 0), std=(1, 1, 1), progress=False)
    per_class = result.per_class()
    assert per_class["green"] == {"iou": 0.0, "acc": 0.0} and per_class["red"] == {"iou": 0.0, "acc": 0.0}
    assert per_class["blue"] == {"iou": 100.0, "acc": 100.0}


# ----- a real (tiny) model end to end ------------------------------------------------------------------


def test_tiny_model_runs_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = create_model("finegrain-test")
    tokenizer = get_tokenizer("finegrain-test")
    data = SegmentationFolder.preset("ade20k-150", write_ade(tmp_path), class_names=list(CATEGORIES))
    for options in ({"short_side": 64}, {"short_side": 48, "inference": "whole", "dense_mode": "plain"}):
        result = run_segmentation(model, data, tokenizer, templates="simple", progress=False, **options)
        metrics = result.metrics()
        assert (metrics["num_images"], metrics["skipped_images"]) == (4, 0)
        assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["macc"] <= 100 and 0 < metrics["aacc"] <= 100
        labelled = sum(int((category_map(n) != 255).sum()) for n in NAMES)
        assert int(result.confusion.counts.sum()) == labelled
    classifier = class_text_embeddings(model, tokenizer, list(CATEGORIES), "simple", progress=False)
    prediction = predict_segmentation(model, photo("coffee"), classifier, short_side=64)
    assert prediction.shape == (400, 600) and prediction.dtype == torch.int64
    assert 0 <= int(prediction.min()) and int(prediction.max()) < len(CATEGORIES)
