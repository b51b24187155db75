#!/usr/bin/env python
"""Input-pipeline throughput: samples/s of one data-loader worker, from JPEG files to training tensors.

Writes ``--images`` JPEGs of COCO size (640x480, quality 90, cut from a real photograph that matplotlib
ships) and a region-text JSONL, then times the trainer's own per-sample path in this process, one
thread (what one DataLoader worker does): ``RecordDataset[(index, seed)]`` = read the file, decode
(EXIF, RGB), ``SampleBuilder`` with the method's ``SampleSpec`` (open_clip's training augmentation to
the model's input size, uint8 out; normalisation happens later on the device), plus the collate of a
batch. Two decode paths are compared in the same run: full-size decode, and Pillow's JPEG draft mode
(the decoder downscales by a power of two, never below the recipe's ``draft_size``), which the trainer uses.

  python benchmarks/input_pipeline.py                       # 224 px, 200 images, 3 passes
  python benchmarks/input_pipeline.py --size 336 --images 400 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.cbook
import torch
from PIL import Image

from finegrain.data.collate import collate
from finegrain.data.dataset import RecordDataset
from finegrain.data.readers import read_records
from finegrain.data.sample import SampleBuilder
from finegrain.models import get_tokenizer
from finegrain.sample_spec import SampleSpec

GOAL = 150.0  # samples/s per worker: 16 workers then feed 2,000+ samples/s


def write_dataset(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` 640x480 JPEGs cut at random from the photograph, and a JSONL of records for them."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as photo:
        photo = photo.convert("RGB").resize((1280, 1500), Image.BICUBIC)
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        x, y = rng.randrange(0, 1280 - 640), rng.randrange(0, 1500 - 480)
        name = f"{i:06d}.jpg"
        photo.crop((x, y, x + 640, y + 480)).save(folder / name, quality=90)
        lines.append(json.dumps({"image": name, "captions": [f"photo {i}"], "width": 640, "height": 480}))
    path = folder / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def time_pass(dataset: RecordDataset, count: int, batch_size: int, seed: int) -> float:
    """Seconds to build ``count`` samples (in batches, collated), as one worker does."""
    start = time.perf_counter()
    for first in range(0, count, batch_size):
        collate([dataset[(i, seed + i)] for i in range(first, min(count, first + batch_size))])
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=224, help="training image size (default: %(default)s)")
    p.add_argument("--images", type=int, default=200, help="JPEG files to write (default: %(default)s)")
    p.add_argument("--passes", type=int, default=3, help="timed passes per decode path (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one loader worker
    folder = Path(tempfile.mkdtemp(prefix="finegrain-pipeline-"))
    records = read_records(write_dataset(folder, args.images))
    builder = SampleBuilder(SampleSpec(), (args.size, args.size), get_tokenizer("ViT-B-16"))
    results = {}
    for label, draft in (("full decode", None), ("draft decode", builder.draft_size)):
        builder.draft_size = draft
        dataset = RecordDataset(records, folder, builder)
        time_pass(dataset, min(20, args.images), args.batch_size, 0)  # warm-up
        seconds = [time_pass(dataset, args.images, args.batch_size, 1000 * k) for k in range(args.passes)]
        results[label] = args.images / statistics.median(seconds)
        print(f"{label:13s}: {results[label]:7.1f} samples/s per worker "
              f"(median of {args.passes} passes over {args.images} images)", flush=True)
    speedup = results["draft decode"] / results["full decode"]
    print(f"draft / full: {speedup:.2f}x; goal >= {GOAL:.0f} samples/s per worker: "
          f"{'PASS' if results['draft decode'] >= GOAL else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "samples_per_s": results,
                                               "speedup": speedup, "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
