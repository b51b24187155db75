"""Named benchmarks (a protocol + where its data lies under a dataset root) and the one runner behind
``finegrain eval``.

A protocol is one evaluator function; its keyword options (``resize``, ``templates``, ``ways``, ...) come
from the benchmark's defaults, then from the user (``--option KEY=VALUE`` or an eval config), and are
checked against the function's signature, so a misspelt option is an error naming the valid ones.

=================  ===================================================  =====================================
protocol           data                                                 function
=================  ===================================================  =====================================
``retrieval``      records with captions (JSONL, CSV, COCO captions,     :func:`~.retrieval.evaluate_retrieval`
                   caption list json, ``karpathy:FILE@SPLIT``)
``zero_shot``      records with image labels (``imagefolder:DIR``, ...)  :func:`~.zero_shot.evaluate_zero_shot`
``box_classification``  records with labelled regions                   :func:`~.box_classification.evaluate_box_classification`
``panoptic_boxes``  COCO panoptic json (+ its PNG folder) and images     :func:`~.box_classification.evaluate_panoptic_box_classification`
``segmentation``   a segmentation folder (preset name or images/labels)  :func:`~.segmentation.evaluate_segmentation`
``linear_probe``   train and val segmentation folders                    a fine-tuning run: :mod:`finegrain.linear_probe`
``clip_benchmark_zero_shot``, ``clip_benchmark_retrieval``: as ``zero_shot`` / ``retrieval``, scored by LAION
CLIP_benchmark's own evaluators (the ``benchmark`` extra): :mod:`.clip_benchmark`
=================  ===================================================  =====================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finegrain.config import DataSourceConfig
from finegrain.data.demo import ensure_demo_dataset
from finegrain.data.loader import resolve_source
from finegrain.data.segmentation import PRESETS as SEGMENTATION_PRESETS
from finegrain.data.segmentation import SegmentationFolder

from .box_classification import evaluate_box_classification, evaluate_panoptic_box_classification
from .clip_benchmark import evaluate_clip_benchmark_retrieval, evaluate_clip_benchmark_zero_shot
from .encode import Transform
from .prompts import load_class_names
from .retrieval import evaluate_retrieval
from .segmentation import evaluate_segmentation
from .zero_shot import evaluate_zero_shot

Tokenizer = Callable[[list[str]], torch.Tensor]
RECORD_PROTOCOLS = {"retrieval": evaluate_retrieval, "zero_shot": evaluate_zero_shot,
                    "box_classification": evaluate_box_classification,
                    "clip_benchmark_zero_shot": evaluate_clip_benchmark_zero_shot,
                    "clip_benchmark_retrieval": evaluate_clip_benchmark_retrieval}
# protocols that train a head on the train split: finegrain eval runs them as fine-tuning runs (eval cannot train)
TRAINED_PROTOCOLS = ("linear_probe",)
# options that describe a segmentation folder (the rest go to the protocol); split_file: a list of stems
SEGMENTATION_FOLDER_OPTIONS = ("images", "labels", "class_names", "split_file", "reduce_zero_label", "ignore_index",
                               "label_suffix")


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


def _call(function: Callable[..., dict[str, float]], where: str, args: tuple, options: Mapping[str, Any],
          common: Mapping[str, Any]) -> dict[str, float]:
    """``function(*args, **common, **options)``, refusing options it does not take (naming those it does) and
    the ``common`` arguments (they have their own flags)."""
    params = inspect.signature(function).parameters
    accepted = [name for name, p in params.items()
                if (p.kind is p.KEYWORD_ONLY or p.default is not p.empty) and name not in common]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; the protocol takes {sorted(accepted)} "
                         f"({', '.join(common)} are flags)")
    return function(*args, **{key: value for key, value in common.items() if key in params}, **options)


def segmentation_folder(root: Path, data: str, folder: Mapping[str, Any], split: str | None) -> SegmentationFolder:
    """A preset layout (``data`` names one) or the folder ``root/data`` with ``images``, ``labels`` (``{split}``
    is filled in) and ``class_names`` options (a class file relative to the folder, a built-in list or names)."""
    folder = dict(folder)
    if data in SEGMENTATION_PRESETS:
        return SegmentationFolder.preset(data, root, split=split, **folder)
    base = root / data
    missing = [key for key in ("images", "labels", "class_names") if key not in folder]
    if missing:
        raise ValueError(f"segmentation data {str(base)!r} is not a preset {sorted(SEGMENTATION_PRESETS)}: give "
                         f"the option(s) {missing} (folders relative to it and a class list)")
    for key in ("images", "labels", "split_file"):
        if key in folder:
            folder[key] = folder[key].format(split=split or "")
    if "split_file" in folder:
        folder["split"] = folder.pop("split_file")
    if isinstance(folder["class_names"], str) and (base / folder["class_names"]).is_file():
        folder["class_names"] = str(base / folder["class_names"])
    return SegmentationFolder(base, **folder)


def run_benchmark(model: nn.Module, protocol: str, data: str, data_root: str | Path | None, images: str,
                  tokenizer: Tokenizer, transform: Transform, options: Mapping[str, Any] | None = None,
                  batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True,
                  where: str = "benchmark") -> dict[str, float]:
    """Run one protocol (see the module docstring) and return its metrics.

    ``data`` and ``images`` are relative to ``data_root`` (absolute paths and ``demo:`` sources work as they
    are); ``data == "demo"`` means the built-in demo dataset's folder. ``where`` names the benchmark in errors.
    """
    options = dict(options or {})
    root = ensure_demo_dataset() if data == "demo" or data.startswith("demo:") else Path(data_root or ".")
    common = {"batch_size": batch_size, "device": device, "progress": progress}
    if protocol in RECORD_PROTOCOLS:
        prefix, colon, path = data.rpartition(":") if data.startswith(("imagefolder:", "karpathy:")) else ("", "", data)
        source = f"{prefix}{colon}{root / path}" if not data.startswith("demo:") else data
        relabel = options.get("class_names") if prefix == "imagefolder" else None
        relabel = load_class_names(relabel) if relabel is not None else None
        records, image_root = resolve_source(DataSourceConfig(path=source, root=str(root / images) if images
                                                              else None), class_names=relabel)
        function = RECORD_PROTOCOLS[protocol]
        if relabel is not None:
            options["class_names"] = relabel
        return _call(function, where, (model, records, image_root, transform, tokenizer), options, common)
    if protocol == "panoptic_boxes":
        return _call(evaluate_panoptic_box_classification, where, (model, root / data, root / images, tokenizer),
                     options, common)
    if protocol == "segmentation":
        folder = {key: options.pop(key) for key in SEGMENTATION_FOLDER_OPTIONS if key in options}
        val = segmentation_folder(root, "" if data == "demo" else data, folder, options.pop("split", None))
        return _call(evaluate_segmentation, where, (model, val, tokenizer), options, common)
    raise ValueError(f"{where}: unknown protocol {protocol!r}; protocols: {', '.join(RECORD_PROTOCOLS)}, "
                     "panoptic_boxes, segmentation, linear_probe")
