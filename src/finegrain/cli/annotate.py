"""``finegrain annotate``: images -> region proposals -> region captions -> region-text records (the CLI side of
:mod:`finegrain.annotate`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import DataError

DESCRIPTION = """\
Turn images into region-text training data (FineCLIP's data step): region proposals, then one caption per
region written by a vision-language model on the region's crop, written as finegrain region-text records in
shards (JSONL, or WebDataset tars with the images) that `finegrain train` reads.

SOURCE is a folder of images, a dataset file finegrain reads (region-text JSONL, open_clip CSV, COCO captions
or instances json, caption list, imagefolder:DIR, demo:train) or WebDataset shards (brace pattern). Image
captions pass through from the source; --caption-images writes one with the captioner where there is none.

Proposers (--proposer):  gt           boxes the source already has (COCO instances), or --boxes FILE
                         torchvision  a torchvision detector (--detector, --weights), or its RPN (--rpn)
                         yolo         ultralytics YOLO (--weights FILE; pip install 'finegrain[yolo]')
                         fastsam      ultralytics FastSAM boxes from its masks (--weights FILE)
Captioners (--captioner): blip2       transformers BLIP-2 (--caption-model, --prompt), bf16 on GPU
                          hf          any transformers image-to-text model (--caption-model, --prompt)
                          template    RegionCLIP's rule: the best concept by a CLIP (--clip-model, --concepts)

Output folder: annotate.json (settings), regions-NNNNNN.jsonl|.tar shards with .stats.json, and when every
shard is done regions.jsonl (jsonl) and summary.json. A killed run continues with --resume (finished shards
are skipped; nothing is lost or written twice). Several processes split the shards: torchrun (RANK,
WORLD_SIZE, LOCAL_RANK picks the GPU) or --num-shards/--shard-id."""

EXAMPLES = """\
examples:
  finegrain annotate demo:train --output runs/annotate-demo --proposer gt --captioner template \\
      --clip-model finegrain-tiny --clip-pretrained runs/demo/best.pt \\
      --concepts "${FINEGRAIN_CACHE:-$HOME/.cache/finegrain}/demo-v3/segmentation_classes.txt"
  finegrain annotate /data/cc3m/{00000..00331}.tar --format wds --output /data/cc3m-regions \\
      --proposer yolo --weights yolov9c.pt --min-score 0.25 --max-regions 20 \\
      --captioner blip2 --caption-model Salesforce/blip2-opt-6.7b-coco --caption-batch-size 64
  torchrun --nproc_per_node 8 -m finegrain annotate /data/coco/captions_train2017.json --root /data/coco/train2017 \\
      --output /data/coco-regions --proposer torchvision --weights DEFAULT --captioner blip2 --resume
  finegrain annotate ... --resume --paper-layout out/paper   # also write FineCLIP's three json files
"""


def add_parser(sub) -> None:
    p = sub.add_parser("annotate", help="images -> region proposals -> region captions -> region-text shards",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder of images, dataset file/spec, or WebDataset shards (brace pattern)")
    p.add_argument("--root", default=None, help="image root of a dataset file (default: the file's folder)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--format", default="jsonl", choices=["jsonl", "wds"],
                   help="jsonl: records only, image paths relative to the source root (default); wds: tar shards "
                        "holding the images too")
    p.add_argument("--images-per-shard", type=int, default=1000,
                   help="images per output shard for file and folder sources (default 1000); a WebDataset "
                        "source keeps its own shards")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output, skipping finished shards (and removing the temporary files a "
                        "killed run left)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the files of an earlier annotation in --output first (only those its annotate.json "
                        "names; other files stay), and replace the --paper-layout files")
    p.add_argument("--num-shards", type=int, default=None,
                   help="processes sharing the work (default: WORLD_SIZE under torchrun, else 1)")
    p.add_argument("--shard-id", type=int, default=None, help="this process's index (default: RANK, else 0)")
    p.add_argument("--paper-layout", default=None, metavar="DIR",
                   help="when every shard is done, also write captions.json, proposals.json and "
                        "region_captions.json (the FineCLIP release's COCO layout) into DIR (existing ones only "
                        "with --overwrite)")

    g = p.add_argument_group("proposals")
    g.add_argument("--proposer", default="gt", choices=["gt", "torchvision", "yolo", "fastsam"])
    g.add_argument("--boxes", default=None, metavar="JSON",
                   help="gt: a COCO instances or panoptic json of the images (default: the source's own boxes)")
    g.add_argument("--boxes-image-dir", default="",
                   help="gt: prefix joined to the json's file_name to match the source's image paths")
    g.add_argument("--detector", default="fasterrcnn_resnet50_fpn_v2", help="torchvision: detection model name")
    g.add_argument("--weights", default=None,
                   help="torchvision: DEFAULT, a weights enum name, a local file, or none (random: tests); "
                        "yolo/fastsam: a local weights file (required)")
    g.add_argument("--rpn", action="store_true", help="torchvision: the RPN's proposals instead of detections")
    g.add_argument("--min-score", type=float, default=0.0, help="drop boxes scoring below this (default 0)")
    g.add_argument("--min-area", type=float, default=64.0, help="drop boxes smaller than this, pixels² (default 64)")
    g.add_argument("--max-area", type=float, default=None, help="drop boxes larger than this, pixels²")
    g.add_argument("--nms-iou", type=float, default=None, help="class-agnostic NMS at this IoU (default: none)")
    g.add_argument("--max-regions", type=int, default=20, help="best boxes kept per image (default 20)")

    g = p.add_argument_group("captions")
    g.add_argument("--captioner", default="blip2", choices=["blip2", "hf", "template"])
    g.add_argument("--caption-model", default="Salesforce/blip2-opt-6.7b-coco",
                   help="blip2/hf: a transformers checkpoint, local folder or hub id (default: the paper's "
                        "%(default)s)")
    g.add_argument("--prompt", default="Describe this image in one sentence.",
                   help="blip2/hf: the prompt (default: FineCLIP's '%(default)s'; '' for none)")
    g.add_argument("--max-new-tokens", type=int, default=30)
    g.add_argument("--caption-batch-size", type=int, default=32, help="crops per captioner call (default 32)")
    g.add_argument("--clip-model", default="ViT-B-16", help="template: the CLIP scoring the concepts")
    g.add_argument("--clip-pretrained", default=None, help="template: open_clip tag or checkpoint file")
    g.add_argument("--concepts", default=None,
                   help="template: concept list: a file (one per line) or a built-in class list (imagenet, "
                        "ade20k-150, pascal-context-59)")
    g.add_argument("--template", default="a photo of a {}.", help="template: caption template (default '%(default)s')")
    g.add_argument("--caption-images", action="store_true",
                   help="write an image caption with the captioner where the source has none")
    g.add_argument("--crop-scale", type=float, default=1.0,
                   help="a region's crop is its box enlarged this many times (default 1)")
    g.add_argument("--keep-empty", action="store_true", help="also write images left without regions")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when there is a GPU) | cpu | cuda[:N]")
    g.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"],
                   help="captioner weights (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--batch-size", type=int, default=16, help="images per proposer call (default 16)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _process_slot(args) -> tuple[int, int]:
    """``(shard_id, num_shards)`` from the flags, else torchrun's RANK / WORLD_SIZE."""
    count = args.num_shards if args.num_shards is not None else int(os.environ.get("WORLD_SIZE", "1"))
    index = args.shard_id if args.shard_id is not None else int(os.environ.get("RANK", "0"))
    if count < 1 or not 0 <= index < count:
        raise DataError(f"need 0 <= --shard-id < --num-shards, got {index} and {count}")
    return index, count


def build_proposer_from_args(args, device: str):
    from ..annotate.proposers import build_proposer

    if args.proposer == "gt":
        return build_proposer("gt", boxes=args.boxes, image_dir=args.boxes_image_dir)
    if args.proposer == "torchvision":
        return build_proposer("torchvision", model=args.detector, weights=args.weights or "DEFAULT", rpn=args.rpn,
                              device=device, batch_size=args.batch_size)
    if not args.weights:
        raise DataError(f"--proposer {args.proposer} needs --weights FILE (ultralytics weights)")
    return build_proposer(args.proposer, weights=args.weights, device=device, batch_size=args.batch_size)


def build_captioner_from_args(args, device: str):
    from ..annotate.captioners import build_captioner

    if args.captioner == "template":
        if args.concepts is None:
            raise DataError("--captioner template needs --concepts (a file or a built-in list)")
        return build_captioner("template", model_name=args.clip_model, pretrained=args.clip_pretrained,
                               concepts=args.concepts, template=args.template,
                               batch_size=args.caption_batch_size, device=device, progress=not args.no_progress)
    precision = args.precision or ("bf16" if device.startswith("cuda") else "fp32")
    return build_captioner(args.captioner, checkpoint=args.caption_model, prompt=args.prompt or None,
                           max_new_tokens=args.max_new_tokens, batch_size=args.caption_batch_size, device=device,
                           precision=precision)


def run(args) -> int:
    from ..annotate.base import ProposalFilter
    from ..annotate.output import AnnotationOutput, check_paper_layout, export_paper_layout, read_output
    from ..annotate.pipeline import Annotator, run_annotation
    from ..annotate.sources import ImageSource

    shard_id, num_shards = _process_slot(args)
    if args.overwrite and num_shards > 1:
        raise DataError("--overwrite with several processes would delete each other's shards; empty the "
                        "output folder first, or choose a new one")
    if args.paper_layout:
        check_paper_layout(args.paper_layout, args.overwrite)
    source = ImageSource(args.source, args.root, args.images_per_shard)
    from ..devices import pick_device

    device = str(pick_device(args.device))
    annotator = Annotator(
        build_proposer_from_args(args, device), build_captioner_from_args(args, device),
        ProposalFilter(args.min_score, args.min_area, args.max_area, args.nms_iou, args.max_regions),
        crop_scale=args.crop_scale, caption_images=args.caption_images, keep_empty=args.keep_empty,
        batch_size=args.batch_size)
    settings = {"source": args.source, "root": args.root, "images_per_shard": args.images_per_shard,
                **annotator.settings()}
    mine = range(shard_id, source.units, num_shards)
    output = AnnotationOutput(args.output, args.format, settings, source.units, mine, args.resume, args.overwrite)
    counts, summary = run_annotation(source, annotator, output, mine, progress=not args.no_progress)
    print(f"annotate: this process ({shard_id + 1} of {num_shards}): {counts.summary()}")
    if source.passed_over_summary():
        print(f"annotate: passed over {source.passed_over_summary()}")
    if summary is None:
        print(f"annotate: other processes' shards are not finished yet; {args.output} is complete when they are")
        return 0
    print(f"annotate: all {source.units} shard(s) finished: {summary['images']} images, {summary['regions']} "
          f"regions; train with data.train.path={output.training_source()}"
          + (f" data.train.root={source.root}" if args.format == "jsonl" else ""))
    if summary.get("left_out"):
        print(f"annotate: left out {len(summary['left_out'])} unreadable image(s) or malformed record(s), "
              f"each with its reason in {Path(args.output) / 'summary.json'}")
    if args.paper_layout:
        written = export_paper_layout(read_output(args.output), args.paper_layout)
        print(f"annotate: wrote the paper layout to {args.paper_layout}: {written}")
    return 0
