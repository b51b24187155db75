"""Turn one record and its image into the tensors a method asked for (its :class:`SampleSpec`)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image

from ..errors import DataError
from ..sample_spec import SampleSpec
from .augment import build_augmentation, resize
from .geometry import Geometry
from .images import original_size
from .records import Record, RecordError, Region, check_record_size, fit_boxes
from .text_cache import TextEmbeddingCache


def enlarge_box(box: tuple[float, float, float, float], scale: float) -> tuple[float, float, float, float]:
    """Scale a ``xyxy`` box about its centre."""
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    return cx - hw, cy - hh, cx + hw, cy + hh


CROP_ROUNDING = ("outward", "nearest")


def crop_box(image: Image.Image, box: tuple[float, float, float, float], scale: float = 1.0,
             rounding: str = "outward") -> Image.Image:
    """The ``xyxy`` box enlarged ``scale`` times about its centre, clipped to the image (never padded) and
    cut at whole pixels (at least 1x1): corners rounded ``outward`` (floor / ceil: the crop covers the box) or to
    the ``nearest`` pixel as PIL's ``Image.crop`` rounds float corners (Python's ``round``, halves to even),
    which is how the FineCLIP / CLIPSelf releases cut their evaluation crops."""
    if rounding not in CROP_ROUNDING:
        raise ValueError(f"rounding must be one of {CROP_ROUNDING}, got {rounding!r}")
    x0, y0, x1, y1 = enlarge_box(tuple(box), scale)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(image.width, x1), min(image.height, y1)
    low, high = (math.floor, math.ceil) if rounding == "outward" else (round, round)
    left, top = min(low(x0), image.width - 1), min(low(y0), image.height - 1)
    return image.crop((left, top, max(high(x1), left + 1), max(high(y1), top + 1)))


@contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded with ``seed`` (the augmentations draw from it), then
    restore its state. Only the CPU generator: ``torch.manual_seed`` also seeds every accelerator's
    generators, which costs more than augmenting a small image."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class SampleBuilder:
    """Callable ``(image, record, seed) -> dict of tensors`` for one :class:`SampleSpec` (training).

    All randomness (augmentation, caption choice, region subset) comes from ``seed``, so a sample is a
    pure function of (record, seed): resuming a run reproduces the same batches. ``draft_size`` tells the
    image loader how far a JPEG may be downscaled while decoding: the recipes' (what their smallest crops
    need), None when region crops need full resolution. With ``spec.text_cache``, texts become their
    cached embeddings (``text_embed``, ``region_text_embed``) instead of token ids.
    """

    def __init__(self, spec: SampleSpec, model_image_size: tuple[int, int], tokenizer):
        self.spec = spec
        self.image_size = tuple(spec.image_size or model_image_size)
        self.crop_size = tuple(spec.crop_size or self.image_size)
        self.tokenizer = tokenizer
        self.context_length = tokenizer([""]).shape[1]
        self.text_cache = TextEmbeddingCache(spec.text_cache) if spec.text_cache else None
        self.text_suffix = "" if self.text_cache is None else "_embed"
        self.recipe = build_augmentation(spec.augment, self.image_size, spec.resize_mode)
        if spec.regions and not hasattr(self.recipe, "view"):
            raise DataError(f"augmentation {spec.augment!r} does not say where it puts the pixels (a "
                            "GeometricRecipe's view): region samples need that to move their boxes")
        recipes = [self.recipe]
        if spec.augmented_views:
            self.view_recipe = build_augmentation(spec.view_augment, self.image_size, spec.resize_mode)
            recipes.append(self.view_recipe)
        drafts = [getattr(recipe, "draft_size", None) for recipe in recipes]
        self.draft_size = (None if spec.region_crops or None in drafts else
                           tuple(max(sides) for sides in zip(*drafts)))

    def __call__(self, image: Image.Image, record: Record, seed: int) -> dict[str, torch.Tensor]:
        spec, key = self.spec, record.key or record.image
        check_record_size(record, original_size(image))
        rng = random.Random(seed)
        sample: dict = {}
        if spec.caption != "none":
            if not record.captions and spec.caption == "required":
                raise RecordError(f"{key}: field 'captions' is empty")
            caption = rng.choice(record.captions) if record.captions else None
            sample["text" + self.text_suffix] = self._texts([caption])[0]
            if spec.caption == "optional":
                sample["text_valid"] = torch.tensor(caption is not None)
        with seeded_cpu_rng(seed):
            views = [self.recipe.view(image) if spec.regions else (self.recipe(image), None)
                     for _ in range(spec.views)]
            if spec.augmented_views:
                sample["views"] = torch.stack([self.view_recipe(image) for _ in range(spec.augmented_views)])
        sample["image"] = views[0][0] if spec.views == 1 else torch.stack([view for view, _ in views])
        if spec.regions:
            sample.update(self._regions(image, record, rng, key, [geometry for _, geometry in views]))
        return sample

    def _texts(self, texts: list[str | None]) -> torch.Tensor:
        """Token ids ``(K, L)``, or with a text cache float16 embeddings ``(K, D)``; zero rows for None."""
        present = [i for i, text in enumerate(texts) if text is not None]
        if self.text_cache is None:
            out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        else:
            out = torch.zeros(len(texts), self.text_cache.dim, dtype=torch.float16)
        if present:
            chosen = [texts[i] for i in present]
            out[present] = self.tokenizer(chosen) if self.text_cache is None else self.text_cache.lookup(chosen)
        return out

    def _regions(self, image: Image.Image, record: Record, rng: random.Random, key: str,
                 geometries: list[Geometry]) -> dict:
        """The region keys of a sample (see :class:`SampleSpec`); ``geometries``: where each view put the
        pixels of ``image`` (decoded, maybe drafted)."""
        spec = self.spec
        width, height = original_size(image)
        regions, clipped, dropped = fit_boxes(record.regions, width, height, key)
        regions = [r for r in regions if spec.min_box_size ** 2 <= _area(r) <= spec.max_box_size ** 2]
        if len(regions) > spec.max_regions:
            regions = rng.sample(regions, spec.max_regions)
        m, n = spec.max_regions, len(regions)
        to_image = (image.width / width, image.height / height)  # original -> decoded pixels (drafted JPEG)
        decoded = Geometry(*to_image, 0.0, 0.0, image.width, image.height)
        source = torch.tensor([r.box for r in regions], dtype=torch.float32).reshape(n, 4)
        boxes, box_valid = torch.zeros(len(geometries), m, 4), torch.zeros(len(geometries), m, dtype=torch.bool)
        for v, geometry in enumerate(geometries):  # a box cut by the view is clipped to it, one outside dropped
            boxes[v, :n], box_valid[v, :n], _ = decoded.then(geometry).map_boxes(source)
        dropped += int(n * len(geometries) - box_valid.sum())
        texts: list[str | None] = [None] * m
        text_valid = torch.zeros(m, dtype=torch.bool)
        for i, region in enumerate(regions):
            text = region.caption or (region.label if spec.label_as_region_text else None)
            if text:
                texts[i], text_valid[i] = text, True
        if spec.views == 1:
            boxes, box_valid = boxes[0], box_valid[0]
        out = {"boxes": boxes, "box_valid": box_valid,
               "region_text" + self.text_suffix: self._texts(texts), "region_text_valid": text_valid,
               "boxes_clipped": clipped, "boxes_dropped": dropped, "bad_regions": list(record.bad_regions)}
        if spec.region_crops:  # cut from the decoded image, for the regions the (single) view keeps
            crops = []
            for region, valid in zip(regions, box_valid):
                if valid:
                    x0, y0, x1, y1 = region.box
                    box = (x0 * to_image[0], y0 * to_image[1], x1 * to_image[0], y1 * to_image[1])
                    crops.append(resize(crop_box(image, box, spec.crop_scale), self.crop_size, spec.resize_mode))
            out["crops"] = (torch.stack(crops) if crops else
                            torch.zeros(0, 3, *self.crop_size, dtype=torch.uint8))
        return out


def _area(region: Region) -> float:
    x0, y0, x1, y1 = region.box
    return (x1 - x0) * (y1 - y0)
