#!/usr/bin/env python
"""Evaluation throughput: images/s of COCO-panoptic box classification and open-vocabulary segmentation.

Writes a COCO-size dataset (640x480 JPEGs cut from a photograph that matplotlib ships; see
``input_pipeline.write_dataset``) in the two formats the protocols read:

  panoptic      a COCO panoptic json (133 categories, the first 80 things) and its PNGs: each image a
                6 x 5 grid of segments, so 30 boxes per image
  segmentation  an ADE20K-style folder: the same JPEGs and 150-class label PNGs (blocks of random classes)

and times the real evaluation functions on them, end to end (image and PNG decoding, resizing, the model,
the text classifier, the metrics), after an untimed warm-up on the first ``--warmup`` images:

  box           ``evaluate_panoptic_box_classification`` for each ``--box-setups`` entry
                ``RESIZE[@SIZE]:WAY+WAY`` (default: FineCLIP's squash at the model size with RoI only, the
                same with all three ways, and CLIPSelf's longest side 1024 with all three ways)
  segmentation  ``evaluate_segmentation``: short side 448, sliding windows of the model size, stride half

The model has random weights (timing does not depend on them); ``--precision bf16`` runs the forward
passes under autocast as ``finegrain eval --precision bf16`` does.

  python benchmarks/eval_throughput.py --model finegrain-tiny --images 40 --seg-images 20   # CPU smoke run
  python benchmarks/eval_throughput.py --device cuda --precision bf16 --images 5000 --seg-images 2000 \\
      --json benchmarks/results/h100-eval-throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from input_pipeline import write_dataset
from PIL import Image
from step_time import print_rows, run_benchmark

from finegrain.data.segmentation import SegmentationFolder
from finegrain.eval.box_classification import evaluate_panoptic_box_classification
from finegrain.eval.prompts import load_class_names
from finegrain.eval.segmentation import evaluate_segmentation
from finegrain.models import create_model, get_tokenizer

WIDTH, HEIGHT = 640, 480
GRID = (6, 5)  # segments per image: columns x rows
THINGS, CATEGORIES = 80, 133
DEFAULT_BOX_SETUPS = "squash:roi,squash:roi+crop+mask,longest@1024:roi+crop+mask"


def grid_cells() -> list[tuple[int, int, int, int]]:
    """The ``(x0, y0, x1, y1)`` pixel cells of the segment grid (x1, y1 exclusive)."""
    cols, rows = GRID
    xs = np.linspace(0, WIDTH, cols + 1).astype(int)
    ys = np.linspace(0, HEIGHT, rows + 1).astype(int)
    return [(int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1])) for r in range(rows) for c in range(cols)]


def write_panoptic(folder: Path, names: list[str], name: str) -> Path:
    """A panoptic json ``folder/name.json`` over the JPEGs ``names`` (PNGs in ``folder/name/``)."""
    png_dir = folder / name
    png_dir.mkdir(exist_ok=True)
    rng = random.Random(0)
    cells = grid_cells()
    images, annotations = [], []
    for index, image_name in enumerate(names):
        ids = np.zeros((HEIGHT, WIDTH), dtype=np.uint32)
        segments = []
        for k, (x0, y0, x1, y1) in enumerate(cells, start=1):
            ids[y0:y1, x0:x1] = k
            category = rng.randrange(CATEGORIES)
            segments.append({"id": k, "category_id": category + 1, "iscrowd": 0, "area": (x1 - x0) * (y1 - y0),
                             "bbox": [x0, y0, x1 - x0, y1 - y0]})
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)
        png = Path(image_name).with_suffix(".png").name
        Image.fromarray(rgb).save(png_dir / png)
        images.append({"id": index, "file_name": image_name, "width": WIDTH, "height": HEIGHT})
        annotations.append({"image_id": index, "file_name": png, "segments_info": segments})
    categories = [{"id": c + 1, "name": f"category {c}", "isthing": int(c < THINGS)} for c in range(CATEGORIES)]
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def write_label_maps(folder: Path, names: list[str], num_classes: int = 150) -> Path:
    """ADE20K-style 8-bit label maps of the JPEGs ``names`` in ``folder/labels/``: 8 x 6 blocks of random
    classes, one block in ten unlabelled (255)."""
    labels = folder / "labels"
    labels.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for image_name in names:
        blocks = rng.integers(0, num_classes, size=(6, 8)).astype(np.uint8)
        blocks[rng.random((6, 8)) < 0.1] = 255
        label = np.kron(blocks, np.ones((HEIGHT // 6, WIDTH // 8), dtype=np.uint8))
        Image.fromarray(label).save(labels / Path(image_name).with_suffix(".png").name)
    return labels


def parse_box_setup(text: str) -> dict:
    """``RESIZE[@SIZE]:WAY+WAY`` -> ``{"resize", "image_size", "ways"}``."""
    try:
        resize, ways = text.split(":")
        resize, _, size = resize.partition("@")
        return {"resize": resize, "image_size": int(size) if size else None, "ways": ways.split("+")}
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"box setup {text!r}: expected RESIZE[@SIZE]:WAY+WAY, e.g. "
                                         "longest@1024:roi+crop+mask") from e


def timed(device: torch.device, run) -> tuple[float, dict]:
    """``(seconds, run())`` with the device synchronised around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    metrics = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, metrics


