#!/usr/bin/env python
"""A fine-tuning step (segmentation, detection) with finegrain's backbone vs the same head on timm's ViT, in one
process.

Two set-ups per task, both the trainer itself (``Trainer.train_step`` + ``Trainer.flush_log`` on a loader-style
uint8 batch), built from the task's shipped recipe (``seg-upernet-ade20k-vitb16``: UperNet + auxiliary FCN;
``det-maskrcnn-coco-vitb16``: Mask R-CNN) with model ViT-B-16:

  finegrain  the recipe as shipped (but per-process BatchNorm, which a CPU or one process has either way): the
             open_clip tower's block maps (``forward_intermediates``, through the final norm where the recipe
             sets ``final_norm``) through the simple feature pyramid into the head.
  timm       the same task whose backbone is timm's ``vit_base_patch16_224`` (``dynamic_img_size``) reading the
             same blocks (timm's ``forward_intermediates``, normed alike) through a simple feature pyramid of the same shape:
             the baseline a timm user would write, with the recipe's drop-path rate. Its tower's learning
             rate is not layer-decayed (the same optimizer work per parameter).

Weights are random (the step costs the same). Batches are synthetic: uint8 images of ``--size`` pixels (the
recipe's 512 crop for segmentation; detection canvases are cropped per batch to their largest image, so ``--size``
is that image), random labels (150 classes) or 8 random boxes per image with their box masks (80 classes).
Method: the set-up named by ``--build-first`` is built first (on CPU the first-built one measured slower), then
``--warmup`` steps of each, then finegrain, timm, finegrain, ... for ``--repeats`` rounds; medians compared:
ratio = finegrain / timm (PASS when <= ``--threshold``, 1.05); peak memory of one more untimed step each (see
benchmarks/step_time.py). Images/s per process = batch / median step.

Examples:
  python benchmarks/finetune_step.py                                   # CPU: seg at 512, det at 512, batch 2
  python benchmarks/finetune_step.py --device cuda --precision bf16 --batch-size 8 --det-size 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import timm
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from method_step import Setup, time_setups
from step_time import environment, open_device, relative_iqr

from finegrain.config import load_config
from finegrain.models.backbone import SimpleFeaturePyramid
from finegrain.train.optim import create_optimizer
from finegrain.train.trainer import Trainer

RECIPES = {"seg": "seg-upernet-ade20k-vitb16", "det": "det-maskrcnn-coco-vitb16"}


class TimmViTBackbone(nn.Module):
    """timm's ViT-B/16 reading blocks ``indices`` (NCHW maps) through a simple feature pyramid -> ordered dict."""

    def __init__(self, indices: list[int], pyramid: bool, drop_path_rate: float, norm: bool = False):
        super().__init__()
        self.vit = timm.create_model("vit_base_patch16_224", pretrained=False, dynamic_img_size=True,
                                     drop_path_rate=drop_path_rate)
        self.indices, self.norm = indices, norm
        self.pyramid = SimpleFeaturePyramid(self.vit.embed_dim) if pyramid else None

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = self.vit.forward_intermediates(images, indices=self.indices, norm=self.norm, output_fmt="NCHW",
                                             intermediates_only=True)
        maps = self.pyramid(maps) if self.pyramid is not None else maps
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


def recipe_trainer(recipe: str, batch_size: int, device: str, precision: str, *extra: str) -> Trainer:
    """The trainer of a shipped fine-tuning recipe, random weights, no evaluation, in a temporary folder; fed
    synthetic batches (its loader is the demo's, unused)."""
    overrides = ["model.pretrained=null", "data.train.path=demo:train", "data.val=null", "train.eval_tasks=[]",
                 "train.best_metric=null", "train.eval_every=0", "data.num_workers=0", f"data.batch_size={batch_size}",
                 f"train.device={device}", f"train.precision={precision}", "train.steps=1000", "train.epochs=null",
                 "train.log_every=1", "optim.warmup_epochs=null",
                 f"train.output_dir={tempfile.mkdtemp(prefix='finegrain-bench-')}", *extra]
    return Trainer(load_config(recipe, overrides, "/unused"), progress_bar=False)


def make_trainer(task: str, args, size: int) -> Trainer:
    if task == "seg":
        sizes = [f"method.crop=[{size},{size}]"]
    else:  # the unused loader's demo records hold no COCO class
        sizes = [f"method.short_sides=[{size}]", f"method.max_size={size}", f"method.pad=[{size},{size}]",
                 "method.drop_empty=false"]
    return recipe_trainer(RECIPES[task], args.batch_size, args.device, args.precision, "method.norm=batch", *sizes)


