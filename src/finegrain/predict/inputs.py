"""The images a prediction runs on, named as users name them: folders, glob patterns, image files, lists."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ..config import DataSourceConfig
from ..data.images import load_image
from ..data.loader import resolve_source
from ..data.readers import read_image_files
from ..errors import DataError

ImageInput = str | Path | Image.Image
RECORD_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


def is_image_file(path: str | Path) -> bool:
    return has_file_allowed_extension(str(path), IMG_EXTENSIONS)


def list_images(specs: str | Path | Sequence[str | Path]) -> list[Path]:
    """The image files named by ``specs``, in order, each once. A spec is a folder (every image under it, a sorted
    walk), a glob pattern (``photos/*.jpg``, ``**`` recursive), an image file, a text file listing image paths one
    per line (relative to the list's folder; blank lines and ``#`` comments skipped), or a records file finegrain
    reads (region-text JSONL, COCO json, CSV/TSV; ``demo:val``): its images. A spec that names nothing is a
    ``DataError`` naming it."""
    found: list[Path] = []
    for spec in [specs] if isinstance(specs, (str, Path)) else specs:
        path = Path(spec)
        if str(spec).startswith("demo:") or (path.is_file() and path.suffix.lower() in RECORD_SUFFIXES):
            records, root = resolve_source(DataSourceConfig(path=str(spec)))
            paths = [Path(root) / records[i].image for i in range(len(records))]
        elif path.is_dir():
            records = read_image_files(path)
            paths = [path / records[i].image for i in range(len(records))]
            if not paths:
                raise DataError(f"{spec}: the folder holds no image ({', '.join(IMG_EXTENSIONS)})")
        elif path.is_file():
            paths = [path] if is_image_file(path) else _listed(path)
        elif glob.has_magic(str(spec)):
            paths = [Path(p) for p in sorted(glob.glob(str(spec), recursive=True)) if is_image_file(p)]
            if not paths:
                raise DataError(f"{spec}: the pattern matches no image file")
        else:
            raise DataError(f"{spec}: no such file or folder")
        found += paths
    return list(dict.fromkeys(found))


def _listed(path: Path) -> list[Path]:
    """The image paths a text file lists (see :func:`list_images`)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path}: neither an image ({', '.join(IMG_EXTENSIONS)}) nor a UTF-8 list of image "
                        "paths") from None
    paths = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        listed = Path(os.path.expanduser(line))
        listed = listed if listed.is_absolute() else path.parent / listed
        if not is_image_file(listed):
            raise DataError(f"{path}:{number}: {line!r} is not an image file name ({', '.join(IMG_EXTENSIONS)})")
        paths.append(listed)
    if not paths:
        raise DataError(f"{path}: the list names no image")
    return paths


def load_input(item: ImageInput) -> Image.Image:
    """A path (decoded as finegrain reads images everywhere: EXIF orientation applied, RGB; an unreadable file
    is an :class:`~finegrain.data.images.ImageError` naming it) or a PIL image (converted to RGB)."""
    return item.convert("RGB") if isinstance(item, Image.Image) else load_image(Path(item))


def load_inputs(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
    """One input or a sequence of them as RGB images (:func:`load_input`)."""
    return [load_input(item) for item in ([images] if isinstance(images, (str, Path, Image.Image)) else images)]


def model_pixels(model, images: Sequence[Image.Image]):
    """RGB images squashed to the model's input size: ``(uint8 (B, 3, H, W), normalised float (B, 3, H, W))``."""
    import numpy as np
    import open_clip
    import torch

    height, width = model.image_size
    pixels = torch.stack([torch.from_numpy(np.array(image.convert("RGB").resize((width, height), Image.BICUBIC)))
                          .permute(2, 0, 1) for image in images])
    pp = open_clip.get_model_preprocess_cfg(model.clip)
    mean, std = (torch.tensor(pp[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    return pixels, (pixels.float() / 255 - mean) / std
