"""``finegrain eval``: built-in benchmarks, protocols on your data, eval configs, runs side by side."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import DataError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint or an open_clip model: the papers' benchmarks, or any protocol on your data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run built-in benchmarks (--benchmark, data under --data-root; `--list` shows them), a "
                    "protocol on your own data (--task + --data), or the jobs of an eval config (--config). "
                    "Each result is printed, appended to OUTPUT_DIR/results.jsonl and written to "
                    "OUTPUT_DIR/<benchmark>.json. `--table RUN...` prints runs side by side.",
        epilog="protocols (--task) and their data (--data):\n"
               "  retrieval           captioned records: JSONL, CSV, COCO captions json, a caption list json,\n"
               "                      karpathy:dataset_coco.json@test   (R@1/5/10 both ways)\n"
               "  zero_shot           labelled images: imagefolder:DIR, or labelled records (acc1/acc5/"
               "mean_per_class_recall)\n"
               "  box_classification  records with labelled regions (RoI and crop; acc/macc)\n"
               "  panoptic_boxes      a COCO panoptic json (PNGs in the folder of the same name); --images: the\n"
               "                      image folder (RoI, crop and mask pooling; macc1/5 all, thing, stuff)\n"
               "  segmentation        a segmentation folder: a preset (ade20k-150, pascal-context-59) or a folder\n"
               "                      with --option images=DIR labels=DIR class_names=FILE (mIoU, mAcc)\n"
               "  linear_probe        the same, with a train split (train_split=...): BN + 1x1 conv on frozen\n"
               "                      blocks, trained as a finetune-seg run in OUTPUT_DIR (mIoU)\n"
               "options (--option KEY=VALUE, YAML values) are the protocol's keyword arguments, e.g.\n"
               "  templates=openai|detailclip|vild|simple|FILE  class_names=imagenet|ade20k-150|FILE\n"
               "  resize=squash|longest image_size=1024 ways=[roi,crop,mask]  inference=slide|whole short_side=448\n"
               "  iterations=2000 lr=7e-4 blocks=[3,5,7,11]\n"
               "examples:\n"
               "  finegrain eval --model ViT-B-16 --pretrained openai --benchmark coco-panoptic --data-root /data/coco\n"
               "  finegrain eval --checkpoint runs/ft/best.pt --benchmark imagenet-1k --data-root /data/imagenet\n"
               "  finegrain eval --checkpoint runs/demo/best.pt --benchmark demo-retrieval,demo-boxes,demo-segmentation\n"
               "  finegrain eval --checkpoint best.pt --task zero_shot --data imagefolder:/data/pets "
               "--option templates=pets_templates.txt\n"
               "  finegrain eval --table runs/clip runs/fineclip")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a finegrain training checkpoint (step_*.pt, best.pt)")
    src.add_argument("--model", help="an open_clip / finegrain model name (with --pretrained)")
    p.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint file for --model")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--benchmark", help="comma-separated built-in benchmark names (see --list)")
    what.add_argument("--task", "--tasks", dest="task",
                      help="comma-separated protocols run on --data: retrieval, zero_shot, box_classification, "
                           "panoptic_boxes, segmentation, linear_probe")
    what.add_argument("--config", dest="eval_config", metavar="FILE",
                      help="an eval config YAML: model, data_root and a list of benchmarks/jobs")
    what.add_argument("--table", nargs="+", metavar="RUN", help="print the results of these runs (run folders, "
                      "eval folders or results files) side by side, and exit")
    what.add_argument("--list", action="store_true", help="list the built-in benchmarks and exit")
    p.add_argument("--data", default=None, help="--task's data (see below); relative to --data-root if given")
    p.add_argument("--data-root", default=None, help="dataset root of --benchmark / --data")
    p.add_argument("--images", "--root", dest="images", default="",
                   help="image folder, relative to --data-root (default: the data file's folder)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a protocol option (repeatable), overriding the benchmark's defaults")
    p.add_argument("--output-dir", default=None,
                   help="where results go (default: the checkpoint's run folder /eval, else runs/eval/<model>)")
    p.add_argument("--output", default=None, help="also write all metrics, as task/metric keys, to this JSON file")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype of the model's forward passes (metrics are computed in fp32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON line instead of a table")


def _eval_jobs(args):
    """The jobs of ``finegrain eval`` and the model section of its eval config (empty without one)."""
    from ..eval.jobs import EvalJob, benchmark_job, load_eval_config, parse_options

    options = parse_options(args.option)
    if args.eval_config:
        model, jobs = load_eval_config(args.eval_config)
        for job in jobs:
            job.options.update(options)
        return model, jobs
    if args.benchmark:
        return {}, [benchmark_job(name, args.data_root, options) for name in args.benchmark.split(",")]
    if not args.task or not args.data:
        raise DataError("say what to evaluate: --benchmark NAMES, --task PROTOCOLS with --data, or --config FILE")
    return {}, [EvalJob(task, task, args.data, args.data_root, args.images, dict(options))
                for task in args.task.split(",")]


def _eval_output_dir(args, model_section) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    checkpoint, name, pretrained = (model_section.get(key) for key in ("checkpoint", "name", "pretrained"))
    if checkpoint:
        return Path(checkpoint).parent / "eval"
    tag = f"-{Path(pretrained).stem if os.sep in pretrained or '.' in pretrained else pretrained}" if pretrained else ""
    return Path("runs") / "eval" / f"{name}{tag}"


def run(args) -> int:
    if args.list:
        from ..eval.benchmarks import benchmark_help

        print(benchmark_help())
        return 0
    if args.table:
        from ..eval.results import compare_runs

        print(compare_runs(args.table))
        return 0
    import functools

    import open_clip
    import torch

    from ..eval.jobs import run_jobs
    from ..eval.results import append_result
    from ..models import get_tokenizer
    from ..predict import load_model
    from ..train.report import format_metrics

    model_section, jobs = _eval_jobs(args)
    if args.checkpoint or args.model:  # the command line's model replaces the eval config's
        model_section = {"checkpoint": args.checkpoint, "name": args.model, "pretrained": args.pretrained}
    checkpoint, name, pretrained = (model_section.get(key) for key in ("checkpoint", "name", "pretrained"))
    if not checkpoint and not name:
        raise DataError("say which model: --checkpoint FILE or --model NAME [--pretrained TAG|FILE]")
    from ..devices import pick_device

    device = pick_device(args.device)
    if not checkpoint and pretrained is None:
        print(f"finegrain eval: note: no --pretrained: evaluating a randomly initialised {name}", file=sys.stderr)
    model = load_model(checkpoint, name, pretrained, device)
    info = {"checkpoint": str(checkpoint)} if checkpoint else {"pretrained": pretrained}
    info = {"model": model.name, **info}
    pp = open_clip.get_model_preprocess_cfg(model.clip)
    transform = open_clip.image_transform(model.image_size, is_train=False, mean=pp["mean"], std=pp["std"])
    autocast = None
    if args.precision != "fp32":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        autocast = functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
    output_dir = _eval_output_dir(args, model_section)
    metrics: dict[str, float] = {}

    def report(entry) -> None:
        append_result(output_dir, entry)
        metrics.update({f"{entry['benchmark']}/{key}": value for key, value in entry["metrics"].items()})
        if not args.json:
            print(format_metrics({f"{entry['benchmark']}/{k}": v for k, v in entry["metrics"].items()}))
            print(f"({entry['seconds']:.1f} s; appended to {output_dir / 'results.jsonl'})")

    from ..linear_probe import run_linear_probe

    probe = functools.partial(run_linear_probe, model_name=model.name, pretrained=checkpoint or pretrained,
                              image_size=max(model.image_size), output_dir=output_dir, batch_size=args.batch_size,
                              device=args.device, precision=args.precision, progress=not args.no_progress)
    run_jobs(model, jobs, get_tokenizer(model.name), transform, info, batch_size=args.batch_size, device=device,
             progress=not args.no_progress, autocast=autocast, on_result=report, runners={"linear_probe": probe})
    if args.json:
        print(json.dumps(metrics))
    if args.output:
        Path(args.output).write_text(json.dumps(metrics, indent=2))
    return 0
