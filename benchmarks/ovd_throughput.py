#!/usr/bin/env python
"""F-ViT open-vocabulary detection (``finetune-ovd``): training and inference images/s per process.

For each recipe (default: the demo's ``demo-finetune-ovd`` on finegrain-tiny at 64 px, and
``ovd-fvit-ovcoco-eva02-b16`` on EVA02-B/16 at 640 px; random weights, the same cost):

  train      the trainer itself (``Trainer.train_step`` + ``Trainer.flush_log``) on a loader-style batch: uint8
             images of the recipe's size with 8 random base-class boxes each. The frozen tower runs without
             autograd; the pyramid, FPN, RPN and RoI head train.
  detect     the task's own test path (``FViTTask.detect``, what the ``ovd`` evaluation calls): read
             ``--batch-size`` image files (random-pixel PNGs, 640x480 for recipes above 128 px, else the
             recipe's size), resize, one tower pass for the pyramid and the CLIP region features, proposals, the
             learned and CLIP scores and their ensemble, NMS.
  two-pass   the previous version of ``detect``, for the ratio: the pyramid's last map from the ordinary last
             block and the CLIP region features from a second tower pass (``model.encode_dense``).

Method: ``--warmup`` calls of each, then ``--repeats`` interleaved rounds (train, detect, two-pass, ...);
medians; images/s = batch / median. Peak memory: one more untimed call of each (see benchmarks/step_time.py).
PASS when detect / two-pass <= ``--threshold``.

Examples:
  python benchmarks/ovd_throughput.py                                # CPU: tiny@16 and EVA02-B/16@2
  python benchmarks/ovd_throughput.py --recipes ovd-fvit-ovcoco-openai-b16 --batch-sizes 2
  python benchmarks/ovd_throughput.py --device cuda --precision bf16 --batch-sizes 16,8 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from finetune_step import random_boxes, recipe_trainer
from method_step import Setup, time_setups
from PIL import Image
from step_time import fmt_mem, print_rows, relative_iqr, run_benchmark

from finegrain.finetune.ovd import FViTTask
from finegrain.models import FinegrainCLIP
from finegrain.objectives.registry import register_method
from finegrain.train.trainer import Trainer, autocast

DEFAULT_RECIPES = ["demo-finetune-ovd", "ovd-fvit-ovcoco-eva02-b16"]
DEFAULT_BATCH_SIZES = {"demo-finetune-ovd": 16}  # others: 2
BOXES = 8


@register_method("finetune-ovd_two_pass")
class TwoPassFViT(FViTTask):
    """F-ViT's previous test path: ordinary last block for the pyramid, a second tower pass for the CLIP
    features."""

    def detection_features(self, model: FinegrainCLIP, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        blocks = self.backbone.tower.forward_intermediates(images, self.backbone.block_indices)
        return self.backbone.pyramid(blocks), model.encode_dense(images)


@dataclass
class DetectSetup:
    """``step(files)``: the task's ``detect`` on the image files under the trainer's precision; returns the
    number of detections."""

    label: str
    trainer: Trainer

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    def step(self, files: list[Path]) -> float:
        method, model = self.trainer.method, self.trainer.model
        method.eval()
        with autocast(self.device, self.trainer.cfg.train.precision):
            detections = method.detect(model, files)
        method.train()
        return float(sum(len(boxes) for boxes, _, _ in detections))


def train_batch(task: FViTTask, batch_size: int, generator: torch.Generator) -> dict:
    """Loader-style: uint8 images of the recipe's size, ``BOXES`` random base-class boxes each."""
    size, m = task.options.image_size, task.options.max_instances
    return {"image": torch.randint(0, 256, (batch_size, 3, size, size), generator=generator, dtype=torch.uint8),
            "image_size": torch.tensor([[size, size]] * batch_size),
            "instance_boxes": random_boxes(batch_size, m, size, generator),
            "instance_labels": torch.randint(0, len(task.base), (batch_size, m), generator=generator),
            "instance_valid": torch.arange(m).expand(batch_size, m) < min(BOXES, m)}


