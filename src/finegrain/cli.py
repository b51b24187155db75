"""The ``finegrain`` command. ``finegrain <command> --help`` documents each command."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

from .errors import DataError

EPILOG = """examples:
  finegrain demo                                   # train + evaluate a tiny CLIP on built-in data (CPU, minutes)
  finegrain train --config demo train.steps=500 optim.lr=5e-4
  torchrun --nproc_per_node 2 -m finegrain train --config my.yaml
  finegrain train --config my.yaml --resume latest
  finegrain finetune --task seg --data /data/ade --pretrained runs/demo/best.pt   # UperNet on ADE20K
  finegrain eval --checkpoint runs/demo/best.pt --benchmark demo-retrieval,demo-boxes,demo-segmentation
  finegrain eval --model ViT-B-16 --pretrained openai --benchmark coco-panoptic --data-root /data/coco
  finegrain eval --table runs/clip runs/fineclip       # evaluations of several runs side by side
  finegrain export --checkpoint runs/demo/best.pt --output exported/   # open_clip local-dir:
  finegrain models --dense-only                    # model names with the dense API, and their pretrained tags
  finegrain annotate /data/images --output regions/ --proposer torchvision --weights DEFAULT --captioner blip2
  finegrain convert --captions cap.json --regions proposals.json --region-captions region_cap.json --output t.jsonl
  finegrain embed-text --config my.yaml --output text_cache/   # the frozen text tower's embeddings, once

errors in your input are one line, a bug in finegrain shows its traceback; FINEGRAIN_DEBUG=1: all tracebacks
"""
# the recipe `finegrain finetune --task T --head H` runs (the first head of a task is its default)
FINETUNE_RECIPES = {("seg", "upernet"): "seg-upernet-ade20k-vitb16", ("seg", "linear"): "seg-linear-ade20k-vitb16",
                    ("det", "maskrcnn"): "det-maskrcnn-coco-vitb16", ("ovd", "fvit"): "ovd-fvit-ovcoco-eva02-b16"}
# what a command reports as one line "finegrain <command>: error: ...": bad input (a file, record, field, config
# key, checkpoint or option: DataError), a file that cannot be read or written (OSError: missing, permission
# denied, disk full), YAML syntax, a missing optional extra (ImportError naming the pip extra), and CUDA out of
# memory (user_error). Any other exception is a bug in finegrain: main() names it as one and lets it propagate
# with its traceback.
USER_ERRORS = (DataError, OSError, ImportError, yaml.YAMLError)


def user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (:data:`USER_ERRORS`, or torch's CUDA out-of-memory error, looked
    up only when torch is already imported, as it is once a GPU ran out of memory) rather than a bug."""
    if isinstance(error, USER_ERRORS):
        return True
    out_of_memory = getattr(getattr(sys.modules.get("torch"), "cuda", None), "OutOfMemoryError", None)
    return out_of_memory is not None and isinstance(error, out_of_memory)


