"""The one registry of evaluation protocols, used by ``finegrain eval`` (:mod:`.benchmarks`) and by evaluation
during training (``train.eval_tasks``, :mod:`.tasks`).

A protocol is an evaluator function, how its data is read (``inputs``) and, for protocols on records, what the
records must hold (``check_records``: only these can run as ``train.eval_tasks``). Its options are the
function's keyword arguments (``resize``, ``templates``, ``ways``, ...) and the options its ``inputs`` read
(a segmentation folder's layout); a misspelt option is an error naming the valid ones.

- ``retrieval``: records with captions (JSONL, CSV, COCO captions, a caption list json, ``karpathy:FILE@SPLIT``);
  :func:`~.retrieval.evaluate_retrieval`
- ``zero_shot``: records with image labels (``imagefolder:DIR``, ...); :func:`~.zero_shot.evaluate_zero_shot`
- ``box_classification``: records with labelled regions; :func:`~.box_classification.evaluate_box_classification`
- ``clip_benchmark_zero_shot``, ``clip_benchmark_retrieval``: as ``zero_shot`` / ``retrieval``, scored by LAION
  CLIP_benchmark's own evaluators (the ``benchmark`` extra): :mod:`.clip_benchmark`
- ``panoptic_boxes``: a COCO panoptic json (+ its PNG folder) and images;
  :func:`~.box_classification.evaluate_panoptic_box_classification`
- ``segmentation``: a segmentation folder (a preset name, or images/labels options);
  :func:`~.segmentation.evaluate_segmentation`
- ``linear_probe`` (:data:`TRAINED_PROTOCOLS`): train and val segmentation folders; it trains a head, so
  ``finegrain eval`` runs it as a fine-tuning run (:mod:`finegrain.linear_probe`), not through this registry
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finegrain.config import DataSourceConfig
from finegrain.data.loader import resolve_source
from finegrain.data.records import Record
from finegrain.data.segmentation import PRESETS as SEGMENTATION_PRESETS
from finegrain.data.segmentation import SegmentationFolder
from finegrain.errors import DataError

from .box_classification import (
    evaluate_box_classification,
    evaluate_panoptic_box_classification,
    labelled_regions,
)
from .clip_benchmark import evaluate_clip_benchmark_retrieval, evaluate_clip_benchmark_zero_shot
from .prompts import load_class_names
from .retrieval import captioned_records, evaluate_retrieval
from .segmentation import evaluate_segmentation
from .zero_shot import evaluate_zero_shot, labelled_records

# options that describe a segmentation folder (the rest go to the protocol); split_file: a list of stems
SEGMENTATION_FOLDER_OPTIONS = ("images", "labels", "class_names", "split_file", "reduce_zero_label", "ignore_index",
                               "label_suffix")
# what ``finegrain eval`` sets by flags, not options
FLAGS = ("batch_size", "device", "progress")


@dataclass(frozen=True)
class Protocol:
    """``function(model, *inputs(root, data, images, options), **options)``: ``inputs`` reads the data a
    benchmark names (``data`` and ``images`` relative to the dataset ``root``) and takes out of ``options``
    those it uses; ``check_records`` raises a DataError saying what records lack for this protocol (None: the
    protocol does not run on records)."""

    function: Callable[..., dict[str, float]]
    inputs: Callable[[Path, str, str, dict[str, Any]], tuple]
    check_records: Callable[[Sequence[Record]], object] | None = None


def record_inputs(root: Path, data: str, images: str, options: dict[str, Any]) -> tuple:
    """``(records, image root)`` of a records source; an ``imagefolder:`` source's labels follow the
    ``class_names`` option (loaded into it)."""
    prefix, colon, path = data.rpartition(":") if data.startswith(("imagefolder:", "karpathy:")) else ("", "", data)
    source = f"{prefix}{colon}{root / path}" if not data.startswith("demo:") else data
    relabel = options.get("class_names") if prefix == "imagefolder" else None
    relabel = load_class_names(relabel) if relabel is not None else None
    if relabel is not None:
        options["class_names"] = relabel
    return resolve_source(DataSourceConfig(path=source, root=str(root / images) if images else None),
                          class_names=relabel)


def segmentation_folder(root: Path, data: str, folder: Mapping[str, Any], split: str | None) -> SegmentationFolder:
    """A preset layout (``data`` names one) or the folder ``root/data`` with ``images``, ``labels`` (``{split}``
    is filled in) and ``class_names`` options (a class file relative to the folder, a built-in list or names)."""
    folder = dict(folder)
    if data in SEGMENTATION_PRESETS:
        return SegmentationFolder.preset(data, root, split=split, **folder)
    base = root / data
    missing = [key for key in ("images", "labels", "class_names") if key not in folder]
    if missing:
        raise DataError(f"segmentation data {str(base)!r} is not a preset {sorted(SEGMENTATION_PRESETS)}: give "
                        f"the option(s) {missing} (folders relative to it and a class list)")
    for key in ("images", "labels", "split_file"):
        if key in folder:
            folder[key] = folder[key].format(split=split or "")
    if "split_file" in folder:
        folder["split"] = folder.pop("split_file")
    if isinstance(folder["class_names"], str) and (base / folder["class_names"]).is_file():
        folder["class_names"] = str(base / folder["class_names"])
    return SegmentationFolder(base, **folder)


def segmentation_inputs(root: Path, data: str, images: str, options: dict[str, Any]) -> tuple:
    """The segmentation folder of ``data`` (``"demo"``: the demo dataset's) at the split the option ``split``
    names; the folder's options are taken out of ``options``."""
    return (_segmentation_folder(root, data, _folder_options(options), options.pop("split", None)),)


def _folder_options(options: dict[str, Any]) -> dict[str, Any]:
    return {key: options.pop(key) for key in SEGMENTATION_FOLDER_OPTIONS if key in options}


def _segmentation_folder(root: Path, data: str, folder: Mapping[str, Any], split: str | None) -> SegmentationFolder:
    return segmentation_folder(root, "" if data == "demo" else data, folder, split)


def panoptic_inputs(root: Path, data: str, images: str, options: dict[str, Any]) -> tuple:
    return root / data, root / images


def _captioned(task: str) -> Callable[[Sequence[Record]], object]:
    return lambda records: captioned_records(records, task)


def _labelled(task: str) -> Callable[[Sequence[Record]], object]:
    return lambda records: labelled_records(records, None, task)


PROTOCOLS: dict[str, Protocol] = {
    "retrieval": Protocol(evaluate_retrieval, record_inputs, _captioned("retrieval")),
    "zero_shot": Protocol(evaluate_zero_shot, record_inputs, _labelled("zero_shot")),
    "box_classification": Protocol(evaluate_box_classification, record_inputs, labelled_regions),
    "clip_benchmark_zero_shot": Protocol(evaluate_clip_benchmark_zero_shot, record_inputs,
                                         _labelled("clip_benchmark_zero_shot")),
    "clip_benchmark_retrieval": Protocol(evaluate_clip_benchmark_retrieval, record_inputs,
                                         _captioned("clip_benchmark_retrieval")),
    "panoptic_boxes": Protocol(evaluate_panoptic_box_classification, panoptic_inputs),
    "segmentation": Protocol(evaluate_segmentation, segmentation_inputs),
}
# protocols that train a head on a train split: the caller runs them as fine-tuning runs (eval cannot train)
TRAINED_PROTOCOLS = ("linear_probe",)


def record_protocols() -> list[str]:
    """The protocols that run on records (those ``train.eval_tasks`` may name), sorted."""
    return sorted(name for name, protocol in PROTOCOLS.items() if protocol.check_records is not None)


def get_protocol(name: str, where: str) -> Protocol:
    if name not in PROTOCOLS:
        known = [*PROTOCOLS, *TRAINED_PROTOCOLS]
        raise DataError(f"{where}: unknown protocol {name!r}; protocols: {', '.join(known)}")
    return PROTOCOLS[name]


def run_protocol(protocol: Protocol, where: str, args: tuple, options: Mapping[str, Any],
                 common: Mapping[str, Any]) -> dict[str, float]:
    """``protocol.function(*args, **common, **options)``, passing of ``common`` (``transform``, ``tokenizer``,
    the :data:`FLAGS`) what the function takes, refusing options it does not take (naming those it does) and
    the ``common`` arguments."""
    params = inspect.signature(protocol.function).parameters
    accepted = [name for name, p in params.items()
                if (p.kind is p.KEYWORD_ONLY or p.default is not p.empty) and name not in common]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(f"{where}: unknown option(s) {unknown}; the protocol takes {sorted(accepted)} "
                        f"({', '.join(FLAGS)} are flags)")
    for key, value in options.items():
        _check_option_kind(where, key, value, params[key].annotation)
    return protocol.function(*args, **{key: value for key, value in common.items() if key in params}, **options)


def _check_option_kind(where: str, key: str, value: Any, annotation: Any) -> None:
    """A :class:`DataError` naming the option when a ``--option`` value is not of the kind its parameter is
    annotated with (only plain ``int`` / ``float`` / ``bool`` / ``str``, optionally ``| None``, are checked), so
    that ``crop_scale=abc`` is one line here, not a ``TypeError`` deep in the protocol."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    kinds = set(text.replace(" ", "").split("|"))
    if value is None and "None" in kinds:
        return
    kinds.discard("None")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    checks = {"int": ("an integer", isinstance(value, int) and not isinstance(value, bool)),
              "float": ("a number", number), "bool": ("true or false", isinstance(value, bool)),
              "str": ("a string", isinstance(value, str))}
    if len(kinds) == 1 and (kind := kinds.pop()) in checks and not checks[kind][1]:
        raise DataError(f"{where}: option {key}={value!r}: expected {checks[kind][0]}")
