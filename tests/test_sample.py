import pickle

import open_clip
import pytest
import torch
from PIL import Image

from finegrain.data.augment import list_augmentations, resize
from finegrain.data.collate import collate
from finegrain.data.dataset import ResumableBatchSampler
from finegrain.data.records import Record, RecordError, Region
from finegrain.data.sample import SampleBuilder, crop_box, enlarge_box, seeded_cpu_rng
from finegrain.models import get_tokenizer
from finegrain.sample_spec import SampleSpec
from finegrain.train.trainer import BatchToDevice

TOKENIZER = get_tokenizer("finegrain-test")


def image_and_record():
    image = Image.new("RGB", (80, 40), (0, 0, 0))
    image.paste((255, 0, 0), (40, 0, 80, 20))  # red block in the top-right quarter
    record = Record("x.png", ("a red block", "a block"),
                    (Region((40, 0, 80, 20), caption="a red block"), Region((0, 20, 40, 40), label="black")))
    return image, record


def builder(spec, size=(32, 32)):
    return SampleBuilder(spec, size, TOKENIZER)


def test_two_views_are_seeded_augmentations_under_one_image_key():
    _, record = image_and_record()
    image = Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy())  # square: open_clip crops vary
    build = builder(SampleSpec(views=2))
    a, b = build(image, record, seed=5), build(image, record, seed=5)
    assert a["image"].shape == (2, 3, 32, 32) and a["image"].dtype == torch.uint8
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    assert not torch.equal(a["image"][0], a["image"][1])
    assert not torch.equal(a["image"][0], build(image, record, seed=6)["image"][0])


def test_seeded_cpu_rng_draws_as_manual_seed_then_restores_the_callers_stream():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded_cpu_rng(7):
        inside = torch.rand(4)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(inside, torch.rand(4))  # the stream torch.manual_seed(7) gives
    assert torch.equal(after, expected_next)  # the caller's stream goes on as if nothing happened


def test_uint8_image_normalised_on_device_equals_open_clip_transform():
    """The loader carries uint8; BatchToDevice's normalisation gives open_clip's float tensor."""
    image = Image.fromarray((torch.rand(48, 64, 3) * 255).byte().numpy())
    spec = SampleSpec(augment="none", resize_mode="shortest_crop")
    sample = builder(spec)(image, Record("x.png", ("c",)), 0)
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    reference = open_clip.image_transform((32, 32), is_train=False, mean=mean, std=std)(image)
    on_device = BatchToDevice(torch.device("cpu"), mean, std)(collate([sample]))["image"][0]
    torch.testing.assert_close(on_device, reference, atol=1e-5, rtol=1e-5)


def test_regions_boxes_flags_and_only_valid_crops():
    image, record = image_and_record()
    spec = SampleSpec(augment="none", regions=True, region_crops=True, max_regions=3, crop_scale=1.0,
                      label_as_region_text=True)
    sample = builder(spec)(image, record, 0)
    assert sample["image"].shape == (3, 32, 32)
    # squash resize 80x40 -> 32x32: x scales by 0.4, y by 0.8
    torch.testing.assert_close(sample["boxes"][:2], torch.tensor([[16.0, 0, 32, 16], [0, 16, 16, 32]]))
    assert sample["box_valid"].tolist() == [True, True, False]
    assert sample["region_text_valid"].tolist() == [True, True, False]
    assert torch.equal(sample["region_text"][0], TOKENIZER(["a red block"])[0])
    assert torch.equal(sample["region_text"][1], TOKENIZER(["black"])[0])  # label stands in for a caption
    assert sample["region_text"][2].abs().sum() == 0 and sample["boxes"][2].abs().sum() == 0
    assert sample["crops"].shape == (2, 3, 32, 32) and sample["crops"].dtype == torch.uint8  # valid only
    assert (sample["crops"][0, 0] > 240).all() and (sample["crops"][0, 1] < 15).all()  # the red block
    assert sample["crops"][1].max() < 15  # the black quarter
    assert (sample["image"][0, :15, 17:] > 240).all()  # red block lands where the box says
    batch = collate([sample, builder(spec)(image, Record("y.png", ("c",)), 1)])
    assert batch["crops"].shape == (2, 3, 32, 32) and batch["box_valid"].sum() == 2


def test_box_without_caption_is_flagged_and_never_gets_tokens():
    image, _ = image_and_record()
    record = Record("x.png", ("c",), (Region((0, 0, 40, 20)), Region((0, 0, 10, 10), label="dog")))
    sample = builder(SampleSpec(augment="none", regions=True, max_regions=3))(image, record, 0)
    assert sample["box_valid"].tolist() == [True, True, False]
    assert sample["region_text_valid"].tolist() == [False, False, False]  # a label is no caption by default
    assert sample["region_text"].abs().sum() == 0


def test_malformed_regions_a_record_dropped_travel_with_its_sample_for_counting(tmp_path):
    from finegrain.data.dataset import RecordDataset

    image, record = image_and_record()
    record = Record(record.image, record.captions, record.regions, bad_regions=("x.jsonl:3: regions[2] reversed",))
    sample = builder(SampleSpec(augment="none", regions=True, max_regions=3))(image, record, 0)
    assert sample["box_valid"].tolist() == [True, True, False]  # the good regions are used
    assert collate([sample, sample])["bad_regions"] == ["x.jsonl:3: regions[2] reversed"] * 2
    image.save(tmp_path / "x.png")
    strict = RecordDataset([record], tmp_path, builder(SampleSpec(augment="none", regions=True)), strict=True)
    with pytest.raises(RecordError, match=r"x.jsonl:3: regions\[2\] reversed"):
        strict[(0, 0)]


