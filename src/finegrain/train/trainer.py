"""The training loop. It knows models, methods and data only through their interfaces:
``method(model, batch, progress) -> {name: tensor}``, ``method.sample_spec()``, ``method.after_step``.

One process or many (``torchrun``: DDP over a module holding both the model and the method, so every
trainable parameter, heads included, has its gradients all-reduced). Step-granular, atomic checkpoints
and exact resume (same data order, same RNG).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .. import __version__
from ..config import ExperimentConfig, config_to_yaml, to_dict
from ..data.dataset import BadRecordCounter
from ..data.loader import build_train_loader, resolve_source
from ..data.sample import SampleBuilder
from ..models import FinegrainCLIP, create_model, get_tokenizer
from ..objectives import Method, Progress, create_method
from . import checkpoint as ckpt
from .distributed import all_gather_objects, barrier, broadcast_object, init_distributed
from .metrics_log import MetricsLog
from .optim import create_optimizer, learning_rate, set_learning_rate
from .provenance import run_info

MAX_LOGIT_SCALE = math.log(100)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the step and the loss terms."""


class TrainModule(nn.Module):
    """Model + method in one module, so DDP sees (and synchronises) every trainable parameter."""

    def __init__(self, model: FinegrainCLIP, method: Method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, batch: dict, progress: Progress) -> dict[str, torch.Tensor]:
        return self.method(self.model, batch, progress)


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = [v for k, v in losses.items() if k.endswith("_loss")]
    if not terms:
        raise ValueError(f"the method returned no '*_loss' term (keys: {sorted(losses)})")
    return torch.stack([t.float() for t in terms]).sum()


def check_finite(step: int, losses: dict[str, float]) -> None:
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in losses.items())
        raise NonFiniteLossError(f"non-finite loss at step {step}: {sorted(bad)} ({terms}); stopping. "
                                 "Lower optim.lr, enable optim.clip_grad_norm, or use train.precision=bf16.")


