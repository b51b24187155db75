"""Boxes follow every view's crop, resize and flip: Geometry by hand, hand-made and shipped recipes through the
real SampleBuilder and collate."""

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from finegrain.data import augment
from finegrain.data.augment import GeometricRecipe, build_augmentation
from finegrain.data.collate import collate
from finegrain.data.geometry import Geometry
from finegrain.data.records import Record, Region
from finegrain.data.sample import SampleBuilder, seeded_cpu_rng
from finegrain.models import get_tokenizer
from finegrain.sample_spec import SampleSpec

TOKENIZER = get_tokenizer("finegrain-test")
CROP = (20, 10, 60, 50)  # the hand-made recipe's crop of the 80x60 image, resized to 20x20: scale 0.5
INSIDE, CUT, OUTSIDE = (25, 15, 45, 35), (50, 40, 80, 60), (0, 0, 15, 8)


def test_crop_resize_then_flip_maps_boxes_to_hand_computed_coordinates_and_drops_those_outside():
    geometry = Geometry.crop_resize(CROP, (20, 20)).then(Geometry(1.0, 1.0, 0.0, 0.0, 20, 20, flip=True))
    boxes, kept, clipped = geometry.map_boxes(torch.tensor([INSIDE, CUT, OUTSIDE], dtype=torch.float32))
    # INSIDE: (5, 5, 25, 25) in the crop, x 0.5 -> (2.5, 2.5, 12.5, 12.5), mirrored in 20 -> (7.5, 2.5, 17.5, 12.5)
    # CUT: (30, 30, 50, 40) -> (15, 15, 25, 20) -> clipped (15, 15, 20, 20) -> mirrored (0, 15, 5, 20)
    torch.testing.assert_close(boxes[:2], torch.tensor([[7.5, 2.5, 17.5, 12.5], [0.0, 15, 5, 20]]))
    assert kept.tolist() == [True, True, False] and clipped.tolist() == [False, True, False]


class CropFlip(GeometricRecipe):
    """A hand-made view: the fixed CROP resized to 20x20, mirrored with probability 1/2 (torch's generator)."""

    def __init__(self, size, resize_mode):
        self.size = tuple(size)

    def view(self, image):
        geometry = Geometry.crop_resize(CROP, self.size)
        out = TF.resize(TF.pil_to_tensor(image.crop(CROP)), list(self.size), antialias=True)
        if torch.rand(()) < 0.5:
            out, geometry = out.flip(-1), geometry.then(Geometry(1.0, 1.0, 0.0, 0.0, *self.size[::-1], flip=True))
        return out, geometry


@pytest.fixture
def crop_flip(monkeypatch):
    monkeypatch.setitem(augment._RECIPES, "crop_flip", CropFlip)


def scene() -> tuple[Image.Image, Record]:
    image = Image.new("RGB", (80, 60), (0, 0, 0))
    image.paste((255, 0, 0), INSIDE)
    regions = tuple(Region(box, caption=name) for box, name in ((INSIDE, "red"), (CUT, "cut"), (OUTSIDE, "out")))
    return image, Record("x.png", ("a red square",), regions)


def test_regions_on_two_augmented_views_get_per_view_boxes_through_builder_and_collate(crop_flip):
    image, record = scene()
    build = SampleBuilder(SampleSpec(augment="crop_flip", views=2, regions=True, max_regions=4), (20, 20), TOKENIZER)
    seed = next(s for s in range(100) if _flips(s) == [False, True])
    sample = build(image, record, seed)
    assert sample["image"].shape == (2, 3, 20, 20)
    assert sample["boxes"].shape == (2, 4, 4) and sample["box_valid"].shape == (2, 4)
    torch.testing.assert_close(sample["boxes"][0, :2], torch.tensor([[2.5, 2.5, 12.5, 12.5], [15.0, 15, 20, 20]]))
    torch.testing.assert_close(sample["boxes"][1, :2], torch.tensor([[7.5, 2.5, 17.5, 12.5], [0.0, 15, 5, 20]]))
    assert sample["box_valid"].tolist() == [[True, True, False, False]] * 2  # OUTSIDE: in neither view
    assert sample["region_text_valid"].tolist() == [True, True, True, False]  # texts are per region
    assert (sample["boxes_clipped"], sample["boxes_dropped"]) == (0, 2)  # OUTSIDE dropped in each view
    for view in range(2):  # the red square lies where each view's box says
        x0, y0, x1, y1 = sample["boxes"][view, 0].int().tolist()
        assert (sample["image"][view, 0, y0 + 1:y1 - 1, x0 + 1:x1 - 1] > 200).all()
    batch = collate([sample, build(image, record, seed + 1)])
    assert batch["boxes"].shape == (2, 2, 4, 4) and batch["box_valid"].shape == (2, 2, 4)
    assert batch["boxes_dropped"] == 4


