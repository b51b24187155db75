"""Options that several commands share."""

from __future__ import annotations

import argparse


def add_config_args(p: argparse.ArgumentParser, config_help: str | None = None) -> None:
    p.add_argument("--config", default=None,
                   help=config_help or "built-in config name (e.g. 'demo') or a YAML path; defaults apply when omitted")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="the data root that a config's data paths name as {data} (the fine-tuning recipes do)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. optim.lr=1e-4 train.steps=200 data.train.path=data/train.jsonl")


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a finegrain training checkpoint")
    src.add_argument("--model", help="an open_clip / finegrain model name (with --pretrained)")
    p.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint file for --model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", nargs="+", default=None, metavar="FILE", help="image files")
    p.add_argument("--data", default=None, help="or a dataset (JSONL, COCO json, demo:val, ...): its first images")
    p.add_argument("--max-images", type=int, default=4, help="images taken from --data (default 4)")
