import pytest
import torch
from PIL import Image

from finegrain.data.collate import collate
from finegrain.data.dataset import ResumableBatchSampler
from finegrain.data.records import Record, Region
from finegrain.data.sample import SampleBuilder, SampleSpec, enlarge_box
from finegrain.models import get_tokenizer

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def image_and_record():
    image = Image.new("RGB", (80, 40), (0, 0, 0))
    image.paste((255, 0, 0), (40, 0, 80, 20))  # red block in the top-right quarter
    record = Record("x.png", ("a red block", "a block"),
                    (Region((40, 0, 80, 20), caption="a red block"), Region((0, 20, 40, 40), label="black")))
    return image, record


def builder(spec):
    return SampleBuilder(spec, (32, 32), MEAN, STD, get_tokenizer("finegrain-test"))


def test_two_views_are_seeded_augmentations():
    _, record = image_and_record()
    image = Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())  # square: open_clip crops vary
    build = builder(SampleSpec(views=2))
    a, b = build(image, record, seed=5), build(image, record, seed=5)
    assert a["views"].shape == (2, 3, 32, 32) and "image" not in a
    assert torch.equal(a["views"], b["views"]) and torch.equal(a["text"], b["text"])
    assert not torch.equal(a["views"][0], a["views"][1])
    assert not torch.equal(a["views"][0], build(image, record, seed=6)["views"][0])


def test_regions_boxes_crops_and_padding():
    image, record = image_and_record()
    tok = get_tokenizer("finegrain-test")
    sample = builder(SampleSpec(regions=True, region_crops=True, max_regions=3, crop_scale=1.0))(image, record, 0)
    assert sample["image"].shape == (3, 32, 32)
    # squash resize 80x40 -> 32x32: x scales by 0.4, y by 0.8
    torch.testing.assert_close(sample["boxes"][:2], torch.tensor([[16.0, 0, 32, 16], [0, 16, 16, 32]]))
    assert sample["box_valid"].tolist() == [True, True, False]
    assert torch.equal(sample["region_text"][0], tok(["a red block"])[0])
    assert torch.equal(sample["region_text"][1], tok(["black"])[0])  # label stands in for a missing caption
    assert sample["region_text"][2].abs().sum() == 0 and sample["boxes"][2].abs().sum() == 0
    assert sample["crops"].shape == (3, 3, 32, 32)
    assert sample["crops"][0, 0].mean() > 0.95 and sample["crops"][0, 1].mean() < 0.05  # the red block
    assert sample["crops"][1].abs().max() < 0.05  # the black quarter
    assert sample["image"][0, :16, 16:].mean() > 0.95  # red block lands where the box says


def test_enlarge_box_about_centre():
    assert enlarge_box((10, 10, 20, 30), 1.5) == (7.5, 5.0, 22.5, 35.0)


def test_missing_caption_is_an_error_naming_the_record():
    image, _ = image_and_record()
    with pytest.raises(ValueError, match="rec.jsonl:3: field 'captions' is empty"):
        builder(SampleSpec())(image, Record("x.png", (), (), key="rec.jsonl:3"), 0)


def test_rank_slices_make_up_the_single_process_batch():
    single = iter(ResumableBatchSampler(40, 8, seed=1))
    ranks = [iter(ResumableBatchSampler(40, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
        assert next(single) == next(ranks[0]) + next(ranks[1])
    resumed = iter(ResumableBatchSampler(40, 8, seed=1, start_batch=7))
    assert next(resumed) == next(single)


def test_collate_stacks_and_gathers_bad_records():
    batch = collate([{"x": torch.zeros(2), "bad_records": ["a"]}, {"x": torch.ones(2), "bad_records": []}])
    assert batch["x"].shape == (2, 2) and batch["bad_records"] == ["a"]
