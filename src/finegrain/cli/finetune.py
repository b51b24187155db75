"""``finegrain finetune``: `finegrain train` with a shipped fine-tuning recipe, chosen by task and head."""

from __future__ import annotations

import argparse

from ..errors import DataError
from . import train
from .common import add_config_args

# the recipe `finegrain finetune --task T --head H` runs (the first head of a task is its default)
RECIPES = {("seg", "upernet"): "seg-upernet-ade20k-vitb16", ("seg", "linear"): "seg-linear-ade20k-vitb16",
                    ("det", "maskrcnn"): "det-maskrcnn-coco-vitb16", ("ovd", "fvit"): "ovd-fvit-ovcoco-eva02-b16"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a backbone with a dense head: segmentation, detection, open-vocabulary detection",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune the vision tower of a finegrain or open_clip checkpoint into a segmenter (UperNet or "
                    "linear head), a Mask R-CNN detector, or an F-ViT open-vocabulary detector, by a shipped "
                    "recipe: `finegrain train` with that recipe (same run folder, DDP, resume, logging); the "
                    "held-out scores go to OUTPUT/eval (`finegrain eval --table`).",
        epilog="recipes (--task, --head -> config; any --config works too):\n" + "\n".join(
            f"  --task {task:<4} --head {head:<8} {recipe}" for (task, head), recipe in RECIPES.items()))
    add_config_args(p, "a recipe or YAML path instead of the --task/--head default")
    p.add_argument("--task", choices=sorted({task for task, _ in RECIPES}), default=None,
                   help="seg: semantic segmentation (ADE20K layout); det: detection + instance segmentation (COCO "
                        "json); ovd: open-vocabulary detection (OV-COCO)")
    p.add_argument("--head", default=None, help="seg: upernet (default) or linear; det: maskrcnn; ovd: fvit")
    p.add_argument("--pretrained", default=None, metavar="CKPT|TAG",
                   help="the backbone's weights: a finegrain / open_clip / released checkpoint file or an open_clip "
                        "tag (sets model.pretrained); a finegrain checkpoint brings its own model (model.name=... "
                        "forces another)")
    p.add_argument("--output", default=None, help="run folder (sets train.output_dir)")
    p.add_argument("--resume", default=None, metavar="latest|auto|PATH", help="as `finegrain train --resume`")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a status line about 20 times a run instead (train.print_every)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the result")


def run(args) -> int:
    """``finegrain train`` with the recipe of ``--task`` / ``--head`` (or ``--config``) and the options as
    overrides."""
    if args.config is None:
        if args.task is None:
            raise DataError("say what to fine-tune: --task seg|det|ovd (or --config RECIPE)")
        heads = [head for task, head in RECIPES if task == args.task]
        head = args.head or heads[0]
        if (args.task, head) not in RECIPES:
            raise DataError(f"--task {args.task} has heads {heads}, not {head!r}")
        args.config = RECIPES[args.task, head]
    elif args.task or args.head:
        raise DataError("give --config or --task/--head, not both")
    given = [f"model.pretrained={args.pretrained}"] if args.pretrained else []
    given += [f"train.output_dir={args.output}"] if args.output else []
    args.overrides = [*given, *args.overrides]
    return train.run(args)

