"""``finegrain train``: train per a config, single process or distributed."""

from __future__ import annotations

import json
import os
import shlex
import sys

from .common import add_config_args


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train from a YAML config with dotted overrides",
                       description="Train per a config. Single process, or DDP under torchrun or srun "
                                   "(SLURM's variables give the ranks). The merged "
                                   "config, run provenance, checkpoints (step_*.pt, best.pt), metrics.jsonl "
                                   "and loss.png go to train.output_dir. Ctrl-C, SIGTERM or SIGUSR1 stops at a "
                                   "step boundary (distributed: the next multiple of train.log_every) with a "
                                   "checkpoint and exits with 130 (SIGINT), 143 (SIGTERM) or 138 (SIGUSR1); a "
                                   "second Ctrl-C aborts at once.")
    add_config_args(p)
    p.add_argument("--resume", default=None, metavar="latest|auto|PATH",
                   help="continue from the newest checkpoint in train.output_dir ('latest'), or from a file; "
                        "'auto': the newest checkpoint when there is one, else a fresh run (for jobs a "
                        "scheduler requeues: the same command starts and resumes)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a status line about 20 times a run instead (train.print_every)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the result (after the table)")


def resume_command(args) -> str:
    """The command line that continues this training run from its newest checkpoint."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = (["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(world)), "-m"]
              if world > 1 else [])
    config = ["--config", args.config] if args.config else []
    return shlex.join([*launch, "finegrain", "train", *config, *args.overrides, "--resume", "latest"])


def run(args) -> int:
    from ..config import load_config
    from ..train.distributed import cleanup
    from ..train.interrupt import TrainingStopped
    from ..train.preflight import adopt_checkpoint_model
    from ..train.report import format_metrics
    from ..train.trainer import train

    cfg = load_config(args.config, args.overrides, args.data)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    cfg, adopted = adopt_checkpoint_model(cfg, forced=any(o.startswith("model.name=") for o in args.overrides))
    if adopted and main_rank:
        print(adopted)
    try:
        result = train(cfg, resume=args.resume, progress_bar=not args.no_progress)
    except TrainingStopped as e:
        if main_rank:
            print(f"{e}; resume with: {resume_command(args)}", file=sys.stderr)
        return e.exit_code
    finally:
        cleanup()
    if main_rank:
        print(f"trained to step {result.step}; run folder {result.output_dir}")
        if result.eval_metrics:
            print(format_metrics(result.eval_metrics))
        if args.json:
            print(json.dumps({"output_dir": str(result.output_dir), "step": result.step,
                              "eval": result.eval_metrics}))
    return 0
