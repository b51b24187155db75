"""The training loop. It knows models, methods and data only through their interfaces:
``method(model, batch, progress) -> {name: tensor}`` (or ``features``/``loss``), ``method.sample_spec()``,
``after_step``, and the hooks of :class:`finegrain.objectives.Method` (parameter rules, DDP options, the
model to evaluate and to export).

One process or many (``torchrun``: DDP over a module holding both the model and the method, so every
trainable parameter, heads included, has its gradients all-reduced). Step-granular, atomic checkpoints
and exact resume (same data order, same RNG). Loss values stay on the device between log steps: the host
waits for the device only every ``train.log_every`` steps (and before a checkpoint or an evaluation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..config import ExperimentConfig, config_to_yaml, to_dict
from ..data.dataset import BadRecordCounter
from ..data.dense import DenseSampleBuilder
from ..data.loader import build_train_loader, resolve_source
from ..data.sample import SampleBuilder
from ..data.text_cache import TextCacheError, check_cache_matches
from ..errors import DataError
from ..eval.encode import evaluating, parsed_records
from ..models import FinegrainCLIP, create_model, get_tokenizer
from ..models.factory import preprocess_override
from ..objectives import EvalContext, Method, Progress, complete_method_options, create_method
from ..sample_spec import IMAGE_KEYS
from . import checkpoint as ckpt
from .distributed import all_gather_objects, barrier, broadcast_object, init_distributed
from .interrupt import StopSignals, TrainingStopped
from .metrics_log import BadRecordsFile, MetricsLog, start_wandb
from .optim import (
    apply_trainable_rules,
    create_optimizer,
    derive_epoch_schedule,
    learning_rate,
    set_learning_rate,
)
from .preflight import check_data_paths, check_eval_data, loader_workers, setting_warnings
from .provenance import run_info
from .report import format_metrics
from .run_lock import RunLock

MAX_LOGIT_SCALE = math.log(100)
log = logging.getLogger(__name__)


class NonFiniteLossError(DataError, FloatingPointError):
    """A loss became NaN or infinite; the message names the step and the loss terms."""


def progress_fields(values: dict[str, float]) -> dict[str, str]:
    """The progress bar's fields from a metrics line: loss, samples/s (overall and per device), the share of
    time this rank waited for data, and the peak GPU memory."""
    fields = {"loss": f"{values['loss']:.4f}", "samples_s": f"{values['samples_per_s']:.0f}",
              "per_device": f"{values['samples_per_s_per_device']:.0f}", "data_wait": f"{values['data_wait_share']:.0%}"}
    if "peak_memory_gib" in values:
        fields["mem"] = f"{values['peak_memory_gib']:.1f}G"
    return fields


def status_line(step: int, steps: int, values: dict[str, float], seconds_per_step: float) -> str:
    """One line of training progress for logs without a progress bar: step, loss, lr, samples/s, time left."""
    left = int(max(steps - step, 0) * seconds_per_step)
    return (f"step {step}/{steps}  loss {values['loss']:.4f}  lr {values['lr']:.3g}  "
            f"{values['samples_per_s']:.0f} samples/s  {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")


def print_interval(cfg: ExperimentConfig) -> int:
    """Steps between status lines: ``train.print_every`` (else about 20 a run), rounded up to a multiple of
    ``train.log_every`` (the steps whose values are read back)."""
    log_every = cfg.train.log_every
    wanted = cfg.train.print_every or max(1, cfg.train.steps // 20)
    return log_every * max(1, -(-wanted // log_every))


class TrainModule(nn.Module):
    """Model + method in one module, so DDP sees (and synchronises) every trainable parameter."""

    def __init__(self, model: FinegrainCLIP, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: dict, progress: Progress, features_only: bool = False,
                direct: list[tuple[nn.Parameter, torch.Tensor]] = ()) -> dict[str, torch.Tensor]:
        """The method's losses on ``batch``; or, for cached-feature accumulation, only its features, plus
        ``direct_share`` = sum of ``<p, g>`` over ``direct`` (the loss's gradients of parameters it uses
        itself), computed here so that DDP sees those parameters used in this forward."""
        if not features_only:
            return self.method(self.model, batch, progress)
        features = self.method.features(self.model, batch, progress)
        if direct:
            features["direct_share"] = sum((p * g).sum() for p, g in direct)
        return features


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    last_losses: dict[str, float]
    eval_metrics: dict[str, float]


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class BatchToDevice:
    """Moves a batch to the device; uint8 images (``IMAGE_KEYS``) become normalised floats there."""

    def __init__(self, device: torch.device, mean, std):
        self.device = device
        std = torch.tensor(std, device=device).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = torch.tensor(mean, device=device).view(3, 1, 1) / std

    def __call__(self, batch: dict) -> dict:
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if key in IMAGE_KEYS and value.dtype == torch.uint8:
                    value = value.float() * self.scale - self.shift
            out[key] = value
        return out


def _torch_rng_state() -> tuple:
    """torch's CPU and CUDA generator states (what dropout, masking and patch dropout draw from)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_torch_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = [v for k, v in losses.items() if k.endswith("_loss")]
    if not terms:
        raise ValueError(f"the method returned no '*_loss' term (keys: {sorted(losses)})")
    return torch.stack([t.float() for t in terms]).sum()


