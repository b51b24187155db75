"""Named benchmarks (a protocol of :mod:`.protocols` + where its data lies under a dataset root) and the one
runner behind ``finegrain eval``.

A protocol's keyword options (``resize``, ``templates``, ``ways``, ...) come from the benchmark's defaults, then
from the user (``--option KEY=VALUE`` or an eval config), and are checked against the protocol. ``linear_probe``
trains a head: ``finegrain eval`` runs it as a fine-tuning run (:mod:`finegrain.linear_probe`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain.data.demo import ensure_demo_dataset

from .encode import Transform
from .protocols import get_protocol, run_protocol

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class Benchmark:
    """A protocol on a dataset: ``data`` (and ``images``, the image root) are relative to the dataset root
    the user gives, ``options`` are the protocol's defaults for it."""

    protocol: str
    data: str
    about: str
    images: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)


BENCHMARKS: dict[str, Benchmark] = {
    "coco-panoptic": Benchmark(
        "panoptic_boxes", "annotations/panoptic_val2017.json", images="val2017",
        about="COCO panoptic val2017 box classification, 133 classes, as FineCLIP runs it (squash to the model "
              "size; RoI, crop and mask features; macc1/macc5, thing/stuff)"),
    "coco-panoptic-clipself": Benchmark(
        "panoptic_boxes", "annotations/panoptic_val2017.json", images="val2017",
        options={"resize": "longest", "image_size": 1024},
        about="the same at CLIPSelf's 1024 px longest-side resize (use image_size=896 for ViT-L/14)"),
    "coco-5k": Benchmark("retrieval", "karpathy:dataset_coco.json@test",
                         about="COCO Karpathy 5k test retrieval (dataset_coco.json, images under val2014/)"),
    "coco-val2017": Benchmark("retrieval", "coco_test.json",
                              about="FineCLIP's COCO retrieval list (coco_test.json, val2017 images)"),
    "flickr30k-1k": Benchmark("retrieval", "karpathy:dataset_flickr30k.json@test", images="flickr30k-images",
                              about="Flickr30k Karpathy 1k test retrieval (dataset_flickr30k.json)"),
    "imagenet-1k": Benchmark("zero_shot", "imagefolder:val", options={"class_names": "imagenet", "templates": "openai"},
                             about="ImageNet-1k val zero-shot (ImageFolder of wnid folders), 80 OpenAI prompts"),
    "imagenet-1k-detailclip": Benchmark(
        "zero_shot", "imagefolder:val", options={"class_names": "imagenet", "templates": "detailclip"},
        about="ImageNet-1k val zero-shot with DetailCLIP's 7 prompts"),
    "ade20k-150": Benchmark("segmentation", "ade20k-150",
                            about="ADE20K-150 val open-vocabulary segmentation (ADEChallengeData2016 layout)"),
    "pascal-context-59": Benchmark("segmentation", "pascal-context-59",
                                   about="Pascal Context-59 val open-vocabulary segmentation (VOC2010 layout)"),
    "ade20k-150-linear": Benchmark("linear_probe", "ade20k-150", options={"train_split": "training"},
                                   about="ADE20K-150 linear probe on frozen blocks 4/6/8/12 (DetailCLIP's protocol)"),
    # the built-in demo data (no dataset root needed)
    "demo-retrieval": Benchmark("retrieval", "demo:val", about="demo held-out split: retrieval"),
    "demo-boxes": Benchmark("box_classification", "demo:val",
                            about="demo held-out split: box classification (RoI and crop)"),
    "demo-segmentation": Benchmark(
        "segmentation", "demo", options={"images": "images/val", "labels": "labels/val",
                                         "class_names": "segmentation_classes.txt", "templates": "simple",
                                         "inference": "whole", "short_side": None},
        about="demo held-out split: open-vocabulary segmentation (24 shapes + 4 backgrounds)"),
    "demo-linear-probe": Benchmark(
        "linear_probe", "demo", options={"iterations": 300, "short_side": 64},
        about="demo: linear probe segmentation trained on the train split, scored on the held-out split"),
}


def benchmark_help() -> str:
    """One line per benchmark: name, protocol and what it is."""
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"{name:{width}s}  {b.protocol:18s}  {b.about}" for name, b in BENCHMARKS.items())


def run_benchmark(model: nn.Module, protocol: str, data: str, data_root: str | Path | None, images: str,
                  tokenizer: Tokenizer, transform: Transform, options: Mapping[str, Any] | None = None,
                  batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True,
                  where: str = "benchmark") -> dict[str, float]:
    """Run protocol ``protocol`` (see :mod:`.protocols`) and return its metrics.

    ``data`` and ``images`` are relative to ``data_root`` (absolute paths and ``demo:`` sources work as they
    are); ``data == "demo"`` means the built-in demo dataset's folder. ``where`` names the benchmark in errors.
    """
    options = dict(options or {})
    root = ensure_demo_dataset() if data == "demo" or data.startswith("demo:") else Path(data_root or ".")
    spec = get_protocol(protocol, where)
    inputs = spec.inputs(root, data, images, options)
    return run_protocol(spec, where, (model, *inputs), options,
                        {"transform": transform, "tokenizer": tokenizer, "batch_size": batch_size, "device": device,
                         "progress": progress})
