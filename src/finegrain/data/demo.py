"""The built-in demo dataset: coloured shapes on textured backgrounds, made locally and deterministically.

Each 64x64 RGB PNG holds 1 to 3 non-overlapping shapes (circle, square, triangle, star) in one of six
saturated colours, small (14-20 px) or large (24-32 px), on a muted striped, checkered, dotted or
gradient background. Captions name every shape (size, colour, kind, left to right) and the background,
so a tiny CLIP learns the task in minutes; each shape is a region with its tight box, a caption
("a large red triangle") and a label ("red triangle", one of the 24 :data:`DEMO_CLASSES`).

Each image also has a semantic label map (a PNG of class indices into :data:`SEGMENTATION_CLASSES`: the 24
shape classes, then the 4 backgrounds as "stuff"), so the dense protocols (open-vocabulary segmentation,
linear probe, fine-tuning) run on the demo data too; records name it (``label_map``) and give each shape's
mask (``mask``, COCO RLE) for instance segmentation.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from finegrain.data.records import Record, Region, write_jsonl

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
    "yellow": (240, 220, 20), "purple": (150, 40, 190), "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS = ("striped", "checkered", "dotted", "gradient")
SIZES = {"small": (14, 20), "large": (24, 32)}
DEMO_CLASSES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
SEGMENTATION_CLASSES: list[str] = [*DEMO_CLASSES, *(f"{kind} background" for kind in BACKGROUNDS)]
SOURCE = {"proposer": "demo:ground-truth", "captioner": "demo:template"}
_NUMBERS = ("one shape", "two shapes", "three shapes")
_GAP = 2  # pixels kept free between shape boxes (stricter than IoU 0, so shapes never touch)


def _muted_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two low-saturation colours of clearly different brightness, each ``(3,)`` float."""
    level = rng.uniform(70, 130)
    tint = rng.uniform(-12, 12, size=3)
    return level + tint, level + rng.uniform(40, 70) + tint


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A ``(64, 64, 3)`` uint8 texture with light pixel noise."""
    a, b = _muted_pair(rng)
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if kind == "striped":
        period = int(rng.integers(6, 13))
        coord = (xs, ys, xs + ys)[int(rng.integers(3))]
        t = ((coord // (period // 2)) % 2).astype(float)
    elif kind == "checkered":
        cell = int(rng.integers(5, 11))
        t = (((xs // cell) + (ys // cell)) % 2).astype(float)
    elif kind == "dotted":
        spacing, radius = int(rng.integers(7, 11)), rng.uniform(1.2, 2.2)
        dx, dy = xs % spacing - spacing / 2, ys % spacing - spacing / 2
        t = (dx * dx + dy * dy <= radius * radius).astype(float)
    else:  # gradient
        angle = rng.uniform(0, 2 * np.pi)
        proj = (xs - IMAGE_SIZE / 2) * np.cos(angle) + (ys - IMAGE_SIZE / 2) * np.sin(angle)
        t = (proj - proj.min()) / (proj.max() - proj.min())
    image = a + t[..., None] * (b - a) + rng.normal(0, 4, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, size: int) -> None:
    """Draw ``shape`` filling the ``size`` x ``size`` square at ``(x0, y0)`` on a mask."""
    x1, y1 = x0 + size - 1, y0 + size - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        inset = size // 10  # a little smaller than the circle, so both look the same size
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=255)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=255)
    else:  # star: five points, inner radius 0.45 of the outer one
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (size - 1) / 2
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=255)


def _place(rng: np.random.Generator, size: int, boxes: list[tuple[int, int, int, int]]) -> tuple[int, int] | None:
    """Rejection-sample a top-left corner whose square keeps ``_GAP`` px from every box; None if none found."""
    for _ in range(50):
        x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
        if all(x0 >= bx1 + _GAP or x0 + size + _GAP <= bx0 or y0 >= by1 + _GAP or y0 + size + _GAP <= by0
               for bx0, by0, bx1, by1 in boxes):
            return x0, y0
    return None


def make_scene(rng: np.random.Generator,
               first_class: str | None = None) -> tuple[Image.Image, list[str], list[Region], Image.Image]:
    """One scene: ``(64x64 RGB image, captions, regions, label map)``; the label map is an ``L`` image of
    indices into :data:`SEGMENTATION_CLASSES`. ``first_class`` fixes the first shape's label (the dataset
    cycles it so every class appears); the others are random. A shape that finds no free place after 50
    tries is left out, and the captions describe only the shapes drawn."""
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    image = Image.fromarray(_background(background, rng))
    labels = Image.new("L", image.size, SEGMENTATION_CLASSES.index(f"{background} background"))
    squares: list[tuple[int, int, int, int]] = []
    objects: list[tuple[float, Region]] = []
    for i in range(int(rng.integers(1, 4))):
        label = first_class if i == 0 and first_class else DEMO_CLASSES[int(rng.integers(len(DEMO_CLASSES)))]
        colour, shape = label.split(" ")
        size_name = ("small", "large")[int(rng.integers(2))]
        size = int(rng.integers(SIZES[size_name][0], SIZES[size_name][1] + 1))
        corner = _place(rng, size, squares)
        if corner is None:
            continue
        squares.append((corner[0], corner[1], corner[0] + size, corner[1] + size))
        mask = Image.new("L", image.size, 0)
        _draw(ImageDraw.Draw(mask), shape, corner[0], corner[1], size)
        image.paste(COLOURS[colour], mask=mask)
        labels.paste(SEGMENTATION_CLASSES.index(label), mask=mask)
        box = tuple(float(v) for v in mask.getbbox())  # tight, xyxy, exclusive right/bottom edge
        objects.append((box[0] + box[2], Region(box, f"a {size_name} {label}", label, mask=_rle(mask))))
    regions = [region for _, region in sorted(objects, key=lambda o: o[0])]  # left to right
    phrases = [r.caption for r in regions]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    captions = [f"{listed} on a {background} background",
                f"{_NUMBERS[len(phrases) - 1]} on a {background} background: {listed}"]
    return image, captions, regions, labels


def _rle(mask: Image.Image) -> dict:
    """A binary ``L`` mask as COCO's uncompressed-JSON RLE ``{"size": [h, w], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask) > 0, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _make_split(root: Path, split: str, num: int, rng: np.random.Generator) -> list[Record]:
    for folder in ("images", "labels"):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num):
        image, captions, regions, labels = make_scene(rng, DEMO_CLASSES[i % len(DEMO_CLASSES)])
        name = f"images/{split}/{i:06d}.png"
        (root / name).write_bytes(_png_bytes(image))
        (root / "labels" / split / f"{i:06d}.png").write_bytes(_png_bytes(labels))
        records.append(Record(name, tuple(captions), tuple(regions), IMAGE_SIZE, IMAGE_SIZE, source=SOURCE,
                              label_map=f"labels/{split}/{i:06d}.png"))
    return records