def lr_factor(cfg: ExperimentConfig, world_size: int, announce: bool = False) -> float:
    """``global batch / optim.lr_base_batch`` (mmdet's ``auto_scale_lr``), 1 without it."""
    if cfg.optim.lr_base_batch is None:
        return 1.0
    batch = cfg.data.batch_size * cfg.train.grad_accum * world_size
    factor = batch / cfg.optim.lr_base_batch
    if announce and factor != 1:
        print(f"optim.lr_base_batch={cfg.optim.lr_base_batch}: the learning rate is scaled by {batch}/"
              f"{cfg.optim.lr_base_batch} = {factor:g} (the global batch of {batch})")
    return factor


def check_finite(step: int, losses: dict[str, float]) -> None:
    """Raise :class:`NonFiniteLossError` naming ``step`` and every term when a loss (``loss``, ``*_loss``)
    is NaN or inf. Other values (a gradient norm on an fp16 step the grad scaler skips) may be."""
    bad = {k: v for k, v in losses.items() if (k == "loss" or k.endswith("_loss")) and not math.isfinite(v)}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in losses.items())
        raise NonFiniteLossError(f"non-finite loss at step {step}: {sorted(bad)} ({terms}); stopping. "
                                 "Lower optim.lr, enable optim.clip_grad_norm, or use train.precision=bf16.")