def test_crops_crossing_the_border_are_clipped_not_padded_black():
    image = Image.new("RGB", (40, 40), (200, 200, 200))
    crop = crop_box(image, (30, 30, 40, 40), scale=1.5)  # enlarged to 27.5..42.5: clipped at 40
    assert crop.size == (13, 13) and crop.getextrema() == ((200, 200),) * 3


def test_boxes_outside_are_clipped_or_dropped_and_counted():
    image, _ = image_and_record()
    record = Record("x.png", ("c",), (Region((60, 10, 100, 30), caption="half out"),
                                      Region((90, 0, 120, 10), caption="outside")))
    sample = builder(SampleSpec(augment="none", regions=True, max_regions=2))(image, record, 0)
    assert (sample["boxes_clipped"], sample["boxes_dropped"]) == (1, 1)
    torch.testing.assert_close(sample["boxes"][0], torch.tensor([60 * 0.4, 8.0, 32.0, 24.0]))
    assert sample["box_valid"].tolist() == [True, False]
    assert collate([sample, sample])["boxes_dropped"] == 2


def test_box_size_filter_keeps_boxes_between_the_sizes():
    image, record = image_and_record()  # boxes 40x20 (area 800) and 40x20
    spec = SampleSpec(augment="none", regions=True, max_regions=2, min_box_size=30)  # 30^2 = 900 > 800
    assert builder(spec)(image, record, 0)["box_valid"].sum() == 0
    spec = SampleSpec(augment="none", regions=True, max_regions=2, max_box_size=29)  # 841 > 800: kept
    assert builder(spec)(image, record, 0)["box_valid"].sum() == 2


def test_longest_pad_keeps_aspect_and_maps_boxes():
    image, record = image_and_record()  # 80x40 -> 32x16 at the top, zero padding below
    spec = SampleSpec(augment="none", resize_mode="longest_pad", regions=True, max_regions=2)
    sample = builder(spec)(image, record, 0)
    torch.testing.assert_close(sample["boxes"][0], torch.tensor([16.0, 0, 32, 8]))
    assert sample["image"][:, 16:].max() == 0 and (sample["image"][0, :7, 17:] > 240).all()
    assert resize(image, (16, 16), "longest_pad").shape == (3, 16, 16)


def test_training_and_crop_sizes_apart_from_the_model():
    image, record = image_and_record()
    spec = SampleSpec(augment="none", image_size=(48, 64), regions=True, region_crops=True, crop_size=(24, 24))
    sample = builder(spec)(image, record, 0)
    assert sample["image"].shape == (3, 48, 64) and sample["crops"].shape[1:] == (3, 24, 24)


def test_caption_modes():
    image, _ = image_and_record()
    bare = Record("x.png", (), ())
    optional = builder(SampleSpec(caption="optional"))(image, bare, 0)
    assert optional["text_valid"].item() is False and optional["text"].abs().sum() == 0
    assert "text" not in builder(SampleSpec(caption="none"))(image, bare, 0)
    with pytest.raises(RecordError, match="rec.jsonl:3: field 'captions' is empty"):
        builder(SampleSpec())(image, Record("x.png", (), (), key="rec.jsonl:3"), 0)


def test_centre_crop_moves_boxes_and_a_recipe_without_geometry_is_refused_for_regions(monkeypatch):
    from finegrain.data import augment

    image, record = image_and_record()  # 80x40 -> 64x32, centre crop from x = 16
    sample = builder(SampleSpec(augment="none", resize_mode="shortest_crop", regions=True, max_regions=2))(image,
                                                                                                          record, 0)
    torch.testing.assert_close(sample["boxes"], torch.tensor([[16.0, 0, 32, 16], [0, 16, 16, 32]]))
    assert (sample["image"][0, :15, 17:] > 240).all() and sample["image"][0, :, :15].max() < 15
    monkeypatch.setitem(augment._RECIPES, "pixels_only", lambda size, mode: augment.OpenCLIPTrain(size, mode).__call__)
    assert builder(SampleSpec(augment="pixels_only"))(image, record, 0)["image"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="augmentation 'pixels_only' does not say where it puts the pixels"):
        builder(SampleSpec(augment="pixels_only", regions=True))


def test_enlarge_box_about_centre():
    assert enlarge_box((10, 10, 20, 30), 1.5) == (7.5, 5.0, 22.5, 35.0)


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


@pytest.mark.parametrize("recipe", list_augmentations())
def test_sample_builder_pickles_for_spawned_loader_workers(recipe):
    """Loader workers started with spawn / forkserver (macOS, Windows, Python >= 3.14) get the builder pickled."""
    image, record = image_and_record()
    build = builder(SampleSpec(augment=recipe))
    clone = pickle.loads(pickle.dumps(build))
    assert torch.equal(clone(image, record, 3)["image"], build(image, record, 3)["image"])


def test_draft_size_leaves_the_smallest_crop_its_resolution():
    """open_clip's crops keep >= 0.9 of the area: decoding may go down to size / sqrt(0.9), not to size."""
    assert builder(SampleSpec(), size=(224, 224)).draft_size == (237, 237)
    assert builder(SampleSpec(augment="none"), size=(224, 224)).draft_size == (224, 224)
    spec = SampleSpec(augment="none", regions=True, region_crops=True)
    assert builder(spec).draft_size is None  # crops of small boxes need the full resolution
