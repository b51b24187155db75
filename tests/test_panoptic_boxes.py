"""COCO panoptic box classification (FineCLIP / CLIPSelf protocol) on a panoptic json + PNGs written for
the photographs of ``photos.py``."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from photos import CATEGORIES, PHOTOS, photo, segment_map
from PIL import Image
from torch import nn

from finegrain.data.coco_panoptic import decode_segment_ids, read_panoptic
from finegrain.eval.box_classification import (
    WAYS,
    evaluate_panoptic_box_classification,
    fit_image,
    masks_to_grid,
    pool_masks,
    predict_boxes,
)
from finegrain.models import create_model, get_tokenizer

ISTHING = {s.category: s.isthing for p in PHOTOS.values() for s in p.segments}
# the hand-known boxes: a thing's is its annotation bbox (the painted box); a stuff segment's comes from
# its mask, whose first and last pixels are the painted box's corners (later segments cover only inner
# parts): CLIPSelf's mask2box gives [x0, y0, x1 - 1, y1 - 1]
BOXES = {
    "astronaut": [("wall", (0, 0, 511, 511)), ("person", (20, 15, 365, 512)), ("rocket", (360, 0, 450, 280))],
    "coffee": [("table", (0, 0, 599, 399)), ("cup", (170, 15, 415, 300)), ("spoon", (320, 200, 410, 325))],
    "chelsea": [("wall", (0, 0, 119, 299)), ("cat", (60, 0, 451, 300))],
    "rocket": [("sky", (0, 0, 639, 259)), ("ground", (0, 380, 639, 426)), ("rocket", (300, 125, 345, 420))],
}
# small segments painted over the astronaut's wall for the size filter: (category, x0, y0, x1, y1)
EXTRAS = [("cup", 462, 302, 470, 310),  # thing, bbox 8x8: area 64, kept
          ("spoon", 475, 302, 482, 311),  # thing, bbox 7x9: area 63, dropped
          ("sky", 462, 320, 471, 329),  # stuff, 9x9 pixels: mask box (462, 320, 470, 328), area 8*8 = 64, kept
          ("ground", 475, 320, 484, 328)]  # stuff, 9x8 pixels (72): mask box area 8*7 = 56, dropped


def category_id(name: str) -> int:
    return 10 * (CATEGORIES.index(name) + 1)  # not contiguous, and written in reverse order below


def segment_id(image: int, k: int) -> int:
    return 65793 * (k + 1) + 7 * image + 1  # every RGB channel in use: R + 256 G + 256**2 B


def write_panoptic(root: Path, colours: dict[str, tuple[int, int, int]] | None = None,
                   extras: list = ()) -> Path:
    """``root/panoptic.json``, its PNGs in ``root/panoptic/`` (RGB-encoded ids, as panopticapi writes them)
    and the images in ``root/images/``: the photographs, or with ``colours`` each pixel painted with its
    segment's category colour (black where no segment is)."""
    (root / "panoptic").mkdir(parents=True)
    (root / "images").mkdir()
    images, annotations = [], []
    for i, (name, spec) in enumerate(PHOTOS.items()):
        painted = segment_map(name).copy()
        segments = [(s.category, s.box) for s in spec.segments]
        for category, x0, y0, x1, y1 in (extras if name == "astronaut" else ()):
            segments.append((category, (x0, y0, x1, y1)))
            painted[y0:y1, x0:x1] = len(segments)
        ids = np.array([0, *(segment_id(i, k) for k in range(len(segments)))])[painted]
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / f"{name}.png")
        if colours is None:
            photo(name).save(root / "images" / f"{name}.png")
        else:
            lookup = np.array([(0, 0, 0), *(colours[c] for c, _ in segments)], dtype=np.uint8)
            Image.fromarray(lookup[painted]).save(root / "images" / f"{name}.png")
        height, width = painted.shape
        images.append({"id": 100 + i, "file_name": f"{name}.png", "width": width, "height": height})
        annotations.append({"image_id": 100 + i, "file_name": f"{name}.png", "segments_info": [
            {"id": segment_id(i, k), "category_id": category_id(c), "iscrowd": 0,
             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int((painted == k + 1).sum())}
            for k, (c, (x0, y0, x1, y1)) in enumerate(segments)]})
    categories = [{"id": category_id(c), "name": c, "isthing": int(ISTHING[c]), "supercategory": "x"}
                  for c in reversed(CATEGORIES)]
    path = root / "panoptic.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


