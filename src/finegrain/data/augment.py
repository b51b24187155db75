"""Named image recipes for training samples: PIL image -> uint8 tensor ``(3, H, W)``.

A recipe is registered under a name (:func:`register_augmentation`) and picked by
``SampleSpec.augment``; ``"open_clip"`` is open_clip's training augmentation and ``"none"`` only resizes
(per ``SampleSpec.resize_mode``). A method with its own views (e.g. DetailCLIP's two-view recipe) adds a
recipe here. Recipes draw randomness from torch's global generator, which the sample builder seeds per
sample, so a sample stays a pure function of (record, seed). A :class:`GeometricRecipe` also says where
each view put the image's pixels (a :class:`~finegrain.data.geometry.Geometry`), so region boxes follow
the view; region samples need such a recipe.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import open_clip
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..errors import DataError
from .geometry import Geometry

# A recipe: a picklable callable PIL image -> uint8 tensor (3, H, W) (loader workers may be spawned), with a
# ``draft_size`` attribute: the smallest (H, W) a JPEG may be decoded at for it (None: full resolution).
Recipe = Callable[[Image.Image], torch.Tensor]
_RECIPES: dict[str, Callable[[tuple[int, int], str], Recipe]] = {}


def register_augmentation(name: str):
    """Decorator: register ``factory(size, resize_mode) -> recipe`` (e.g. a class) under ``name``."""

    def wrap(factory):
        if name in _RECIPES:
            raise ValueError(f"augmentation {name!r} is registered twice")
        _RECIPES[name] = factory
        return factory

    return wrap


def list_augmentations() -> list[str]:
    return sorted(_RECIPES)


def build_augmentation(name: str, size: tuple[int, int], resize_mode: str = "squash") -> Recipe:
    if name not in _RECIPES:
        raise DataError(f"unknown augmentation {name!r}; registered: {list_augmentations()}")
    return _RECIPES[name](tuple(size), resize_mode)


def resize_geometry(image_wh: tuple[int, int], size: tuple[int, int], mode: str) -> tuple[int, int, float, float]:
    """Where ``resize`` puts an image: ``(new_w, new_h, sx, sy)``, pixel ``(x, y)`` going to ``(x*sx, y*sy)``
    (before the centre crop of ``shortest_crop``, which :func:`resize` applies after)."""
    (w, h), (out_h, out_w) = image_wh, size
    if mode == "squash":
        return out_w, out_h, out_w / w, out_h / h
    if mode == "longest_pad":  # as open_clip's ResizeLongest: round
        scale = min(out_w / w, out_h / h)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    else:  # as torchvision's Resize(int): the shorter side fits, the longer one is truncated
        scale = max(out_w / w, out_h / h)
        new_w, new_h = (out_w, int(h * scale)) if out_w / w >= out_h / h else (int(w * scale), out_h)
    return new_w, new_h, new_w / w, new_h / h


def resize_view_geometry(image_wh: tuple[int, int], size: tuple[int, int], mode: str) -> Geometry:
    """Where :func:`resize` puts the pixels of an image of ``image_wh`` (``shortest_crop``'s centre crop
    included, at torchvision's rounding)."""
    new_w, new_h, sx, sy = resize_geometry(image_wh, size, mode)
    out_h, out_w = size
    left, top = (round((new_w - out_w) / 2), round((new_h - out_h) / 2)) if mode == "shortest_crop" else (0, 0)
    return Geometry(sx, sy, float(left), float(top), out_w, out_h)


def resize(image: Image.Image, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize to ``size`` ``(H, W)`` (bicubic) -> uint8 ``(3, H, W)``.

    ``squash``: both sides to size (aspect not kept). ``longest_pad``: aspect kept, the longer side fits,
    zero padding right and bottom (pixel coordinates only scale). ``shortest_crop``: the shorter side fits,
    centre crop (open_clip's evaluation transform).
    """
    new_w, new_h, _, _ = resize_geometry(image.size, size, mode)
    pixels = TF.pil_to_tensor(image.resize((new_w, new_h), Image.BICUBIC))
    if mode == "squash":
        return pixels
    out_h, out_w = size
    if mode == "longest_pad":
        out = pixels.new_zeros(3, out_h, out_w)
        out[:, :new_h, :new_w] = pixels
        return out
    return TF.center_crop(pixels, [out_h, out_w])


class GeometricRecipe:
    """A recipe that knows where it puts the image's pixels: :meth:`view` gives the view and its geometry
    (image pixels -> view pixels); calling the recipe gives the view alone, from the same random draws."""

    def view(self, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
        raise NotImplementedError

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.view(image)[0]


def random_resized_crop(crop: T.RandomResizedCrop, image: Image.Image) -> tuple[Image.Image, Geometry]:
    """``crop(image)``, drawing the same random numbers, and where it put the image's pixels."""
    top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)
    out = TF.resized_crop(image, top, left, height, width, crop.size, crop.interpolation, antialias=crop.antialias)
    return out, Geometry.crop_resize((left, top, left + width, top + height), tuple(crop.size))


@register_augmentation("none")
class ResizeOnly(GeometricRecipe):
    """:func:`resize` to ``size`` per ``resize_mode``; a JPEG may be decoded down to ``size``."""

    def __init__(self, size: tuple[int, int], resize_mode: str):
        self.size, self.resize_mode = tuple(size), resize_mode
        self.draft_size = self.size

    def view(self, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
        return (resize(image, self.size, self.resize_mode),
                resize_view_geometry(image.size, self.size, self.resize_mode))


@register_augmentation("open_clip")
class OpenCLIPTrain(GeometricRecipe):
    """open_clip's training transform (``image_transform(size, is_train=True)``: a random resized crop of
    0.9-1 of the area, then a conversion to RGB) without its tensor conversion and normalisation, which
    happen on the device. A JPEG may be decoded down to the size at which the smallest crop still covers
    ``size``."""

    MIN_SCALE = 0.9  # open_clip's RandomResizedCrop scale floor

    def __init__(self, size: tuple[int, int], resize_mode: str):
        self.geometric = [t for t in open_clip.image_transform(size, is_train=True).transforms
                          if type(t).__name__ not in ("MaybeToTensor", "ToTensor", "Normalize")]
        self.draft_size = tuple(math.ceil(side / math.sqrt(self.MIN_SCALE)) for side in size)

    def view(self, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
        geometry = Geometry.identity(*image.size)
        for transform in self.geometric:
            if isinstance(transform, T.RandomResizedCrop):
                image, step = random_resized_crop(transform, image)
                geometry = geometry.then(step)
            else:  # the conversion to RGB: no pixel moves
                image = transform(image)
        return TF.pil_to_tensor(image), geometry


class GaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from ``sigma`` (SimCLR's, as DetailCLIP's
    ``utils.GaussianBlur``; the radius is drawn from torch's generator so the sample seed covers it)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = torch.empty(()).uniform_(*self.sigma).item()
        return image.filter(ImageFilter.GaussianBlur(radius=radius))


@register_augmentation("detailclip")
class DetailCLIPTrain(GeometricRecipe):
    """DetailCLIP's view recipe (A-CLIP's, without the zoom-out crop): a random resized crop of 0.14-1 of
    the area (bicubic, no flip), then, each with its probability, colour jitter (0.4, 0.4, 0.2, 0.1),
    grayscale, Gaussian blur (sigma ~ U[0.1, 2]) and solarize (threshold 128). Normalisation happens on
    the device. ``photometric`` holds ``(probability, op)`` pairs applied in order; a JPEG may be decoded
    down to the size at which the smallest crop still covers ``size``."""

    MIN_SCALE = 0.14

    def __init__(self, size: tuple[int, int], resize_mode: str):
        self.crop = T.RandomResizedCrop(size, (self.MIN_SCALE, 1.0), interpolation=T.InterpolationMode.BICUBIC)
        self.photometric = [(0.8, T.ColorJitter(0.4, 0.4, 0.2, 0.1)), (0.2, T.Grayscale(num_output_channels=3)),
                            (0.1, GaussianBlur((0.1, 2.0))), (0.2, ImageOps.solarize)]
        self.draft_size = tuple(math.ceil(side / math.sqrt(self.MIN_SCALE)) for side in size)

    def view(self, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
        image, geometry = random_resized_crop(self.crop, image)
        for probability, op in self.photometric:
            if torch.rand(()) < probability:
                image = op(image)
        return TF.pil_to_tensor(image), geometry