def image_files(task: FViTTask, count: int, folder: Path, generator: torch.Generator) -> list[Path]:
    size = task.options.image_size
    width, height = (640, 480) if size > 128 else (size, size)
    files = []
    for i in range(count):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        files.append(folder / f"{i}.png")
        Image.fromarray(pixels.numpy()).save(files[-1])
    return files


def run_recipe(recipe: str, batch_size: int, args, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    keep_all = "method.drop_empty=false"  # the unused loader's demo records hold no OV-COCO class
    trainer = recipe_trainer(recipe, batch_size, device.type, args.precision, keep_all)
    task = trainer.method
    task.ensure_class_embeddings(trainer.model)  # once, untimed (a prompt ensemble through the text tower)
    two_pass = recipe_trainer(recipe, batch_size, device.type, args.precision, keep_all,
                              "method.name=finetune-ovd_two_pass")
    two_pass.module.load_state_dict(trainer.module.state_dict())
    generator = torch.Generator().manual_seed(args.seed)
    files = image_files(task, batch_size, Path(tempfile.mkdtemp(prefix="finegrain-bench-")), generator)
    setups = [Setup("train", trainer), DetectSetup("detect", trainer), DetectSetup("two-pass", two_pass)]
    batches = {"train": train_batch(task, batch_size, generator), "detect": files, "two-pass": files}
    print(f"\n== {recipe}  {trainer.cfg.model.name}  {task.options.image_size}px  batch {batch_size}  "
          f"device {device.type}  {args.precision}", flush=True)
    _, times, memory = time_setups(setups, batches, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["detect"] / med["two-pass"]
    return {"recipe": recipe, "model": trainer.cfg.model.name, "image_size": task.options.image_size,
            "batch_size": batch_size, "device": device.type, "precision": args.precision, "median_s": med,
            "images_per_s": {k: batch_size / v for k, v in med.items()},
            "relative_iqr": {k: relative_iqr(v) for k, v in times.items()}, "peak_memory_mib": memory,
            "detect_vs_two_pass": ratio, "pass": ratio <= args.threshold}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated (default: %(default)s)")
    p.add_argument("--batch-sizes", default=None,
                   help="one per recipe, or one for all (default: 16 for demo-finetune-ovd, 2 otherwise)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threshold", type=float, default=1.0, help="PASS when detect / two-pass <= this")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else \
        [DEFAULT_BATCH_SIZES.get(r, 2) for r in args.recipes]
    args.batch_sizes = sizes * len(args.recipes) if len(sizes) == 1 else sizes
    if len(args.batch_sizes) != len(args.recipes):
        p.error(f"--batch-sizes has {len(args.batch_sizes)} values for {len(args.recipes)} recipes")
    return args


def print_results(results: list[dict]) -> None:
    rows = [[r["recipe"], f"{r['image_size']}", f"{r['batch_size']}",
             *(f"{r['images_per_s'][k]:.2f}" for k in ("train", "detect", "two-pass")),
             f"{r['detect_vs_two_pass']:.3f}", "/".join(fmt_mem(r["peak_memory_mib"][k]) for k in ("train", "detect")),
             "PASS" if r["pass"] else "FAIL"] for r in results]
    print_rows(["recipe", "px", "batch", "train img/s", "detect img/s", "two-pass img/s", "ratio", "mem MiB train/detect",
                ""], rows, "ratio = detect / two-pass step time (one tower pass at test time against two)")


def main(argv=None) -> int:
    args = parse_args(argv)

    def run(device: torch.device) -> list[dict]:
        results = [run_recipe(r, b, args, device) for r, b in zip(args.recipes, args.batch_sizes)]
        print_results(results)
        return results

    return run_benchmark(args, run)


if __name__ == "__main__":
    sys.exit(main())