class Trainer:
    """Builds everything from a config and runs ``cfg.train.steps`` optimizer steps."""

    def __init__(self, cfg: ExperimentConfig, resume: str | None = None, progress_bar: bool = True):
        self.cfg = cfg = complete_method_options(cfg)  # the run's config.yaml and checkpoints hold every option
        check_data_paths(cfg)
        if cfg.data.val is not None:
            check_eval_data(cfg, self.val_source[0])
        self.dist, self.device = init_distributed(cfg.train.device)
        self.out_dir = Path(cfg.train.output_dir)
        # one run at a time in a folder: rank 0 locks it before anything reads or writes it (released when fit ends,
        # or here when the set-up fails)
        self.run_lock = RunLock(self.out_dir).acquire() if self.dist.is_main else None
        if self.run_lock is not None:  # also when a trainer that never ran fit() is dropped
            weakref.finalize(self, self.run_lock.release)
        try:
            self._setup(cfg, resume, progress_bar)
        except BaseException:
            self.release_run_folder()
            raise

    def release_run_folder(self) -> None:
        """Let another run use the run folder (the lock is released at interpreter exit otherwise)."""
        if self.run_lock is not None:
            self.run_lock.release()

    def _setup(self, cfg: ExperimentConfig, resume: str | None, progress_bar: bool) -> None:
        resume_path = ckpt.check_run_folder(self.out_dir, resume, cfg.train.overwrite, cfg)  # before any weights load
        self.progress_bar = progress_bar and self.dist.is_main
        seed_everything(cfg.train.seed + self.dist.rank)

        self.model = create_model(cfg.model.name, cfg.model.pretrained, image_size=cfg.model.image_size,
                                  **preprocess_override(cfg.model))
        if cfg.model.checkpoint_weights != "state_dict":
            self.model.clip.load_state_dict(ckpt.checkpoint_weights(cfg.model.pretrained, cfg.model.checkpoint_weights))
        if cfg.model.lock_image:
            self.model.lock_image_tower(cfg.model.lock_image_unlocked_groups, cfg.model.lock_image_freeze_bn_stats)
        if cfg.model.lock_text:
            self.model.lock_text_tower(cfg.model.lock_text_unlocked_layers, cfg.model.lock_text_freeze_layer_norm)
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.method = create_method(cfg.method.name, cfg.method.options, self.model)
        self.check_held_out()
        self.module = TrainModule(self.model, self.method).to(self.device)
        self.tokenizer = get_tokenizer(cfg.model.name)
        pp = open_clip.get_model_preprocess_cfg(self.model.clip)
        self.mean, self.std = pp["mean"], pp["std"]
        self.to_device = BatchToDevice(self.device, self.mean, self.std)
        spec = self.method.sample_spec()
        if spec.text_cache:
            self.check_text_cache(spec.text_cache)
        self.builder = (DenseSampleBuilder(spec) if spec.dense is not None
                        else SampleBuilder(spec, self.model.image_size, self.tokenizer))
        self.regions_seen = 0 if spec.regions else None  # counted until the first log flush
        if cfg.train.epochs is not None or cfg.optim.warmup_epochs is not None:  # counted by the loader's epochs
            _, epoch_of = build_train_loader(cfg.data, self.builder, cfg.train.seed, self.dist.rank,
                                             self.dist.world_size)
            self.cfg = cfg = derive_epoch_schedule(cfg, epoch_of(cfg.train.grad_accum))
        rules = [*self.method.param_rules(), *cfg.optim.param_groups]
        apply_trainable_rules(self.module, rules)
        self.optimizer = create_optimizer(self.module, cfg.optim, rules, fused=self.device.type == "cuda")
        self.lr_factor = lr_factor(cfg, self.dist.world_size, announce=self.dist.is_main)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if self.dist.is_main:  # once, before step one
            for problem in setting_warnings(cfg, self.device, local_processes):
                print(f"warning: {problem}", file=sys.stderr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.bad_records = BadRecordCounter(cfg.data.max_bad_fraction, cfg.data.min_records_before_bad_check)
        self.step = 0
        self.data_position = 0  # micro-batches consumed by this rank
        self.best = -math.inf
        self.eval_metrics: dict[str, float] = {}
        self.pending: list[dict] = []  # per-step values not yet read back from the device
        self.last_values: dict[str, float] = {}
        self.flush_time = time.perf_counter()
        self.data_wait = 0.0  # seconds this rank waited for the loader since the last flush
        self.data_counts = {"boxes_clipped": 0, "boxes_dropped": 0, "instances_unlisted": 0, "instances_cut": 0}

        if resume_path is not None:
            self._load(resume_path)
        data = dataclasses.replace(cfg.data, num_workers=loader_workers(cfg, local_processes))
        self.loader, self.epoch_of = build_train_loader(  # before any file is written: its data checks
            data, self.builder, cfg.train.seed, self.dist.rank, self.dist.world_size,
            start_batch=self.data_position, pin_memory=self.device.type == "cuda", bad_records=self.bad_records,
            announce=self.dist.is_main)
        barrier()  # every rank has checked the folder before rank 0 writes to it
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume_path is None:  # a fresh run (train.overwrite=true if an earlier one was here)
                for name in ckpt.run_artefacts(self.out_dir):
                    (self.out_dir / name).unlink(missing_ok=True)
            self._write_run_files(resume_path)
        barrier()
        self.log = self.bad_records_file = None
        if self.dist.is_main:
            wandb_run = (start_wandb(self.out_dir, cfg.train.wandb, to_dict(cfg), resumed=resume_path is not None)
                         if cfg.train.wandb.project else None)
            self.log = MetricsLog(self.out_dir, cfg.train.tensorboard,
                                  resume_step=self.step if resume_path else None, wandb_run=wandb_run)
            self.bad_records_file = BadRecordsFile(self.out_dir, resume=resume_path is not None)

        if cfg.train.compile:
            self._compile_blocks()
        self.ddp = self.module
        if self.dist.enabled:
            options = dict(self.method.ddp_options())
            if cfg.train.find_unused_parameters is not None:
                options["find_unused_parameters"] = cfg.train.find_unused_parameters
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device] if self.device.type == "cuda" else None, **options)

    # ----- set-up helpers -----------------------------------------------------------------------------
    def _compile_blocks(self) -> None:
        """Regional compilation: each block of the vision tower (and of an open_clip text tower) is compiled
        once and reused by all its copies."""
        clip = self.model.clip
        text = getattr(clip, "transformer", None) or getattr(getattr(clip, "text", None), "transformer", None)
        for block in [*self.model.tower.blocks, *getattr(text, "resblocks", [])]:  # (an HF text tower: none)
            block.compile(backend=self.cfg.train.compile_backend, dynamic=False)

    def _write_run_files(self, resume_path: Path | None) -> None:
        (self.out_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        info = run_info(self.cfg.train.seed, self.dist.world_size, str(self.device))
        info["resumed_from"] = str(resume_path) if resume_path else None
        name = "run_info.json" if resume_path is None else f"run_info_resume_{self.step:08d}.json"
        (self.out_dir / name).write_text(json.dumps(info, indent=2))

    def _load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path)
        ckpt.check_same_run(path, state, self.cfg)
        try:
            self.model.clip.load_state_dict(state.get("train_state_dict", state["state_dict"]))
            self.method.load_state_dict(state["method"])
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise DataError(f"--resume {path}: its weights do not fit this run's model and {self.cfg.method.name} "
                            f"heads ({first[1].strip() if len(first) > 1 else first[0]}); resume a checkpoint of this "
                            "run's config") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.data_position = state["step"], state["data_position"]
        self.best = state.get("best", -math.inf)
        self.bad_records.load_state_dict(state["bad_records"])
        self.data_counts.update(state.get("data_counts", {}))
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            ckpt.restore_rng(rng[self.dist.rank])
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")

    def _state(self, resumable: bool = True) -> dict:
        """The checkpoint: ``state_dict`` is the method's export model (what open_clip and ``finegrain
        export`` load); ``train_state_dict`` holds the trained weights when they differ (resume uses it).
        Without ``resumable`` (``best.pt``) the optimizer state, twice the trainable weights, is left out."""
        rng = all_gather_objects(ckpt.capture_rng())
        exported = self.method.export_model(self.model)
        weights = {"state_dict": exported.clip.state_dict()}
        if exported is not self.model:
            weights["train_state_dict"] = self.model.clip.state_dict()
        return {
            **weights,
            "method": self.method.state_dict(),
            **({"optimizer": self.optimizer.state_dict()} if resumable else {}),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "data_position": self.data_position,
            "best": self.best,
            "bad_records": self.bad_records.state_dict(),
            "data_counts": dict(self.data_counts),
            "rng": rng,
            "model_name": self.model.name,
            "config": to_dict(self.cfg),
            "finegrain_version": __version__,
        }

    def save(self) -> Path:
        """Write ``step_XXXXXXXX.pt`` atomically (rank 0) and prune to the last ``keep_last``."""
        state = self._state()  # collective (RNG gather): every rank takes part
        path = ckpt.checkpoint_path(self.out_dir, self.step)
        if self.dist.is_main:
            ckpt.save_atomic(state, path)
            ckpt.prune_checkpoints(self.out_dir, self.cfg.train.keep_last)
        barrier()
        return path

    # ----- evaluation ---------------------------------------------------------------------------------
    @functools.cached_property
    def val_source(self):
        """``(records, image root)`` of ``data.val``, read and parsed once per run (the number of records its
        reader or parser left out: :attr:`val_left_out`)."""
        records, root = resolve_source(self.cfg.data.val, self.cfg.data.strict)
        parsed = parsed_records(records, "data.val")
        self.val_left_out = len(getattr(records, "failures", ())) + len(records) - len(parsed)
        return parsed, root

    def check_held_out(self) -> None:
        """The method's own evaluations check that they can score ``data.val`` (before the first step)."""
        own = [task for task in self.cfg.train.eval_tasks if task in self.method.evaluations]
        if self.cfg.data.val is None or not own:
            return
        context = self.eval_context(*self.val_source)
        for task in own:
            self.method.check_held_out(task, context)

    def eval_context(self, records, root, output_dir: Path | None = None) -> EvalContext:
        """What the method's own evaluations get: the held-out records and root, ``data.val.path``, the device,
        ``data.batch_size``, and where to write (the run's eval folder; None for checks)."""
        return EvalContext(records, Path(root), self.cfg.data.val.path, self.device, self.cfg.data.batch_size,
                           output_dir=output_dir, skipped=getattr(self, "val_left_out", 0))

    def check_text_cache(self, cache_dir: str) -> None:
        """Rank 0 checks that the text cache was made by this model (other ranks' random initialisations
        differ until DDP syncs them); every rank stops with its error."""
        error = None
        if self.dist.is_main:
            try:
                with evaluating(self.model):
                    check_cache_matches(cache_dir, lambda tokens: self.model.encode_text(tokens.to(self.device)),
                                        self.tokenizer, f"{self.cfg.model.name} (pretrained {self.cfg.model.pretrained})")
            except TextCacheError as e:
                error = str(e)
        error = broadcast_object(error)
        if error:
            raise TextCacheError(error)

    def evaluate(self) -> dict[str, float]:
        """Run ``train.eval_tasks`` on ``data.val`` (rank 0; others wait) and keep ``best.pt`` (by the metrics
        of the method's ``eval_model``). Its ``extra_eval_models`` run the same tasks, their metrics prefixed
        with their name (``teacher/zero_shot/acc1``)."""
        if self.cfg.data.val is None:
            return {}
        metrics = None
        if self.dist.is_main:
            from ..eval import evaluate

            records, root = self.val_source
            extra = self.method.extra_eval_models(self.model)
            models = {"": self.method.eval_model(self.model), **extra}
            also = f" (also for {', '.join(extra)})" if extra else ""
            tqdm.write(f"step {self.step}: evaluating {', '.join(self.cfg.train.eval_tasks)} on {len(records)} "
                       f"held-out records{also}")
            own = [task for task in self.cfg.train.eval_tasks if task in self.method.evaluations]
            shared = [task for task in self.cfg.train.eval_tasks if task not in own]
            metrics = {}
            for name, model in models.items():
                values = {}
                with autocast(self.device, self.cfg.train.eval_precision or self.cfg.train.precision):
                    if shared:
                        transform = open_clip.image_transform(model.image_size, is_train=False, mean=self.mean,
                                                              std=self.std)
                        values = evaluate(model, shared, records, root, transform, self.tokenizer,
                                          batch_size=self.cfg.data.batch_size, device=self.device, progress=False)
                    if own and not name:  # the method's own tasks evaluate its trained heads on its model
                        values.update(self._evaluate_own(own, model, records, root))
                metrics.update({f"{name}/{k}" if name else k: v for k, v in values.items()})
            self.log.write(self.step, {f"eval/{k}": v for k, v in metrics.items()})
            if self.step < self.cfg.train.steps:  # the final evaluation is the caller's to report
                tqdm.write(format_metrics(metrics))
        metrics = broadcast_object(metrics)
        self.eval_metrics = metrics
        key = self.cfg.train.best_metric
        if key is not None:
            if key not in metrics:
                raise DataError(f"train.best_metric={key!r} is not among the eval metrics {sorted(metrics)}")
            if metrics[key] > self.best:
                self.best = metrics[key]
                state = self._state(resumable=False)
                if self.dist.is_main:
                    ckpt.save_atomic(state, self.out_dir / "best.pt")
        return metrics

    def _evaluate_own(self, tasks: list[str], model: FinegrainCLIP, records, root) -> dict[str, float]:
        """The method's own evaluation tasks (``task/metric``); at the end of training each one's metrics also
        go to ``<run>/eval/results.jsonl`` (what ``finegrain eval --table`` shows)."""
        from ..eval.results import append_result

        context = self.eval_context(records, root, self.out_dir / "eval")
        out = {}
        for task in tasks:
            start = time.perf_counter()
            with evaluating(self.module):
                values = self.method.evaluate(task, model, context)
            out.update({f"{task}/{k}": v for k, v in values.items()})
            if self.step >= self.cfg.train.steps:
                append_result(self.out_dir / "eval", {
                    "benchmark": f"{self.cfg.method.name}.{task}", "task": task, "model": self.cfg.model.name,
                    "pretrained": self.cfg.model.pretrained, "metrics": values,
                    "options": {"data": self.cfg.data.val.path, "step": self.step,
                                **self.method.result_options(task)},
                    "seconds": round(time.perf_counter() - start, 1),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return out

    # ----- the loop -----------------------------------------------------------------------------------
    def _next_batch(self, batches: Iterator[dict]) -> dict:
        """The next micro-batch on the device; its bad records and fixed boxes are counted (on the host)."""
        start = time.perf_counter()
        batch = next(batches)
        self.data_wait += time.perf_counter() - start
        self.data_position += 1
        self.bad_records.update(batch.pop("records_tried", len(batch["image"])), batch.pop("bad_records"),
                                batch.pop("bad_regions", []))
        if self.regions_seen is not None:
            self.regions_seen += int(batch["box_valid"].sum())
        for key in self.data_counts:
            self.data_counts[key] += batch.pop(key, 0)
        return self.to_device(batch)

    def _sync(self, last: bool):
        """DDP all-reduces gradients only in the backward of the ``last`` micro-batch."""
        return contextlib.nullcontext() if last or not self.dist.enabled else self.ddp.no_sync()

    def accumulate_gradients(self, micro_batches: Iterator[dict], progress: Progress) -> dict[str, torch.Tensor]:
        """Forward and backward of one optimizer step's ``train.grad_accum`` micro-batches (device batches);
        returns the step's loss terms and ``loss``, still on the device.

        With cached features (``train.accum_features``, a method with ``features``/``loss`` and more than
        one micro-batch) the gradient is that of one batch as large as all micro-batches together,
        contrastive negatives included: the features of every micro-batch are computed without gradients,
        the loss of all of them is differentiated with respect to those features (and to the parameters
        the loss uses directly, such as the logit scale), then each micro-batch recomputes its features
        with gradients and back-propagates its share (gradient caching; one extra forward). Otherwise each
        micro-batch's loss is back-propagated divided by their number. Random numbers drawn in ``features``
        (masking, dropout) are replayed in the recompute, so both passes see the same features; features
        that are not floating point (masks, indices) pass through as they are.
        """
        count = self.cfg.train.grad_accum
        if count > 1 and self.cfg.train.accum_features and self.method.caches_features:
            return self._accumulate_cached([next(micro_batches) for _ in range(count)], progress)
        sums: dict[str, torch.Tensor] = {}
        for i in range(count):
            with self._sync(i == count - 1):
                with autocast(self.device, self.cfg.train.precision):
                    losses = self.ddp(next(micro_batches), progress)
                    loss = total_loss(losses)
                self.scaler.scale(loss / count).backward()
            for key, value in {**losses, "loss": loss}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / count
        return sums

    def _accumulate_cached(self, batches: list[dict], progress: Progress) -> dict[str, torch.Tensor]:
        """Gradient caching over ``batches`` (see :meth:`accumulate_gradients`)."""
        count = len(batches)
        rng_states, cached = [], []
        with torch.no_grad(), autocast(self.device, self.cfg.train.precision):
            for batch in batches:  # the recompute below replays each micro-batch's random numbers
                rng_states.append(_torch_rng_state())
                cached.append(self.method.features(self.model, batch, progress))
        rng_after = _torch_rng_state()
        leaves = [{k: v.detach().requires_grad_() if v.is_floating_point() else v for k, v in part.items()}
                  for part in cached]
        with autocast(self.device, self.cfg.train.precision):
            losses = self.method.loss(self.model, {k: torch.cat([p[k] for p in leaves]) for k in leaves[0]},
                                      progress)
            loss = total_loss(losses)
        params = [p for p in self.module.parameters() if p.requires_grad]
        inputs = [v for part in leaves for v in part.values() if v.requires_grad] + params
        grads = iter(torch.autograd.grad(self.scaler.scale(loss), inputs, allow_unused=True))
        feature_grads = [{k: next(grads) for k, v in part.items() if v.requires_grad} for part in leaves]
        direct = [(p, g) for p, g in zip(params, grads) if g is not None]  # the loss's own parameters
        for i, batch in enumerate(batches):
            last = i == count - 1
            _set_torch_rng_state(rng_states[i])
            with self._sync(last):
                with autocast(self.device, self.cfg.train.precision):  # direct gradients join DDP's synced pass
                    own = self.ddp(batch, progress, features_only=True, direct=direct if last else ())
                share = own.pop("direct_share", 0.0)
                share = share + sum((own[k] * g).sum() for k, g in feature_grads[i].items() if g is not None)
                share.backward()
        _set_torch_rng_state(rng_after)
        return {**{k: v.detach().float() for k, v in losses.items()}, "loss": loss.detach()}

    def train_step(self, batches: Iterator[dict]) -> None:
        """One optimizer step; its values stay on the device in ``self.pending`` until :meth:`flush_log`."""
        cfg = self.cfg
        lr = learning_rate(self.step, cfg.train.steps, cfg.optim) * self.lr_factor
        set_learning_rate(self.optimizer, lr)
        progress = Progress(self.step, cfg.train.steps, self.epoch_of(self.data_position))
        micro_batches = (self._next_batch(batches) for _ in range(cfg.train.grad_accum))
        values = self.accumulate_gradients(micro_batches, progress)
        if cfg.optim.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            values["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.optim.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.method.after_step(self.model, progress)
        self.pending.append({"step": self.step, "values": values, "lr": lr,
                             "epoch": self.epoch_of(self.data_position)})
        self.step += 1

    def flush_log(self) -> dict[str, float]:
        """Read the pending steps' values back from the device (the one host-device sync), average them
        over ranks, stop at the first step with a NaN/inf term, and write one metrics.jsonl line per step.
        Returns the last step's values."""
        if not self.pending:
            return self.last_values
        keys = sorted(self.pending[0]["values"])
        table = torch.stack([torch.stack([p["values"][k].reshape(()).double() for k in keys])
                             for p in self.pending])
        if self.dist.enabled:
            dist.all_reduce(table)
            table /= self.dist.world_size
        rows = table.tolist()
        now = time.perf_counter()
        samples = self.cfg.data.batch_size * self.cfg.train.grad_accum * self.dist.world_size
        elapsed = max(now - self.flush_time, 1e-9)
        speed = samples * len(rows) / elapsed
        throughput = {"samples_per_s": speed, "samples_per_s_per_device": speed / self.dist.world_size,
                      "data_wait_share": min(self.data_wait / elapsed, 1.0)}
        if self.device.type == "cuda":
            throughput["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.flush_time, self.data_wait = now, 0.0
        self._warn_without_regions()
        data = self._data_health()
        for i, (pending, row) in enumerate(zip(self.pending, rows)):
            values = dict(zip(keys, row))
            check_finite(pending["step"], values)
            values.update(lr=pending["lr"], epoch=pending["epoch"], samples=samples, **throughput)
            if i == len(rows) - 1:
                values.update(data)  # running data-health counts, on the last line of each flush
            if self.log is not None:
                self.log.write(pending["step"] + 1, values)
        self.pending.clear()
        self.last_values = values
        return values

    def _warn_without_regions(self) -> None:
        """Once, at the first log flush: a method that trains on regions got none from the data so far (its
        region losses would stay 0 without a word)."""
        if self.regions_seen == 0 and self.dist.is_main:
            cfg = self.cfg
            log.warning("data.train.path=%r gave no regions in its first %d records, but method.name=%s trains "
                        "on regions (%s): its region losses stay 0. Train on region-text records (boxes, e.g. "
                        "from `finegrain annotate`) or change those settings", cfg.data.train.path,
                        self.bad_records.seen, cfg.method.name, self.method.region_settings())
        self.regions_seen = None

    def _data_health(self) -> dict[str, int]:
        """Bad records, records seen, bad regions and fixed boxes so far, summed over ranks, the skips found
        since the last call appended to ``bad_records.jsonl``; stops the run on every rank alike when one
        rank's bad records exceed ``data.max_bad_fraction``."""
        reason = self.bad_records.over_limit()
        counts = {"data/bad_records": self.bad_records.bad, "data/records_seen": self.bad_records.seen,
                  "data/bad_regions": self.bad_records.bad_regions,
                  **{f"data/{k}": v for k, v in self.data_counts.items()}, "over_limit": int(reason is not None)}
        entries = all_gather_objects(self.bad_records.take_entries())
        if self.bad_records_file is not None:
            self.bad_records_file.write([entry for rank_entries in entries for entry in rank_entries])
        if self.dist.enabled:
            t = torch.tensor(list(counts.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            counts = dict(zip(counts, (int(v) for v in t.tolist())))
        if counts.pop("over_limit"):
            raise DataError(reason or "another rank's bad records exceed data.max_bad_fraction (its log names them)")
        return counts

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            self.release_run_folder()

    def _fit(self) -> TrainResult:
        cfg = self.cfg
        self.module.train()
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", disable=not self.progress_bar,
                   dynamic_ncols=True)
        stop = StopSignals(cfg.train.log_every, self.device)
        with stop, bar:
            with stop.shield_children():  # loader workers start here
                batches = iter(self.loader)  # its own generator seeds the workers: torch's is left as resumed
            self.flush_time, self.data_wait = time.perf_counter(), 0.0
            started, first_step = time.perf_counter(), self.step
            quiet = not self.progress_bar and self.dist.is_main
            every = print_interval(cfg)
            while self.step < cfg.train.steps:
                self.train_step(batches)
                bar.update(1)
                if stop.should_stop(self.step):  # Ctrl-C / SIGTERM: checkpoint this step, skip evaluation
                    break
                evaluate_now = cfg.train.eval_every and self.step % cfg.train.eval_every == 0
                save_now = self.step % cfg.train.save_every == 0
                if self.step % cfg.train.log_every == 0 or evaluate_now or save_now:
                    last = self.flush_log()
                    bar.set_postfix(progress_fields(last))
                    if quiet and self.step % every == 0:
                        per_step = (time.perf_counter() - started) / (self.step - first_step)
                        print(status_line(self.step, cfg.train.steps, last, per_step), flush=True)
                if evaluate_now and self.step < cfg.train.steps:
                    self.evaluate()
                if save_now and self.step < cfg.train.steps:
                    self.save()
            self.flush_log()
        checkpoint = self.save()
        if stop.should_stop():
            if self.dist.is_main:
                self.log.close()
            raise TrainingStopped(stop.signal_name, self.step, checkpoint)
        self.evaluate()
        if self.dist.is_main:
            self.log.close()
            from ..viz.curves import plot_curves

            plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
            bad, seen, regions = (self.last_values.get(f"data/{k}", 0) for k in ("bad_records", "records_seen",
                                                                                   "bad_regions"))
            if bad or regions:
                print(f"skipped {bad} of {seen} records and {regions} malformed regions (every one in "
                      f"{self.out_dir / 'bad_records.jsonl'}); first: {'; '.join(self.bad_records.first_examples())}")
        return TrainResult(self.out_dir, self.step, self.last_values, self.eval_metrics)


def train(cfg: ExperimentConfig, resume: str | None = None, progress_bar: bool = True) -> TrainResult:
    """Train per ``cfg`` (resume from ``"latest"`` or a checkpoint path) and return the result."""
    return Trainer(cfg, resume=resume, progress_bar=progress_bar).fit()