# ----- the reader ---------------------------------------------------------------------------------------


def test_reader_gives_annotation_boxes_for_things_and_mask_boxes_for_stuff(tmp_path):
    path = write_panoptic(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][1]["segments_info"][1]["bbox"] = [171.5, 16, 240, 280]  # the cup: not its mask's box
    path.write_text(json.dumps(data))
    panoptic = read_panoptic(path)
    assert panoptic.class_names == list(CATEGORIES) and len(panoptic) == 4  # sorted by category id
    skipped = []
    samples = {Path(s.image).stem: s for s in panoptic.samples(skipped)}
    assert skipped == [] and list(samples) == list(PHOTOS)
    expected = {name: list(boxes) for name, boxes in BOXES.items()}
    expected["coffee"][1] = ("cup", (171.5, 16, 411.5, 296))
    for name, sample in samples.items():
        assert [(s.category, s.isthing, s.box) for s in sample.segments] == [
            (c, ISTHING[c], tuple(float(v) for v in box)) for c, box in expected[name]]
        assert (sample.width, sample.height, sample.image) == (*photo(name).size, f"{name}.png")
    rocket = samples["rocket"]
    np.testing.assert_array_equal(rocket.masks(), segment_map("rocket")[None] == np.arange(1, 4)[:, None, None])
    assert rocket.masks(rocket.segments[2:]).shape == (1, 427, 640)


def test_segment_ids_decode_as_r_plus_256_g_plus_65536_b(tmp_path):
    png = tmp_path / "ids.png"
    Image.fromarray(np.array([[[1, 0, 0], [0, 1, 0]], [[0, 0, 1], [7, 2, 3]]], dtype=np.uint8)).save(png)
    np.testing.assert_array_equal(decode_segment_ids(png), [[1, 256], [65536, 7 + 512 + 3 * 65536]])


def test_reader_errors_name_the_file_and_field(tmp_path):
    path = write_panoptic(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][0]["segments_info"][1]["category_id"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(f"{path}: annotations[0].segments_info[1]: field "
                                                   "'category_id' 999 is not in 'categories'")):
        read_panoptic(path)
    data["annotations"][0]["segments_info"][1].update(category_id=category_id("person"), bbox=[1, 2, 3])
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[0\]\.segments_info\[1\]: field 'bbox' must be"):
        read_panoptic(path)
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="field 'categories' must be a list"):
        read_panoptic(path)


# ----- geometry and pooling ----------------------------------------------------------------------------


def test_longest_side_resize_scales_boxes_by_the_exact_factor():
    image = Image.new("RGB", (600, 400))
    image.paste((255, 255, 255), (150, 100, 450, 300))  # a white box (150, 100, 450, 300) on black
    fitted, (sx, sy) = fit_image(image, (1024, 1024), "longest")
    assert fitted.size == (1024, 1024) and sx == sy == 1024 / 600  # the factor, not round(400 s) / 400
    box = np.array([150, 100, 450, 300]) * sx  # (256, 170.67, 768, 512)
    pixels = np.asarray(fitted)[..., 0].astype(int)
    assert pixels[int(box[1]) + 2:int(box[3]) - 2, int(box[0]) + 2:int(box[2]) - 2].min() == 255
    assert pixels[:, :int(box[0]) - 2].max() == pixels[:int(box[1]) - 2].max() == 0
    assert pixels[:, int(box[2]) + 2:].max() == pixels[int(box[3]) + 2:].max() == 0  # and the padding
    assert np.asarray(fitted)[round(400 * sx):].max() == 0
    squashed, scale = fit_image(image, (224, 112), "squash")
    assert squashed.size == (112, 224) and scale == (112 / 600, 224 / 400)
    centred, _ = fit_image(Image.new("RGB", (600, 400), (255, 255, 255)), (60, 60), "longest", centre=True)
    assert np.asarray(centred)[:, 0, 0].tolist() == [0] * 10 + [255] * 40 + [0] * 10  # 20 rows padded, 10 + 10


