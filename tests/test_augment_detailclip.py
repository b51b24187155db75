"""DetailCLIP's view recipe ("detailclip"): geometry, photometric probabilities, seeding, two-view samples."""

import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter, ImageOps

from finegrain.data.augment import DetailCLIPTrain, GaussianBlur, build_augmentation
from finegrain.data.records import Record
from finegrain.data.sample import SampleBuilder
from finegrain.models import get_tokenizer
from finegrain.sample_spec import SampleSpec


def ramp(width=120, height=80) -> Image.Image:
    """Grey levels increasing from left (0) to right (255): a mirrored crop has a darker right half."""
    row = torch.linspace(0, 255, width).round().byte()
    return Image.fromarray(row.expand(height, width).unsqueeze(-1).expand(-1, -1, 3).contiguous().numpy())


def noise(size=64, seed=0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())


class Counting:
    """Wraps an op and counts its calls."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, image):
        self.calls += 1
        return self.op(image)


def test_output_is_uint8_at_the_size_and_the_recipe_pickles():
    recipe = build_augmentation("detailclip", (24, 32))
    out = recipe(noise())
    assert out.shape == (3, 24, 32) and out.dtype == torch.uint8
    again = pickle.loads(pickle.dumps(recipe))
    torch.manual_seed(3)
    first = recipe(noise())
    torch.manual_seed(3)
    assert torch.equal(again(noise()), first)
    assert recipe.draft_size == (math.ceil(24 / math.sqrt(0.14)), math.ceil(32 / math.sqrt(0.14)))


def test_crops_are_never_mirrored():
    recipe = DetailCLIPTrain((16, 16), "squash")
    recipe.photometric = []  # geometry only: solarize would invert the bright half
    torch.manual_seed(0)
    for _ in range(200):
        out = recipe(ramp()).float()[0]
        assert (out[:, 8:].mean(dim=1) > out[:, :8].mean(dim=1)).all()


def test_each_photometric_op_is_applied_with_its_probability():
    recipe = DetailCLIPTrain((16, 16), "squash")
    counters = [Counting(op) for _, op in recipe.photometric]
    recipe.photometric = [(p, c) for (p, _), c in zip(recipe.photometric, counters)]
    torch.manual_seed(0)
    image, n = noise(24), 3000
    for _ in range(n):
        recipe(image)
    rates = [c.calls / n for c in counters]
    expected = [0.8, 0.2, 0.1, 0.2]  # jitter, grayscale, blur, solarize
    for rate, p in zip(rates, expected):
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (rates, expected)
    assert [type(c.op).__name__ for c in counters[:3]] == ["ColorJitter", "Grayscale", "GaussianBlur"]
    jitter = counters[0].op
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4),
                                                                                   (0.8, 1.2), (-0.1, 0.1))


def test_blur_radius_is_drawn_from_torch_in_range_and_solarize_inverts_from_128():
    image = noise(32)
    torch.manual_seed(7)
    radius = torch.empty(()).uniform_(0.1, 2.0).item()
    torch.manual_seed(7)
    blurred = GaussianBlur((0.1, 2.0))(image)
    assert 0.1 <= radius <= 2.0
    assert blurred.tobytes() == image.filter(ImageFilter.GaussianBlur(radius=radius)).tobytes()
    solarize = DetailCLIPTrain((16, 16), "squash").photometric[3][1]
    levels = Image.fromarray(torch.tensor([[[127] * 3, [128] * 3, [255] * 3]], dtype=torch.uint8).numpy())
    assert np.asarray(solarize(levels))[0, :, 0].tolist() == [127, 127, 0]
    assert solarize is ImageOps.solarize


@pytest.fixture(scope="module")
def two_view_builder():
    return SampleBuilder(SampleSpec(views=2, augment="detailclip"), (32, 32), get_tokenizer("finegrain-test"))


def test_sample_has_two_different_views_reproducible_from_the_seed(two_view_builder):
    record = Record("x.png", ("a caption",))
    a, b = two_view_builder(noise(), record, seed=5), two_view_builder(noise(), record, seed=5)
    assert a["image"].shape == (2, 3, 32, 32) and a["image"].dtype == torch.uint8
    assert torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"][0], a["image"][1])
    assert not torch.equal(a["image"], two_view_builder(noise(), record, seed=6)["image"])
    assert two_view_builder.draft_size == (86, 86)