def random_boxes(batch_size: int, count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, count, 4)`` xyxy integer boxes inside a ``size`` square, sides 10 to 40 % of it."""
    corners = torch.rand(batch_size, count, 2, generator=generator) * size * 0.6
    sides = (0.1 + 0.3 * torch.rand(batch_size, count, 2, generator=generator)) * size
    return torch.cat([corners, corners + sides], dim=-1).floor()


def with_timm_backbone(trainer: Trainer) -> Trainer:
    """The trainer's task with timm's ViT as its backbone, and an optimizer over the new parameters."""
    backbone, rules = trainer.method.backbone, trainer.method.param_rules()
    rate = trainer.method.options.backbone.drop_path_rate
    trainer.method.backbone = TimmViTBackbone(backbone.block_indices, backbone.pyramid is not None, rate,
                                              backbone.final_norm).to(trainer.device)
    trainer.optimizer = create_optimizer(trainer.module, trainer.cfg.optim, rules, fused=trainer.device.type == "cuda")
    return trainer


def synthetic_batch(task: str, trainer: Trainer, size: int, batch_size: int, generator: torch.Generator) -> dict:
    image = torch.randint(0, 256, (batch_size, 3, size, size), generator=generator, dtype=torch.uint8)
    if task == "seg":
        return {"image": image, "label": torch.randint(0, 150, (batch_size, size, size), generator=generator),
                "image_size": torch.tensor([[size, size]] * batch_size)}
    m = trainer.method.sample_spec().dense.max_instances
    boxes = random_boxes(batch_size, m, size, generator)
    masks = torch.zeros(batch_size * 8, size, size, dtype=torch.uint8)  # the valid rows, concatenated
    for b in range(batch_size):
        for j in range(8):
            x0, y0, x1, y1 = (int(v) for v in boxes[b, j])
            masks[8 * b + j, y0:y1, x0:x1] = 1
    return {"image": image, "image_size": torch.tensor([[size, size]] * batch_size), "instance_boxes": boxes,
            "instance_labels": torch.randint(0, 80, (batch_size, m), generator=generator),
            "instance_valid": torch.arange(m).expand(batch_size, m) < 8, "instance_masks": masks}


def run_task(task: str, args) -> dict:
    size = args.seg_size if task == "seg" else args.det_size
    torch.manual_seed(args.seed)
    builders = {"finegrain": lambda: make_trainer(task, args, size),
                "timm": lambda: with_timm_backbone(make_trainer(task, args, size))}
    built = {label: builders[label]() for label in sorted(builders, key=lambda label: label != args.build_first)}
    setups = [Setup(label, built[label]) for label in builders]
    batch = synthetic_batch(task, setups[0].trainer, size, args.batch_size, torch.Generator().manual_seed(args.seed))
    print(f"\n== {task} ({RECIPES[task]})  ViT-B-16  batch {args.batch_size} x {size}px  device {args.device}  "
          f"{args.precision}", flush=True)
    _, times, memory = time_setups(setups, {s.label: batch for s in setups}, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["finegrain"] / med["timm"]
    return {"task": task, "recipe": RECIPES[task], "size": size, "batch_size": args.batch_size, "device": args.device,
            "precision": args.precision, "build_first": args.build_first, "median_s": med,
            "images_per_s": {k: args.batch_size / v for k, v in med.items()},
            "relative_iqr": {k: relative_iqr(v) for k, v in times.items()}, "peak_memory_mib": memory,
            "ratio_vs_timm": ratio, "pass": ratio <= args.threshold}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="seg,det")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seg-size", type=int, default=512, help="segmentation crop (the recipe's 512)")
    p.add_argument("--det-size", type=int, default=512, help="detection image side (recipe: up to 1333)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threshold", type=float, default=1.05)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--build-first", choices=["finegrain", "timm"], default="finegrain",
                   help="which set-up is built (allocated) first: on CPU the first-built backbone measured up to "
                        "4%% slower (docs/benchmarks.md), so compare both orders")
    p.add_argument("--json", default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    opened = open_device(args)
    if opened is None:
        return 1
    device, _ = opened
    results = [run_task(task, args) for task in args.tasks.split(",")]
    print(f"\n{'task':5s} {'finegrain img/s':>16s} {'timm img/s':>11s} {'ratio':>6s} {'mem MiB (fg/timm)':>20s}")
    for r in results:
        mem = "/".join("n/a" if v is None else f"{v:.0f}" for v in r["peak_memory_mib"].values())
        print(f"{r['task']:5s} {r['images_per_s']['finegrain']:16.2f} {r['images_per_s']['timm']:11.2f} "
              f"{r['ratio_vs_timm']:6.3f} {mem:>20s}  {'PASS' if r['pass'] else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": environment(device), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