def measure(args, device: torch.device) -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix="finegrain-eval-bench-"))
    count = max(args.images, args.seg_images, args.warmup)
    start = time.perf_counter()
    write_dataset(folder, count)
    names = [f"{i:06d}.jpg" for i in range(count)]
    panoptic = {"timed": write_panoptic(folder, names[:args.images], "panoptic_timed"),
                "warmup": write_panoptic(folder, names[:args.warmup], "panoptic_warmup")}
    write_label_maps(folder, names[:args.seg_images])
    print(f"wrote {count} images, {args.images} panoptic PNGs and {args.seg_images} label maps in "
          f"{time.perf_counter() - start:.0f} s", flush=True)

    model = create_model(args.model, device=device).eval()
    tokenizer = get_tokenizer(args.model)
    def autocast():
        return (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    results = []
    labels = SegmentationFolder(folder, ".", "labels", load_class_names("ade20k-150"))
    warm = SegmentationFolder(folder, ".", "labels", load_class_names("ade20k-150"))
    warm.stems = warm.stems[:args.warmup]
    with autocast():
        evaluate_segmentation(model, warm, tokenizer, batch_size=args.batch_size, device=device, progress=False)
        seconds, metrics = timed(device, lambda: evaluate_segmentation(
            model, labels, tokenizer, batch_size=args.batch_size, device=device, progress=False))
    results.append({"protocol": "open-vocabulary segmentation", "setup": "slide, short side 448",
                    "images": metrics["num_images"], "boxes": None, "seconds": seconds,
                    "images_per_s": metrics["num_images"] / seconds, "boxes_per_s": None})
    print(f"segmentation: {results[-1]['images_per_s']:.1f} images/s", flush=True)
    for setup in args.box_setups:
        box = functools.partial(evaluate_panoptic_box_classification, model, tokenizer=tokenizer, root=folder,
                                ways=setup["ways"], resize=setup["resize"], image_size=setup["image_size"],
                                batch_size=args.batch_size, device=device, progress=False)
        with autocast():
            box(data=panoptic["warmup"])
            seconds, metrics = timed(device, functools.partial(box, data=panoptic["timed"]))
        label = f"{setup['resize']}{'@' + str(setup['image_size']) if setup['image_size'] else ''}"
        results.append({"protocol": "panoptic box classification", "setup": f"{label} {'+'.join(setup['ways'])}",
                        "images": metrics["num_images"], "boxes": metrics["num_boxes"], "seconds": seconds,
                        "images_per_s": metrics["num_images"] / seconds, "boxes_per_s": metrics["num_boxes"] / seconds})
        print(f"box {results[-1]['setup']}: {results[-1]['images_per_s']:.1f} images/s", flush=True)

    print_rows(["protocol", "setup", "images", "s", "images/s", "boxes/s"],
               [[r["protocol"], r["setup"], str(r["images"]), f"{r['seconds']:.1f}", f"{r['images_per_s']:.1f}",
                 "" if r["boxes_per_s"] is None else f"{r['boxes_per_s']:.0f}"] for r in results],
               f"({args.model}, random weights, {args.precision}, {device}; wall time of the whole evaluation "
               "call: decoding, model, text classifier, metrics)")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-16", help="(default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="(default: %(default)s)")
    p.add_argument("--images", type=int, default=200, help="panoptic images to time (default: %(default)s)")
    p.add_argument("--seg-images", type=int, default=100,
                   help="segmentation images to time (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=16, help="untimed warm-up images (default: %(default)s)")
    p.add_argument("--box-setups", type=parse_box_setup, nargs="+",
                   default=[parse_box_setup(s) for s in DEFAULT_BOX_SETUPS.split(",")],
                   help=f"box classification set-ups RESIZE[@SIZE]:WAY+WAY (default: {DEFAULT_BOX_SETUPS})")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images (RoI, mask), crops, or windows per forward pass (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    return run_benchmark(args, lambda device: measure(args, device))


if __name__ == "__main__":
    sys.exit(main())
