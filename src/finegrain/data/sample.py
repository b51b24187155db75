"""Turn one record and its image into the tensors a method asked for (its :class:`SampleSpec`)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import open_clip
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from .records import Record


@dataclass(frozen=True)
class SampleSpec:
    """What a training sample carries. Keys produced (per sample; the collate adds the batch dim):

    - ``image`` ``(3, H, W)`` when ``views == 1``, else ``views`` ``(V, 3, H, W)``
    - ``text`` ``(L,)`` token ids of one caption (chosen at random among the record's captions)
    - with ``regions``: ``boxes`` ``(M, 4)`` xyxy in image-tensor pixels, ``box_valid`` ``(M,)`` bool,
      ``region_text`` ``(M, L)``; with ``region_crops``: ``crops`` ``(M, 3, H, W)``. M = ``max_regions``
      (static shape; padding rows are invalid).
    Region samples use a squash resize (no random crop) so that boxes stay exact.
    """

    views: int = 1
    augment: bool = True  # open_clip's training augmentation for the view(s)
    regions: bool = False
    region_crops: bool = False
    max_regions: int = 20
    crop_scale: float = 1.5  # crops are boxes enlarged by this factor (about their centre)


class SampleBuilder:
    """Callable ``(image, record, seed) -> dict of tensors`` for one :class:`SampleSpec`.

    All randomness (augmentation, caption choice, region subset) comes from ``seed``, so a sample is a
    pure function of (record, seed): resuming a run reproduces the same batches.
    """

    def __init__(self, spec: SampleSpec, image_size: tuple[int, int], mean, std, tokenizer, train: bool = True):
        self.spec = spec
        self.image_size = tuple(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.tokenizer = tokenizer
        augment = train and spec.augment and not spec.regions
        self.view_transform = open_clip.image_transform(self.image_size, is_train=augment, mean=mean, std=std)

    def _squash(self, image: Image.Image) -> torch.Tensor:
        image = image.resize(self.image_size[::-1], Image.BICUBIC)
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def __call__(self, image: Image.Image, record: Record, seed: int) -> dict[str, torch.Tensor]:
        rng = random.Random(seed)
        if not record.captions:
            raise ValueError(f"{record.key or record.image}: field 'captions' is empty")
        sample = {"text": self.tokenizer([rng.choice(record.captions)])[0]}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if self.spec.regions:
                views = [self._squash(image) for _ in range(self.spec.views)]
            else:
                views = [self.view_transform(image) for _ in range(self.spec.views)]
        if self.spec.views == 1:
            sample["image"] = views[0]
        else:
            sample["views"] = torch.stack(views)
        if self.spec.regions:
            sample.update(self._regions(image, record, rng))
        return sample

    def _regions(self, image: Image.Image, record: Record, rng: random.Random) -> dict[str, torch.Tensor]:
        spec, (h, w) = self.spec, self.image_size
        regions = list(record.regions)
        if len(regions) > spec.max_regions:
            regions = rng.sample(regions, spec.max_regions)
        m, length = spec.max_regions, self.tokenizer([""]).shape[1]
        boxes = torch.zeros(m, 4)
        valid = torch.zeros(m, dtype=torch.bool)
        texts = torch.zeros(m, length, dtype=torch.long)
        crops = torch.zeros(m, 3, h, w) if spec.region_crops else None
        sx, sy = w / image.width, h / image.height
        for i, region in enumerate(regions):
            x0, y0, x1, y1 = region.box
            boxes[i] = torch.tensor([x0 * sx, y0 * sy, x1 * sx, y1 * sy])
            valid[i] = True
            caption = region.caption or region.label
            if caption:
                texts[i] = self.tokenizer([caption])[0]
            if crops is not None:
                crops[i] = self._squash(image.crop(enlarge_box(region.box, spec.crop_scale)))
        out = {"boxes": boxes, "box_valid": valid, "region_text": texts}
        if crops is not None:
            out["crops"] = crops
        return out


def enlarge_box(box: tuple[float, float, float, float], scale: float) -> tuple[float, float, float, float]:
    """Scale a ``xyxy`` box about its centre (pixels outside the image are padded black by ``crop``)."""
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * scale / 2, (y1 - y0) * scale / 2
    return cx - hw, cy - hh, cx + hw, cy + hh