class Trainer:
    """Builds everything from a config and runs ``cfg.train.steps`` optimizer steps."""

    def __init__(self, cfg: ExperimentConfig, resume: str | None = None, progress_bar: bool = True):
        self.cfg = cfg
        self.dist, self.device = init_distributed(cfg.train.device)
        self.out_dir = Path(cfg.train.output_dir)
        self.progress_bar = progress_bar and self.dist.is_main
        seed_everything(cfg.train.seed + self.dist.rank)

        self.model = create_model(cfg.model.name, cfg.model.pretrained, image_size=cfg.model.image_size)
        if cfg.model.lock_text:
            self.model.lock_text_tower()
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.method = create_method(cfg.method.name, cfg.method.options, self.model)
        self.module = TrainModule(self.model, self.method).to(self.device)
        self.tokenizer = get_tokenizer(cfg.model.name)
        pp = open_clip.get_model_preprocess_cfg(self.model.clip)
        self.mean, self.std = pp["mean"], pp["std"]
        self.builder = SampleBuilder(self.method.sample_spec(), self.model.image_size, self.mean, self.std,
                                     self.tokenizer, train=True)
        self.optimizer = create_optimizer(self.module, cfg.optim, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.train.precision == "fp16")
        self.bad_records = BadRecordCounter(cfg.data.max_bad_fraction, cfg.data.min_records_before_bad_check)
        self.step = 0
        self.data_position = 0  # micro-batches consumed by this rank
        self.best = -math.inf
        self.eval_metrics: dict[str, float] = {}
        self.epoch_of: Callable[[int], float] = lambda position: 0.0  # set by fit() from the data source

        resume_path = ckpt.resolve_resume(resume, self.out_dir) if resume else None
        if resume_path is not None:
            self._load(resume_path)
        elif ckpt.list_checkpoints(self.out_dir) and not cfg.train.overwrite:
            raise FileExistsError(f"{self.out_dir} holds checkpoints of an earlier run: pass --resume latest to "
                                  "continue it, or train.overwrite=true to replace it")
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume_path is None:
                ckpt.prune_checkpoints(self.out_dir, 0)
                (self.out_dir / "best.pt").unlink(missing_ok=True)
            self._write_run_files(resume_path)
        barrier()
        self.log = (MetricsLog(self.out_dir, cfg.train.tensorboard, resume_step=self.step if resume_path else None)
                    if self.dist.is_main else None)

        if cfg.train.compile:
            self._compile_blocks()
        self.ddp = self.module
        if self.dist.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device] if self.device.type == "cuda" else None)

    # ----- set-up helpers -----------------------------------------------------------------------------
    def _compile_blocks(self) -> None:
        """Regional compilation: each transformer block is compiled once and reused by all its copies."""
        for module in self.model.modules():
            if type(module).__name__ == "ResidualAttentionBlock":
                module.compile(backend=self.cfg.train.compile_backend, dynamic=False)

    def _write_run_files(self, resume_path: Path | None) -> None:
        (self.out_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        info = run_info(self.cfg.train.seed, self.dist.world_size, str(self.device))
        info["resumed_from"] = str(resume_path) if resume_path else None
        name = "run_info.json" if resume_path is None else f"run_info_resume_{self.step:08d}.json"
        (self.out_dir / name).write_text(json.dumps(info, indent=2))

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.clip.load_state_dict(state["state_dict"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.data_position = state["step"], state["data_position"]
        self.best = state.get("best", -math.inf)
        self.bad_records.load_state_dict(state["bad_records"])
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            ckpt.restore_rng(rng[self.dist.rank])
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")

    def _state(self) -> dict:
        rng = all_gather_objects(ckpt.capture_rng())
        return {
            "state_dict": self.model.clip.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "data_position": self.data_position,
            "best": self.best,
            "bad_records": self.bad_records.state_dict(),
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
        """``(records, image root)`` of ``data.val``, read once per run."""
        return resolve_source(self.cfg.data.val)

    def evaluate(self) -> dict[str, float]:
        """Run ``train.eval_tasks`` on ``data.val`` (rank 0; others wait) and keep ``best.pt``."""
        if self.cfg.data.val is None:
            return {}
        metrics = None
        if self.dist.is_main:
            from ..eval import evaluate

            records, root = self.val_source
            transform = open_clip.image_transform(self.model.image_size, is_train=False, mean=self.mean, std=self.std)
            with autocast(self.device, self.cfg.train.precision):
                metrics = evaluate(self.model, self.cfg.train.eval_tasks, records, root, transform, self.tokenizer,
                                   batch_size=self.cfg.data.batch_size, device=self.device, progress=False)
            self.log.write(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        metrics = broadcast_object(metrics)
        self.eval_metrics = metrics
        key = self.cfg.train.best_metric
        if key is not None:
            if key not in metrics:
                raise KeyError(f"train.best_metric={key!r} is not among the eval metrics {sorted(metrics)}")
            if metrics[key] > self.best:
                self.best = metrics[key]
                state = self._state()
                if self.dist.is_main:
                    ckpt.save_atomic(state, self.out_dir / "best.pt")
        return metrics

    # ----- the loop -----------------------------------------------------------------------------------
    def _reduce_for_log(self, values: dict[str, float]) -> dict[str, float]:
        if not self.dist.enabled:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.dist.world_size for k, v in zip(keys, t.tolist())}

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the logged values."""
        cfg = self.cfg
        total = cfg.train.steps
        lr = learning_rate(self.step, total, cfg.optim)
        set_learning_rate(self.optimizer, lr)
        sums: dict[str, float] = {}
        samples = 0
        for micro in range(cfg.train.grad_accum):
            batch = next(batches)
            self.data_position += 1
            samples += len(batch["text"])
            self.bad_records.update(len(batch["text"]), batch.pop("bad_records"))
            progress = Progress(self.step, total, self.epoch_of(self.data_position))
            batch = to_device(batch, self.device)
            last = micro == cfg.train.grad_accum - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.ddp.no_sync()
            with sync:
                with autocast(self.device, cfg.train.precision):
                    losses = self.ddp(batch, progress)
                    loss = total_loss(losses)
                values = {k: float(v.detach()) for k, v in losses.items()}
                values["loss"] = float(loss.detach())
                check_finite(self.step, values)
                self.scaler.scale(loss / cfg.train.grad_accum).backward()
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.train.grad_accum
        if cfg.optim.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.optim.clip_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.method.after_step(self.model, Progress(self.step, total, self.epoch_of(self.data_position)))
        self.step += 1
        values = self._reduce_for_log(sums)
        values.update(lr=lr, epoch=self.epoch_of(self.data_position), samples=samples * self.dist.world_size)
        return values

    def fit(self) -> TrainResult:
        cfg = self.cfg
        loader, self.epoch_of = build_train_loader(cfg.data, self.builder, cfg.train.seed, self.dist.rank,
                                                   self.dist.world_size, start_batch=self.data_position)
        batches = iter(loader)
        self.module.train()
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", disable=not self.progress_bar,
                   dynamic_ncols=True)
        last: dict[str, float] = {}
        timer = time.perf_counter()
        try:
            while self.step < cfg.train.steps:
                last = self.train_step(batches)
                now = time.perf_counter()
                last["samples_per_s"] = last["samples"] / max(now - timer, 1e-9)
                timer = now
                if self.dist.is_main:
                    self.log.write(self.step, last)
                    bar.update(1)
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", samples_s=f"{last['samples_per_s']:.0f}")
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                    self.evaluate()
                if self.step % cfg.train.save_every == 0 and self.step < cfg.train.steps:
                    self.save()
        finally:
            bar.close()
        self.save()
        self.evaluate()
        if self.dist.is_main:
            self.log.close()
            from ..viz.curves import plot_curves

            plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
            if self.bad_records.bad:
                print(f"skipped {self.bad_records.bad} of {self.bad_records.seen} records; first: "
                      f"{self.bad_records.examples[:3]}")
        return TrainResult(self.out_dir, self.step, last, self.eval_metrics)


def train(cfg: ExperimentConfig, resume: str | None = None, progress_bar: bool = True) -> TrainResult:
    """Train per ``cfg`` (resume from ``"latest"`` or a checkpoint path) and return the result."""
    return Trainer(cfg, resume=resume, progress_bar=progress_bar).fit()