def _flips(seed: int) -> list[bool]:
    with seeded_cpu_rng(seed):
        return [bool(torch.rand(()) < 0.5) for _ in range(2)]


def test_one_augmented_view_keeps_the_single_view_keys_and_crops_only_regions_it_keeps(crop_flip):
    image, record = scene()
    spec = SampleSpec(augment="crop_flip", regions=True, region_crops=True, max_regions=3, crop_size=(8, 8))
    sample = SampleBuilder(spec, (20, 20), TOKENIZER)(image, record, 0)
    assert sample["boxes"].shape == (3, 4) and sample["box_valid"].tolist() == [True, True, False]
    assert sample["crops"].shape == (2, 3, 8, 8) and sample["boxes_dropped"] == 1
    with pytest.raises(ValueError, match="region_crops needs views=1"):
        SampleSpec(augment="crop_flip", views=2, regions=True, region_crops=True)


@pytest.mark.parametrize("recipe", ["open_clip", "detailclip"])
def test_shipped_recipes_move_boxes_with_their_random_crops_and_draw_the_same_images(recipe):
    image = Image.new("RGB", (96, 64), (0, 0, 0))
    image.paste((255, 0, 0), (30, 20, 70, 50))
    record = Record("x.png", ("c",), (Region((30, 20, 70, 50), caption="red"), Region((0, 0, 6, 6), caption="corner")))
    spec = SampleSpec(augment=recipe, views=2, caption="optional", regions=True, max_regions=2)
    build = SampleBuilder(spec, (32, 32), TOKENIZER)
    plain = SampleBuilder(SampleSpec(augment=recipe, views=2, caption="optional"), (32, 32), TOKENIZER)
    if recipe == "detailclip":  # colours stay as they are, so the red block can be found
        build.recipe.photometric = plain.recipe.photometric = []
    valid = torch.zeros(2, dtype=torch.long)
    for seed in range(16):
        sample = build(image, record, seed)
        assert torch.equal(sample["image"], plain(image, record, seed)["image"])  # the same random draws
        assert sample["boxes"].shape == (2, 2, 4) and sample["box_valid"].shape == (2, 2)
        assert sample["boxes_dropped"] == int((~sample["box_valid"]).sum())
        valid += sample["box_valid"].sum(dim=0)
        for view, (x0, y0, x1, y1) in enumerate(sample["boxes"][:, 0].tolist()):
            if sample["box_valid"][view, 0] and min(x1 - x0, y1 - y0) >= 2:  # the red block is where the box says
                cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
                assert sample["image"][view, 0, cy, cx] > 150 and sample["image"][view, 1, cy, cx] < 100
            assert 0 <= x0 <= x1 <= 32 and 0 <= y0 <= y1 <= 32
    assert valid[0] > 0 and valid[1] > 0
    if recipe == "detailclip":  # crops down to 14% of the area leave the corner out of some views
        assert valid[1] < 32


def test_detailclip_view_is_torchvisions_random_resized_crop_of_the_same_draws():
    image = Image.fromarray((torch.rand(64, 96, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    recipe = build_augmentation("detailclip", (24, 24))
    recipe.photometric = []
    torch.manual_seed(4)
    out, geometry = recipe.view(image)
    torch.manual_seed(4)
    crop = T.RandomResizedCrop((24, 24), (0.14, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)
    torch.manual_seed(4)
    assert torch.equal(out, TF.pil_to_tensor(crop(image)))
    assert geometry == Geometry.crop_resize((left, top, left + width, top + height), (24, 24))
