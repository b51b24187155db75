"""``finegrain eval``'s ``linear_probe`` protocol as a fine-tuning run: iBOT's linear segmentation protocol
(``finetune-seg`` with ``head: linear`` on a frozen backbone) trained by finegrain's trainer in a run folder under
the eval output folder, its held-out scores returned as the protocol's metrics.

It lives here, beside the commands, because it trains: ``eval`` may not import ``train``.

Options (``--option KEY=VALUE`` or a benchmark's defaults): ``train_split`` / ``split`` (the folders' splits),
``class_names``, ``reduce_zero_label``, ``ignore_index`` (a custom folder), ``iterations`` (2000; iBOT: 160k),
``lr`` (7e-4) and ``weight_decay`` (0.05) of AdamW, ``blocks`` (0-based; default 4/6/8/12 of 12 at the same
fractions of the depth), ``crop_size`` (training crop and test window; default the model's input size),
``short_side`` (the scale's short side, default the crop's; long side 2048 as mmseg's ``(2048, 512)``),
``batch_norm`` (BatchNorm2d before the 1x1 conv), ``seed``, and ``overrides`` (dotted config overrides for the
rest, e.g. ``[method.photometric=false]``). The warmup is iBOT's 1500 of 160k iterations scaled to
``iterations``; the windows move by 2/3 of the crop (iBOT's 341 of 512).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import load_config
from .data.demo import ensure_demo_dataset
from .data.segmentation import PRESETS
from .errors import DataError
from .eval.jobs import EvalJob
from .eval.prompts import load_class_names

IBOT_ITERATIONS, IBOT_WARMUP = 160_000, 1500
DEFAULTS = {"iterations": 2000, "lr": 7e-4, "weight_decay": 0.05, "blocks": None, "crop_size": None,
            "short_side": None, "batch_norm": True, "seed": 0, "train_split": None, "split": None,
            "class_names": None, "reduce_zero_label": False, "ignore_index": 255, "overrides": []}


def _sources(job: EvalJob, options: Mapping[str, Any]) -> tuple[str, str, str | list[str], bool]:
    """``(train source, val source, class names, reduce_zero_label)`` of the job's data: the demo, a preset
    layout (``ade20k-150``, ``pascal-context-59``) under the data root, or a ``segfolder`` layout."""
    if job.data == "demo" or job.data.startswith("demo:"):
        root = ensure_demo_dataset()
        return "demo:train", "demo:val", str(root / "segmentation_classes.txt"), False
    root = Path(job.data_root or ".")
    if job.data in PRESETS:
        preset = PRESETS[job.data]
        train_split = options["train_split"] or ("training" if job.data == "ade20k-150" else "train")
        return (f"{job.data}:{root}@{train_split}", f"{job.data}:{root}@{options['split'] or preset.default_split}",
                options["class_names"] or preset.class_names, preset.reduce_zero_label)
    if options["class_names"] is None:
        raise DataError(f"benchmark {job.name!r}: {job.data!r} is not a preset {sorted(PRESETS)}: give "
                        "--option class_names=FILE (its folder holds images/, labels/ and train.txt / val.txt)")
    folder = root / job.data.removeprefix("segfolder:")
    return (f"segfolder:{folder}@{options['train_split'] or 'train'}", f"segfolder:{folder}@{options['split'] or 'val'}",
            options["class_names"], options["reduce_zero_label"])


def linear_probe_config(job: EvalJob, model_name: str, pretrained: str | None, image_size: int, output_dir: Path,
                        batch_size: int, device: str, precision: str):
    """The ``finetune-seg`` (linear head) config of ``job`` for the model, its run folder ``output_dir``."""
    unknown = sorted(set(job.options) - set(DEFAULTS))
    if unknown:
        raise DataError(f"benchmark {job.name!r}: unknown option(s) {unknown}; linear_probe takes {sorted(DEFAULTS)}")
    options = {**DEFAULTS, **job.options}
    train, val, class_names, reduce_zero_label = _sources(job, options)
    crop = options["crop_size"] or image_size
    short = options["short_side"] or crop
    stride = max(1, crop * 2 // 3)
    iterations = options["iterations"]
    settings = {
        "model.name": model_name, "model.pretrained": pretrained,
        "method.name": "finetune-seg", "method.head": "linear", "method.backbone.frozen": True,
        "method.backbone.blocks": options["blocks"], "method.linear_batch_norm": options["batch_norm"],
        "method.num_classes": len(load_class_names(class_names)), "method.class_names": class_names,
        "method.reduce_zero_label": reduce_zero_label, "method.ignore_index": options["ignore_index"],
        "method.scale": [2048, short], "method.crop": [crop, crop], "method.test_scale": [2048, short],
        "method.test_window": [crop, crop], "method.test_stride": [stride, stride],
        "data.train.path": train, "data.val.path": val, "data.batch_size": batch_size,
        "optim.lr": options["lr"], "optim.weight_decay": options["weight_decay"], "optim.betas": [0.9, 0.999],
        "optim.eps": 1e-8, "optim.schedule": "poly", "optim.poly_power": 1.0, "optim.min_lr": 0.0,
        "optim.warmup_steps": round(iterations * IBOT_WARMUP / IBOT_ITERATIONS), "optim.warmup_ratio": 1e-6,
        "train.steps": iterations, "train.save_every": iterations, "train.keep_last": 1, "train.seed": options["seed"],
        "train.eval_tasks": ["segmentation"], "train.output_dir": str(output_dir), "train.device": device,
        "train.precision": precision}
    overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    return load_config(None, [*overrides, *options["overrides"]])


def run_linear_probe(job: EvalJob, model_name: str, pretrained: str | None, image_size: int, output_dir: Path,
                     batch_size: int = 16, device: str = "auto", precision: str = "fp32",
                     progress: bool = True) -> dict[str, float]:
    """Train and score the linear probe of ``job`` in a new run folder ``output_dir/<job>-<time>``: the held-out
    ``miou``, ``macc``, ``aacc`` (percent), ``num_images``, ``skipped_images``, and ``train_loss`` (mean of the
    last tenth of the iterations) and ``skipped_train_images``."""
    from .train.trainer import train

    run_dir = Path(output_dir) / f"{job.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = linear_probe_config(job, model_name, pretrained, image_size, run_dir, batch_size, device, precision)
    result = train(cfg, progress_bar=progress)
    metrics = {key.removeprefix("segmentation/"): value for key, value in result.eval_metrics.items()}
    losses = _losses(run_dir / "metrics.jsonl")
    tail = losses[-max(1, len(losses) // 10):]
    metrics.update(train_loss=sum(tail) / len(tail), skipped_train_images=result.last_losses.get("data/bad_records", 0))
    print(f"linear probe run folder: {run_dir}")
    return metrics


def _losses(path: Path) -> Sequence[float]:
    lines = (json.loads(line) for line in path.read_text().splitlines())
    return [line["loss"] for line in lines if "loss" in line]