def test_masks_go_to_the_grid_by_bicubic_resize_and_positive_threshold():
    left = torch.zeros(1, 4, 8, dtype=torch.bool)
    left[:, :, :4] = True  # the left half of a 4 x 8 mask
    # 8 -> 4 columns: output column j samples input x = 2j + 0.5 with cubic weights (-0.09375, 0.59375,
    # 0.59375, -0.09375) on columns 2j-1 .. 2j+2: column 1 gets 1.09375, column 2 gets -0.09375
    assert masks_to_grid(left, (2, 4), "squash").tolist() == [[[True, True, False, False]] * 2]
    # longest: the 4 x 8 mask scaled by min(4/4, 4/8) = 0.5 to 2 x 4, then padded to 4 x 4 with zeros
    assert masks_to_grid(left, (4, 4), "longest").tolist() == [[[True, True, False, False]] * 2
                                                               + [[False] * 4] * 2]


def test_mask_pooling_is_the_normalised_mean_under_each_mask():
    dense = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # (1, 2, 2, 2)
    masks = torch.tensor([[[True, True], [False, False]], [[True, False], [False, True]]])
    means = torch.tensor([[1.5, 0.5], [2.5, 0.0]])  # top row; main diagonal
    torch.testing.assert_close(pool_masks(dense, [masks]), F.normalize(means, dim=-1))
    assert pool_masks(dense, [torch.zeros(1, 2, 2, dtype=torch.bool)]).abs().sum() == 0  # an empty mask


# ----- an oracle: dense features are the one-hot of each pixel's category colour ------------------------

COLOURS = {"cat": (230, 25, 75), "cup": (60, 180, 75), "ground": (255, 225, 25), "person": (0, 130, 200),
           "rocket": (245, 130, 48), "sky": (145, 30, 180), "spoon": (70, 240, 240),
           "table": (240, 50, 230), "wall": (255, 255, 255)}


def category_tokenizer(texts: list[str]) -> torch.Tensor:
    """``(N, 1)``: the index of the one category named in each prompt."""
    found = [[CATEGORIES.index(w) for w in re.findall(r"[a-z]+", t) if w in CATEGORIES] for t in texts]
    assert all(len(f) == 1 for f in found), texts
    return torch.tensor(found)


class ColourOracle(nn.Module):
    """Pixels embed as the one-hot of the nearest category colour (black: a void dimension), so a RoI or
    mask embedding is the category histogram of its box or mask and a crop's is that of the crop; text
    embeds as the one-hot of the category it names."""

    image_size = (64, 64)
    patch_size = (1, 1)

    def __init__(self):
        super().__init__()
        self.preprocess_cfg = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # pixels stay in [0, 1]
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.palette = torch.tensor([COLOURS[c] for c in CATEGORIES] + [(0, 0, 0)], dtype=torch.float32) / 255

    def _one_hot(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C + 1, H, W)
        assert not self.training and not torch.is_grad_enabled()
        nearest = torch.cdist(images.permute(0, 2, 3, 1).flatten(1, 2), self.palette[None]).argmin(dim=-1)
        return F.one_hot(nearest, len(self.palette)).float().unflatten(1, images.shape[-2:]).permute(0, 3, 1, 2)

    def encode_dense(self, images: torch.Tensor, mode: str = "v_only") -> torch.Tensor:
        return self._one_hot(images)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._one_hot(images).mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], len(self.palette)).float()


def oracle_expected() -> dict[str, float]:
    """What the oracle must score (box histograms measured on the painted category maps).

    Wrong: the astronaut's wall, whose box (the whole image) is 51% person and 39% wall, by roi and crop;
    the cup's crop (its box enlarged 1.5x), 56% table and 36% cup. Every other box and crop is a majority
    of its own category (margin >= 10 points), every mask is pure, and the target is always among the
    top 5 (at most 3 categories in any box). Per class: wall 1 of 2 (roi, crop), cup 0 of 1 (crop).
    """
    expected = {}
    for way, wrong_thing, wrong_stuff in (("roi", 0, 0.5), ("crop", 1, 0.5), ("mask", 0, 0)):
        expected.update({
            f"{way}_acc1": 100 * (11 - wrong_thing - 2 * wrong_stuff) / 11,
            f"{way}_macc1": 100 * (9 - wrong_thing - wrong_stuff) / 9,
            f"{way}_thing_macc1": 100 * (5 - wrong_thing) / 5, f"{way}_stuff_macc1": 100 * (4 - wrong_stuff) / 4,
            **{f"{way}_{k}": 100.0 for k in ("acc5", "macc5", "thing_macc5", "stuff_macc5")}})
    return {k: pytest.approx(v, abs=1e-4) for k, v in expected.items()}


