"""``finegrain demo``: train and evaluate a tiny CLIP (or fine-tune one) on the built-in demo data."""

from __future__ import annotations

import sys

from ..errors import DataError


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train and evaluate a tiny CLIP on the built-in demo data",
                       description="Generate the demo dataset (coloured shapes, captions, boxes with region "
                                   "captions) if needed, evaluate a tiny random CLIP on its held-out split, "
                                   "train it, evaluate again and print a table. Writes a run folder with "
                                   "config, checkpoints, metrics.jsonl and loss.png.")
    p.add_argument("--method", default="clip",
                   choices=["clip", "fineclip", "clipself", "detailclip", "fineclip+detailclip"],
                   help="clip (default): train a tiny CLIP from scratch, table before/after. fineclip, clipself: "
                        "fine-tune the CLIP demo's model (trained first into OUTPUT/start, or --start) with the "
                        "method and with plain CLIP for the same steps, table side by side. detailclip: "
                        "DetailCLIP and plain CLIP from the same random initialisation, side by side, plus a "
                        "PNG of the teacher attention and kept blocks. fineclip+detailclip: the two composed, "
                        "next to each alone, all fine-tuning the CLIP demo's model, segmentation mIoU added")
    p.add_argument("--finetune", nargs="?", const="seg,det,ovd", default=None, metavar="TASKS",
                   help="fine-tune backbones on the demo instead (tasks seg,det,ovd; all when none are named): "
                        "segmentation and Mask R-CNN from the CLIP demo's backbone vs a random one, F-ViT "
                        "open-vocabulary detection from FineCLIP's demo backbone vs the backbone before FineCLIP")
    p.add_argument("--start", default=None, metavar="CKPT",
                   help="fineclip/clipself/--finetune: start from this CLIP checkpoint (e.g. runs/demo/best.pt) "
                        "instead of training the CLIP demo first")
    p.add_argument("--output", default=None, help="run folder (default: runs/demo, or runs/demo-METHOD)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo config's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run in --output that the demo did not write (an earlier demo run is always replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. when logging to a file)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra dotted config overrides")


def run(args) -> int:
    from ..demo import run_demo, run_finetune_demo, run_method_demo
    from ..train.interrupt import TrainingStopped

    try:
        if args.finetune:
            if args.method != "clip" or args.steps or args.overrides:
                raise DataError("--finetune runs the tasks' demo recipes as they are: no --method, --steps or "
                                "overrides")
            run_finetune_demo(args.finetune.split(","), args.output or "runs/demo-finetune", overwrite=args.overwrite,
                              progress_bar=not args.no_progress, start=args.start)
        elif args.method == "clip":
            run_demo(args.output or "runs/demo", steps=args.steps, overrides=args.overrides, overwrite=args.overwrite,
                     progress_bar=not args.no_progress)
        else:
            run_method_demo(args.method, args.output or f"runs/demo-{args.method}", steps=args.steps, overrides=args.overrides,
                            overwrite=args.overwrite, progress_bar=not args.no_progress, start=args.start)
    except TrainingStopped as e:
        print(f"{e}; `finegrain demo` starts again from scratch", file=sys.stderr)
        return e.exit_code
    return 0