def make_demo_dataset(root: str | Path, num_train: int = 2000, num_val: int = 200, seed: int = 0) -> Path:
    """Write ``root/images/{train,val}/NNNNNN.png``, their label maps ``root/labels/{train,val}/NNNNNN.png``,
    ``root/segmentation_classes.txt`` and ``root/{train,val}.jsonl`` (region-text records, image paths
    relative to ``root``). Same ``seed`` -> identical bytes; train and val draw from
    different seed streams. ``val.jsonl`` is written last, so its presence marks a complete dataset."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "segmentation_classes.txt").write_text("\n".join(SEGMENTATION_CLASSES) + "\n")
    for split, num, stream in (("train", num_train, 0), ("val", num_val, 1)):
        records = _make_split(root, split, num, np.random.default_rng([seed, stream]))
        write_jsonl(records, root / f"{split}.jsonl")
    return root


def default_demo_root() -> Path:
    """``$FINEGRAIN_CACHE/demo-v3``, else ``~/.cache/finegrain/demo-v3``."""
    cache = os.environ.get("FINEGRAIN_CACHE")
    return (Path(cache) if cache else Path.home() / ".cache" / "finegrain") / "demo-v3"


def ensure_demo_dataset(root: str | Path | None = None) -> Path:
    """Return the root of the (default-sized) demo dataset, building it first if it is not complete.

    The dataset is built in a temporary sibling directory and renamed into place, so concurrent
    callers never see a partial dataset; a caller that loses the race uses the winner's copy.
    """
    root = Path(root) if root is not None else default_demo_root()
    if (root / "val.jsonl").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other directory
    try:
        make_demo_dataset(tmp)
        os.rename(tmp, root)
    except OSError:
        if not (root / "val.jsonl").exists():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