@pytest.mark.parametrize("resize,image_size", [("squash", None), ("longest", 96)])
def test_oracle_scores_the_known_macc_and_thing_stuff_split(tmp_path, resize, image_size):
    path = write_panoptic(tmp_path, colours=COLOURS)
    model = ColourOracle()
    model.train()
    m = evaluate_panoptic_box_classification(model, path, tmp_path / "images", category_tokenizer, resize=resize,
                                             image_size=image_size, batch_size=3, progress=False)
    counts = {"num_images": 4, "num_boxes": 11, "num_thing_boxes": 6, "boxes_filtered": 0, "skipped_images": 0}
    assert {k: m.pop(k) for k in counts} == counts
    assert m == oracle_expected()
    assert model.training


def test_size_filter_keeps_boxes_by_box_area(tmp_path):
    path = write_panoptic(tmp_path, colours=COLOURS, extras=EXTRAS)
    samples = list(read_panoptic(path).samples([]))
    assert [s.box_area for s in samples[0].segments[3:]] == [64, 63, 64, 56]
    m = evaluate_panoptic_box_classification(ColourOracle(), path, tmp_path / "images", category_tokenizer,
                                             ways=("roi",), progress=False)
    assert (m["num_boxes"], m["num_thing_boxes"], m["boxes_filtered"]) == (13, 7, 2)
    # box areas over 400**2: the astronaut's wall (511 * 511) and person (345 * 497), the table
    # (599 * 399) and the sky (639 * 259)
    m = evaluate_panoptic_box_classification(ColourOracle(), path, tmp_path / "images", category_tokenizer,
                                             ways=("roi",), max_box_size=400, progress=False)
    assert (m["num_boxes"], m["num_thing_boxes"], m["boxes_filtered"]) == (9, 6, 6)


def test_missing_png_and_unreadable_image_are_skipped_and_counted(tmp_path, caplog):
    path = write_panoptic(tmp_path, colours=COLOURS)
    (tmp_path / "panoptic" / "coffee.png").unlink()
    (tmp_path / "images" / "chelsea.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        m = evaluate_panoptic_box_classification(ColourOracle(), path, tmp_path / "images", category_tokenizer,
                                                 ways=("mask",), progress=False)
    assert (m["num_images"], m["num_boxes"], m["skipped_images"], m["mask_macc1"]) == (2, 6, 2, 100.0)
    assert "skipped 2 of 4 images" in caplog.text and "coffee.png: panoptic PNG not found" in caplog.text
    assert "chelsea.png" in caplog.text


@pytest.mark.parametrize("way", WAYS)
def test_predict_boxes_gives_the_class_and_its_softmax_probability(way):
    image = Image.new("RGB", (100, 50), COLOURS["sky"])
    image.paste(COLOURS["ground"], (50, 0, 100, 50))
    boxes = [(5, 5, 40, 45), (60, 5, 95, 45)]
    masks = np.zeros((2, 50, 100), dtype=bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = True
    classifier = F.one_hot(torch.arange(len(CATEGORIES)), len(CATEGORIES) + 1).float()
    pred, score = predict_boxes(ColourOracle(), image, boxes, classifier, way=way, masks=masks)
    assert pred.tolist() == [CATEGORIES.index("sky"), CATEGORIES.index("ground")]
    # logits 10 * cosine: 10 for the box's category, 0 for the 8 others
    torch.testing.assert_close(score, torch.full((2,), math.exp(10) / (math.exp(10) + 8)))


# ----- a real tiny model --------------------------------------------------------------------------------


@pytest.mark.parametrize("resize,image_size", [("squash", None), ("longest", 64)])
def test_tiny_model_runs_every_way_and_resize_mode(tmp_path, resize, image_size):
    torch.manual_seed(0)
    model = create_model("finegrain-test")
    model.train()
    path = write_panoptic(tmp_path)
    m = evaluate_panoptic_box_classification(model, path, tmp_path / "images", get_tokenizer("finegrain-test"),
                                             resize=resize, image_size=image_size, batch_size=64, progress=False)
    keys = {f"{way}_{k}" for way in WAYS for k in ("acc1", "acc5", "macc1", "macc5", "thing_macc1", "thing_macc5",
                                                    "stuff_macc1", "stuff_macc5")}
    counts = {"num_images": 4, "num_boxes": 11, "num_thing_boxes": 6, "boxes_filtered": 0, "skipped_images": 0}
    assert {k: m.pop(k) for k in counts} == counts
    assert set(m) == keys and all(0.0 <= v <= 100.0 for v in m.values())
    assert model.training
