"""Real photographs shipped with scikit-image, with labels, captions and segments written for these tests.

Each photo has an image-level class, two captions, and segments painted in order onto a label map (later
segments cover earlier ones; pixels no segment covers are unlabelled). A segment is a rectangle or the
ellipse inscribed in its box, roughly over the object it names. Test modules turn these into each dataset
format (COCO panoptic, segmentation folders, ImageFolder, retrieval lists).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class Segment:
    category: str
    isthing: bool
    shape: str  # "rect" or "ellipse" (inscribed in box)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


@dataclass(frozen=True)
class Photo:
    label: str
    captions: tuple[str, str]
    segments: tuple[Segment, ...]


PHOTOS: dict[str, Photo] = {
    "astronaut": Photo("person", ("an astronaut in an orange suit smiling", "a woman in a space suit with a flag"),
                       (Segment("wall", False, "rect", (0, 0, 512, 512)),
                        Segment("person", True, "ellipse", (20, 15, 365, 512)),
                        Segment("rocket", True, "rect", (360, 0, 450, 280)))),
    "coffee": Photo("cup", ("a cup of coffee on a saucer", "an espresso cup with a spoon on a wooden table"),
                    (Segment("table", False, "rect", (0, 0, 600, 400)),
                     Segment("cup", True, "ellipse", (170, 15, 415, 300)),
                     Segment("spoon", True, "rect", (320, 200, 410, 325)))),
    "chelsea": Photo("cat", ("a tabby cat looking at the camera", "the face of a striped cat"),
                     (Segment("wall", False, "rect", (0, 0, 120, 300)),
                      Segment("cat", True, "ellipse", (60, 0, 451, 300)))),
    "rocket": Photo("rocket", ("a rocket on a launch pad at dusk", "a white rocket between launch towers"),
                    (Segment("sky", False, "rect", (0, 0, 640, 260)),
                     Segment("ground", False, "rect", (0, 380, 640, 427)),
                     Segment("rocket", True, "rect", (300, 125, 345, 420)))),
}

CATEGORIES: tuple[str, ...] = tuple(sorted({s.category for p in PHOTOS.values() for s in p.segments}))


def photo(name: str) -> Image.Image:
    """The RGB photograph ``name`` (a key of ``PHOTOS``)."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def segment_map(name: str) -> np.ndarray:
    """``(H, W)`` int32: 1 + the index of the segment of ``PHOTOS[name]`` that covers each pixel, 0 where
    none does."""
    width, height = photo(name).size
    canvas = Image.new("I", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for i, segment in enumerate(PHOTOS[name].segments, start=1):
        x0, y0, x1, y1 = segment.box
        shape = draw.ellipse if segment.shape == "ellipse" else draw.rectangle
        shape((x0, y0, x1 - 1, y1 - 1), fill=i)
    return np.asarray(canvas, dtype=np.int32)


def category_map(name: str, categories: tuple[str, ...] = CATEGORIES, unlabelled: int = 255) -> np.ndarray:
    """``(H, W)`` uint8 semantic label map: the index in ``categories`` of each pixel's segment category,
    ``unlabelled`` where no segment covers it."""
    segments = PHOTOS[name].segments
    lookup = np.array([unlabelled, *(categories.index(s.category) for s in segments)], dtype=np.uint8)
    return lookup[segment_map(name)]