def _add_config_args(p: argparse.ArgumentParser, config_help: str | None = None) -> None:
    p.add_argument("--config", default=None,
                   help=config_help or "built-in config name (e.g. 'demo') or a YAML path; defaults apply when omitted")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="the data root that a config's data paths name as {data} (the fine-tuning recipes do)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=1e-4 train.steps=200 data.train.path=data/train.jsonl")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finegrain", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Fine-grained vision-language pretraining on open_clip models: train, evaluate, export.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="command")

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

    p = sub.add_parser("train", help="train from a YAML config with dotted overrides",
                       description="Train per a config. Single process, or DDP under torchrun or srun "
                                   "(SLURM's variables give the ranks). The merged "
                                   "config, run provenance, checkpoints (step_*.pt, best.pt), metrics.jsonl "
                                   "and loss.png go to train.output_dir. Ctrl-C, SIGTERM or SIGUSR1 stops at a "
                                   "step boundary (distributed: the next multiple of train.log_every) with a "
                                   "checkpoint and exits with 130 (SIGINT), 143 (SIGTERM) or 138 (SIGUSR1); a "
                                   "second Ctrl-C aborts at once.")
    _add_config_args(p)
    p.add_argument("--resume", default=None, metavar="latest|auto|PATH",
                   help="continue from the newest checkpoint in train.output_dir ('latest'), or from a file; "
                        "'auto': the newest checkpoint when there is one, else a fresh run (for jobs a "
                        "scheduler requeues: the same command starts and resumes)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a status line about 20 times a run instead (train.print_every)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the result (after the table)")

    p = sub.add_parser(
        "finetune", help="fine-tune a backbone with a dense head: segmentation, detection, open-vocabulary detection",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune the vision tower of a finegrain or open_clip checkpoint into a segmenter (UperNet or "
                    "linear head), a Mask R-CNN detector, or an F-ViT open-vocabulary detector, by a shipped "
                    "recipe: `finegrain train` with that recipe (same run folder, DDP, resume, logging); the "
                    "held-out scores go to OUTPUT/eval (`finegrain eval --table`).",
        epilog="recipes (--task, --head -> config; any --config works too):\n" + "\n".join(
            f"  --task {task:<4} --head {head:<8} {recipe}" for (task, head), recipe in FINETUNE_RECIPES.items()))
    _add_config_args(p, "a recipe or YAML path instead of the --task/--head default")
    p.add_argument("--task", choices=sorted({task for task, _ in FINETUNE_RECIPES}), default=None,
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

    from .viz_commands import add_viz_parser

    add_viz_parser(sub)

    from .annotate_commands import add_annotate_parser

    add_annotate_parser(sub)

    p = sub.add_parser("export", help="export a checkpoint as an open_clip local-dir model",
                       description="Write open_clip_config.json + open_clip_model.safetensors, loadable with "
                                   "open_clip.create_model('local-dir:DIR') and clip_benchmark --model local-dir:DIR.")
    p.add_argument("--checkpoint", required=True, help="a finegrain training checkpoint")
    p.add_argument("--output", required=True, help="output folder")

    p = sub.add_parser("config", help="print a config after overrides (checks keys and types)",
                       description="Print the merged config. Errors in keys, types or cross-field settings, "
                                   "and train.eval_tasks that data.val's records cannot serve, fail; data files "
                                   "that do not exist (yet) are warnings. --sources prints instead where each value "
                                   "of a recipe comes from (its source comments) as a Markdown table.")
    _add_config_args(p)
    p.add_argument("--sources", action="store_true",
                   help="the recipe's values with their sources (release file:line, README command) and its "
                        "legend, as a Markdown table")
    p.add_argument("--base", metavar="RECIPE", help="with --sources: only the values or sources that differ from RECIPE")
    p = sub.add_parser("models", help="list model names create_model accepts, with dense support and tags",
                       description="Every model name (open_clip's and finegrain's), its parameters (counted "
                                   "from the config for open_clip's standard ViT and text towers, '-' for other "
                                   "towers), its input size, whether the dense API (encode_dense, encode_boxes, "
                                   "...) supports it or why not, and its open_clip pretrained tags.")
    p.add_argument("--dense-only", action="store_true", help="only models the dense API supports")
    sub.add_parser("methods", help="list training methods and loss terms (finegrain's and those installed packages "
                                   "declare)")

    p = sub.add_parser("convert", help="convert FineCLIP's COCO layout (3 json files) to region-text JSONL, or "
                                       "a released FineCLIP / CLIPSelf / DetailCLIP checkpoint to a finegrain one",
                       description="Two modes. Checkpoint: --checkpoint RELEASED.pt --model NAME --output OUT.pt "
                                   "converts a released FineCLIP / CLIPSelf (EVA-CLIP keys; --model EVA02-B-16 or "
                                   "EVA02-L-14-336, or the release's names EVA02-CLIP-B-16 / EVA02-CLIP-L-14-336) "
                                   "or DetailCLIP (--model detailclip-timm-vit-b-16) checkpoint by "
                                   "key into a finegrain checkpoint ({'state_dict': open_clip state dict, "
                                   "'model_name'}); unknown or missing keys are an error listing them. "
                                   "Data: read the layout of the FineCLIP / CLIPSelf releases: COCO captions json, "
                                   "COCO-format proposals (or instances) json with bbox [x, y, w, h], and the "
                                   "region-caption json keyed '<file_name>_<int x>_<int y>_<int w>_<int h>.jpg'. "
                                   "Write one region-text record per image of the proposals json: all its "
                                   "captions, its boxes (xyxy) with their region captions. Boxes without a "
                                   "region caption are kept without one and counted; images without a caption "
                                   "are skipped and counted. The same files train directly with "
                                   "data.train.path=<captions> data.train.regions=<proposals> "
                                   "data.train.region_captions=<region captions> data.train.root=<image folder>.")
    p.add_argument("--checkpoint", help="checkpoint mode: a released FineCLIP / CLIPSelf / DetailCLIP .pt file")
    p.add_argument("--model", help="checkpoint mode: the target model name or JSON config")
    p.add_argument("--captions", help="data mode: COCO captions json, e.g. captions_train2017.json")
    p.add_argument("--regions", help="data mode: COCO-format proposals or instances json (category ids unused)")
    p.add_argument("--region-captions", help="data mode: json object: region key -> caption")
    p.add_argument("--image-dir", default="",
                   help="folder prefixed to each file_name so image paths are relative to the dataset root "
                        "(the output's folder unless data.*.root says otherwise), e.g. train2017")
    p.add_argument("--output", required=True, help="region-text JSONL file (data mode) or .pt file (checkpoint mode)")

    p = sub.add_parser("embed-text", help="precompute the text tower's embeddings of every caption of a config",
                       description="Run the config's model's text tower (eval, no grad) once over every distinct "
                                   "caption and region caption of data.train and data.val (region labels too "
                                   "when the method uses them as region text), and write a text cache: "
                                   "embeddings.npy (N, D) float16 L2-normalised, hashes.npy (N,) uint64 sorted "
                                   "(blake2b-64 of each text), meta.json (model, pretrained, embed dim, context "
                                   "length, count, a probe embedding). A method whose sample spec names the "
                                   "folder (text_cache) then trains without the text tower; the trainer checks "
                                   "that the cache was made by the model being trained. A model without "
                                   "pretrained weights is initialised as `finegrain train` does (train.seed).")
    _add_config_args(p)
    p.add_argument("--output", required=True, help="cache folder (its files are replaced)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per forward (default: 256)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resume_command(args) -> str:
    """The command line that continues this training run from its newest checkpoint."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch = (["torchrun", "--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", str(world)), "-m"]
              if world > 1 else [])
    config = ["--config", args.config] if args.config else []
    return shlex.join([*launch, "finegrain", "train", *config, *args.overrides, "--resume", "latest"])


def cmd_train(args) -> int:
    from .config import load_config
    from .train.distributed import cleanup
    from .train.interrupt import TrainingStopped
    from .train.preflight import adopt_checkpoint_model
    from .train.report import format_metrics
    from .train.trainer import train

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


def _eval_jobs(args):
    """The jobs of ``finegrain eval`` and the model section of its eval config (empty without one)."""
    from .eval.jobs import EvalJob, benchmark_job, load_eval_config, parse_options

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


def cmd_eval(args) -> int:
    if args.list:
        from .eval.benchmarks import benchmark_help

        print(benchmark_help())
        return 0
    if args.table:
        from .eval.results import compare_runs

        print(compare_runs(args.table))
        return 0
    import functools

    import open_clip
    import torch

    from .eval.jobs import run_jobs
    from .eval.results import append_result
    from .models import create_model, get_tokenizer, model_from_checkpoint
    from .train.report import format_metrics

    model_section, jobs = _eval_jobs(args)
    if args.checkpoint or args.model:  # the command line's model replaces the eval config's
        model_section = {"checkpoint": args.checkpoint, "name": args.model, "pretrained": args.pretrained}
    checkpoint, name, pretrained = (model_section.get(key) for key in ("checkpoint", "name", "pretrained"))
    if not checkpoint and not name:
        raise DataError("say which model: --checkpoint FILE or --model NAME [--pretrained TAG|FILE]")
    from .train.distributed import pick_device

    device = pick_device(args.device)
    if checkpoint:
        model, info = model_from_checkpoint(checkpoint, device=device), {"checkpoint": str(checkpoint)}
    else:
        if pretrained is None:
            print(f"finegrain eval: note: no --pretrained: evaluating a randomly initialised {name}", file=sys.stderr)
        model, info = create_model(name, pretrained, device=device), {"pretrained": pretrained}
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

    from .linear_probe import run_linear_probe

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


def cmd_export(args) -> int:
    from .models import export_local_dir, model_from_checkpoint

    out = export_local_dir(model_from_checkpoint(args.checkpoint), args.output)
    print(f"exported to {out}; load with open_clip.create_model('local-dir:{out}')")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo, run_finetune_demo, run_method_demo
    from .train.interrupt import TrainingStopped

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


def cmd_finetune(args) -> int:
    """``finegrain train`` with the recipe of ``--task`` / ``--head`` (or ``--config``) and the options as
    overrides."""
    if args.config is None:
        if args.task is None:
            raise DataError("say what to fine-tune: --task seg|det|ovd (or --config RECIPE)")
        heads = [head for task, head in FINETUNE_RECIPES if task == args.task]
        head = args.head or heads[0]
        if (args.task, head) not in FINETUNE_RECIPES:
            raise DataError(f"--task {args.task} has heads {heads}, not {head!r}")
        args.config = FINETUNE_RECIPES[args.task, head]
    elif args.task or args.head:
        raise DataError("give --config or --task/--head, not both")
    given = [f"model.pretrained={args.pretrained}"] if args.pretrained else []
    given += [f"train.output_dir={args.output}"] if args.output else []
    args.overrides = [*given, *args.overrides]
    return cmd_train(args)


def cmd_config(args) -> int:
    from .config import ConfigError, config_to_yaml, load_config
    from .objectives import complete_method_options
    from .train.preflight import check_data_paths, check_eval_data

    if args.sources or args.base:
        from .recipe_sources import markdown_table

        if not args.config or args.overrides:
            raise DataError("--sources shows a recipe file as written: give --config NAME (and no overrides)")
        print(markdown_table(args.config, args.base))
        return 0

    cfg = complete_method_options(load_config(args.config, args.overrides, args.data))
    try:
        check_data_paths(cfg)
    except ConfigError as e:
        missing = e
    else:
        missing = None
        check_eval_data(cfg)  # the held-out data is there: it must suit train.eval_tasks
    print(config_to_yaml(cfg), end="")
    if missing:
        print(f"finegrain config: warning: {missing}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    import open_clip

    from .models.factory import dense_support, list_models, model_config, parameter_count
    from .tables import format_table

    rows = []
    for name in list_models():
        cfg = model_config(name)
        reason = dense_support(cfg)
        if reason is None or not args.dense_only:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "-"
            count = parameter_count(cfg)
            size = cfg.get("vision_cfg", {}).get("image_size", "-")
            rows.append([name, "-" if count is None else f"{count / 1e6:.1f}M",
                         "x".join(map(str, size)) if isinstance(size, (list, tuple)) else str(size),
                         "yes" if reason is None else f"no: {reason}", tags])
    print(format_table(["model", "params", "input", "dense API", "pretrained tags"], rows, right=(1, 2)))
    return 0


def cmd_methods(args) -> int:
    from .plugins import method_entry_points, term_entry_points

    methods, terms = sorted(method_entry_points()), sorted(term_entry_points())  # declared: nothing is imported
    if not methods or not terms:  # finegrain run from a source tree without its installed metadata
        from .objectives import list_methods, list_terms

        methods, terms = list_methods(), list_terms()
    print("\n".join(methods))
    print("\nterms (a method of its own, or joined to methods and terms with +, e.g. fineclip+detailclip):")
    print("\n".join(f"  {name}" for name in terms))
    return 0


def cmd_convert(args) -> int:
    data_args = [a for a in ("captions", "regions", "region_captions") if getattr(args, a)]
    if args.checkpoint:
        if data_args or args.image_dir:
            raise DataError("give either --checkpoint (with --model) or --captions/--regions/--region-captions, "
                            "not both")
        if not args.model:
            raise DataError("--checkpoint needs --model, the target model (e.g. EVA02-B-16)")
        return _convert_checkpoint(args.checkpoint, args.model, args.output)
    missing = [f"--{a.replace('_', '-')}" for a in ("captions", "regions", "region_captions") if a not in data_args]
    if missing or args.model:
        raise DataError(f"data mode needs --captions, --regions and --region-captions (missing: "
                        f"{', '.join(missing) or 'none'}); --model goes with --checkpoint")
    from .data.coco_regions import read_coco_region_text
    from .data.records import write_jsonl

    records, summary = read_coco_region_text(args.captions, args.regions, args.region_captions, args.image_dir)
    write_jsonl(records, args.output)
    print(f"wrote {args.output}: {summary}")
    return 0


def _convert_checkpoint(source: str, name: str, output: str) -> int:
    from . import __version__
    from .models import create_model
    from .models.released import detect_format, read_released
    from .train.checkpoint import save_atomic

    state = read_released(source)
    if state is None:
        raise DataError(f"{source} is not a released FineCLIP / CLIPSelf (EVA-CLIP) or DetailCLIP checkpoint")
    model = create_model(name, pretrained=source)  # converts by key (models/released.py)
    model_name, clip = model.name, model.clip
    save_atomic({"state_dict": clip.state_dict(), "model_name": model_name, "config": {"model": {"name": name}},
                 "source": {"path": str(source), "format": detect_format(state)}, "finegrain_version": __version__},
                output)
    print(f"wrote {output}: {detect_format(state)} checkpoint {source} as {model_name}")
    return 0


def cmd_embed_text(args) -> int:
    import itertools

    from .config import load_config
    from .data.text_cache import source_texts, write_text_cache
    from .models import create_model, get_tokenizer
    from .objectives import create_method
    from .train.preflight import check_data_paths
    from .train.trainer import seed_everything

    cfg = load_config(args.config, args.overrides, args.data)
    check_data_paths(cfg)
    from .train.distributed import pick_device

    device = pick_device(args.device)
    seed_everything(cfg.train.seed)  # a randomly initialised model starts as `finegrain train`'s (rank 0)
    model = create_model(cfg.model.name, cfg.model.pretrained, image_size=cfg.model.image_size)
    labels = create_method(cfg.method.name, cfg.method.options, model).sample_spec().label_as_region_text
    model = model.to(device).eval()
    texts = itertools.chain.from_iterable(source_texts(src, labels) for src in (cfg.data.train, cfg.data.val) if src)
    meta = write_text_cache(args.output, texts, lambda tokens: model.encode_text(tokens.to(device)),
                            get_tokenizer(cfg.model.name), {"model": cfg.model.name, "pretrained": cfg.model.pretrained,
                                                            "context_length": model.context_length},
                            batch_size=args.batch_size, progress=not args.no_progress)
    print(f"wrote {meta['count']} distinct text embeddings ({meta['embed_dim']}-d) to {args.output}")
    return 0


def cmd_viz(args) -> int:
    from .viz_commands import cmd_viz as run

    return run(args)


def cmd_annotate(args) -> int:
    from .annotate_commands import cmd_annotate as run

    return run(args)


COMMANDS = {"train": cmd_train, "finetune": cmd_finetune, "eval": cmd_eval, "export": cmd_export, "viz": cmd_viz, "demo": cmd_demo,
            "config": cmd_config, "models": cmd_models, "methods": cmd_methods, "convert": cmd_convert,
            "embed-text": cmd_embed_text, "annotate": cmd_annotate}


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a KeyError's without the quotes ``str`` adds; of an error a data
    loader worker raised, only the original message, not the worker's traceback that torch puts before it)."""
    text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = re.split(rf"\n(?:[\w.]+\.)?{type(error).__name__}: ", text)[-1]
    return " ".join(text.split()) or type(error).__name__


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides may stand on both sides of options
    (``train model.name=X --no-progress train.steps=1``), as with argparse's intermixed parsing: argparse
    takes the first run of them, and the later ones, returned unparsed, are appended here in order. An unknown
    option is an error of the (sub)command it was given to, with the closest of its options (``--confg``: did
    you mean --config?)."""
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        command = parser
        while True:  # down to the subcommand the arguments chose
            chosen = [a for a in command._actions if isinstance(a, argparse._SubParsersAction)]
            name = getattr(args, chosen[0].dest, None) if chosen else None
            if name is None:
                break
            command = chosen[0].choices[name]
        options = [option for action in command._actions for option in action.option_strings]
        hints = []
        for arg in stray:
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1) if arg.startswith("-") else []
            hints.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
        command.error(f"unrecognized arguments: {' '.join(hints)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; return the exit status: 0 done, 2 an error in the user's input (one line
    ``finegrain <command>: error: ...`` on stderr; argparse's usage errors also exit 2), 130 Ctrl-C, 141 a
    closed pipe. Any other exception is a bug: one line ``finegrain <command>: internal error (a bug in
    finegrain): <Type>: <message>; the traceback follows`` on stderr, then the exception propagates with its
    traceback (``python -m finegrain`` and the ``finegrain`` script then exit 1). ``FINEGRAIN_DEBUG=1``
    shows the traceback of every error."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    debug = bool(os.environ.get("FINEGRAIN_DEBUG"))
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"finegrain {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`finegrain models | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if not user_error(e):  # a bug in finegrain: say so in one line, then its traceback (exit status 1)
            print(f"finegrain {args.command}: internal error (a bug in finegrain): {type(e).__name__}: "
                  f"{one_line(e)}; the traceback follows", file=sys.stderr)
            raise
        if debug:
            raise
        print(f"finegrain {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
