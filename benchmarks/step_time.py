#!/usr/bin/env python
"""Training-step time and peak memory: finegrain's CLIP step vs. plain open_clip, in one process.

For each model (and batch size) two set-ups are built from the same initial weights and stepped on the
same synthetic batch (random images of the model's input size, random token ids of its context length):

  finegrain  the trainer itself: ``finegrain.train.trainer.Trainer`` built from a config (model ``name``,
             method ``clip``), stepped with ``Trainer.train_step`` on a loader-style batch (uint8 images on
             the host, moved and normalised on the device) and read back with ``Trainer.flush_log`` (a
             log step's read-back, here after every step): the real code path, not a copy of it.
  open_clip  ``open_clip.create_model(name)`` (weights copied from the finegrain model's state dict) +
             ``open_clip.loss.ClipLoss()`` on ``model(image, text)`` (``output_dict=True``) with float
             images normalised on the host (as open_clip's loader gives them), AdamW with open_clip's
             trainer groups (checked equal to finegrain's), learning-rate set, ``loss.item()``, backward,
             step, zero_grad, clamp.

Method: ``--warmup`` steps of each (default 3), then A,B,A,B,... interleaved for ``--repeats`` pairs, so
that load from other jobs on the machine hits both alike. One step's time covers forward, loss, backward
and optimizer step (CUDA: synchronised before and after). The medians are compared:
ratio = median(finegrain) / median(open_clip); PASS when ratio <= ``--threshold`` (1.05). The exit code
is 0 either way, unless ``--strict`` (then 1 when any configuration FAILs).

Peak memory is measured in one extra, untimed step of each set-up after the timing: on CUDA
``torch.cuda.max_memory_allocated()`` (reset before the step) minus the memory allocated before the step
(weights and optimizer state of both set-ups stay resident, so the delta is what one step adds:
activations, gradients, optimizer temporaries); on CPU the peak resident-set size sampled every ~1 ms
(``psutil``) minus the RSS before the step (after glibc ``malloc_trim``), which is approximate (the
allocator may reuse memory it kept), and "n/a on CPU" when psutil is not installed.

Examples:
  python benchmarks/step_time.py                                  # CPU: finegrain-tiny@64, ViT-B-16@4
  python benchmarks/step_time.py --models finegrain-tiny --repeats 40 --json out.json
  python benchmarks/step_time.py --device cuda --precision bf16 --models ViT-B-16 --batch-sizes 256
  python benchmarks/step_time.py --device cuda --precision bf16 --compile --models ViT-B-16 --batch-sizes 256
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import open_clip
import torch

import finegrain
from finegrain.config import OptimConfig, load_config
from finegrain.models.clip import open_clip_no_decay
from finegrain.train.optim import learning_rate, set_learning_rate
from finegrain.train.trainer import MAX_LOGIT_SCALE, Trainer, autocast

try:
    import psutil
except ImportError:  # memory on CPU is then reported as n/a
    psutil = None

DEFAULT_MODELS = ["finegrain-tiny", "ViT-B-16"]
DEFAULT_BATCH_SIZES = {"finegrain-tiny": 64, "ViT-B-16": 4}  # without --batch-sizes; other models: 32
SMALL_MODEL_PARAMS = 50_000_000  # default repeats: 20 below this many parameters, 5 at or above
NOISY_IQR = 0.10  # warn when a set-up's step times scatter more than this (IQR / median)
TOTAL_STEPS = 10_000  # for the learning-rate schedule only


# ----- the two set-ups ------------------------------------------------------------------------------------
class FinegrainSetup:
    """finegrain's own training step, run by the trainer itself: ``Trainer.train_step`` on a loader-style
    batch (uint8 images on the host, moved and normalised on the device), then ``Trainer.flush_log`` (the
    read-back of the loss that a log step does; here every step)."""

    label = "finegrain"

    def __init__(self, name: str, device: torch.device, precision: str, compile_blocks: bool, out_dir: str):
        cfg = load_config(None, [f"model.name={name}", f"train.device={device.type}",
                                 f"train.precision={precision}", f"train.compile={str(compile_blocks).lower()}",
                                 f"train.output_dir={out_dir}", f"train.steps={TOTAL_STEPS}", "train.log_every=1"])
        self.trainer = Trainer(cfg, progress_bar=False)
        self.model, self.optimizer, self.device = self.trainer.model, self.trainer.optimizer, device

    def step(self, batch: dict) -> float:
        self.trainer.train_step(iter([dict(batch, bad_records=[])]))
        return self.trainer.flush_log()["loss"]


class OpenCLIPSetup:
    label = "open_clip"

    def __init__(self, name: str, state_dict: dict, device: torch.device, precision: str):
        self.device, self.precision = device, precision
        self.model = open_clip.create_model(name, output_dict=True)
        self.model.load_state_dict(state_dict)
        self.model.to(device).train()
        self.loss_fn = open_clip.loss.ClipLoss()
        self.optimizer = open_clip_optimizer(self.model, OptimConfig(), fused=device.type == "cuda")
        self.cfg = OptimConfig()
        self.step_count = 0

    def step(self, batch: dict) -> float:
        set_learning_rate(self.optimizer, learning_rate(self.step_count, TOTAL_STEPS, self.cfg))
        image = batch["float_image"].to(self.device, non_blocking=True)
        text = batch["text"].to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            out = self.model(image, text)
            loss = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        value = loss.item()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        self.step_count += 1
        return value

    def blocks(self):
        return [m for m in self.model.modules() if isinstance(m, open_clip.transformer.ResidualAttentionBlock)]


def open_clip_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with open_clip's trainer groups: no decay for rank < 2 tensors, norms, biases, logit scale."""
    plain, decay = [], []
    for name, p in model.named_parameters():
        (plain if open_clip_no_decay(name, p) else decay).append(p)
    groups = [{"params": plain, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


# ----- measuring ------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(setup, batch: dict) -> tuple[float, float]:
    sync(setup.device)
    start = time.perf_counter()
    loss = setup.step(batch)
    sync(setup.device)
    return time.perf_counter() - start, loss


class RSSSampler:
    """Peak resident-set size of this process, sampled by a thread every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.start_rss = self.process.memory_info().rss
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def release_free_memory() -> None:
    """glibc: give freed heap memory back to the OS, so a step's allocations show up as RSS growth."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(setup, batch: dict) -> float | None:
    """What one (untimed) step adds to memory at its peak, in MiB; None where it cannot be measured."""
    device = setup.device
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        setup.step(batch)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if psutil is None:
        return None
    gc.collect()
    release_free_memory()
    with RSSSampler() as sampler:
        setup.step(batch)
    return (sampler.peak - sampler.start_rss) / 2**20


def synthetic_batch(model, batch_size: int, generator: torch.Generator, mean, std) -> dict:
    """A loader-style host batch: random uint8 images of the model's input size (``image``; the same
    pixels normalised as floats in ``float_image`` for open_clip) and random token ids."""
    height, width = model.image_size
    vocab = getattr(model.clip, "vocab_size", None) or model.clip.token_embedding.num_embeddings
    image = torch.randint(0, 256, (batch_size, 3, height, width), generator=generator, dtype=torch.uint8)
    float_image = (image.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    text = torch.randint(0, vocab, (batch_size, model.context_length), generator=generator)
    pin = torch.cuda.is_available()
    return {"image": image.pin_memory() if pin else image, "float_image": float_image, "text": text}


def relative_iqr(values: list[float]) -> float:
    """(75th - 25th percentile) / median: how much the step times of one set-up scatter."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_groups(optimizer) -> list[tuple[int, int]]:
    return [(len(g["params"]), sum(p.numel() for p in g["params"])) for g in optimizer.param_groups]


def run_config(name: str, batch_size: int, args, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    fg = FinegrainSetup(name, device, args.precision, args.compile, tempfile.mkdtemp(prefix="finegrain-bench-"))
    oc = OpenCLIPSetup(name, fg.model.clip.state_dict(), device, args.precision)
    if describe_groups(fg.optimizer) != describe_groups(oc.optimizer):
        raise RuntimeError(f"AdamW parameter groups differ: finegrain {describe_groups(fg.optimizer)} vs "
                           f"open_clip {describe_groups(oc.optimizer)}")
    if args.compile:
        for block in oc.blocks():
            block.compile()
    batch = synthetic_batch(fg.model, batch_size, torch.Generator().manual_seed(args.seed), fg.trainer.mean,
                            fg.trainer.std)
    n_params = count_params(fg.model)
    repeats = args.repeats or (20 if n_params < SMALL_MODEL_PARAMS else 5)
    print(f"\n== {name}  batch {batch_size}  image {tuple(fg.model.image_size)}  context {fg.model.context_length}"
          f"  params {n_params / 1e6:.1f}M  device {device}  {args.precision}"
          f"{'  compiled blocks' if args.compile else ''}  warmup {args.warmup}  repeats {repeats}", flush=True)

    # warm-up; the first step of each starts from the same weights, so their losses must agree
    first = {}
    for setup in (fg, oc):
        for i in range(args.warmup):
            seconds, loss = timed_step(setup, batch)
            first.setdefault(setup.label, loss)
            print(f"  warmup {setup.label:9s} {i + 1}/{args.warmup}: {seconds * 1e3:9.1f} ms  loss {loss:.5f}",
                  flush=True)
    loss_diff = abs(first["finegrain"] - first["open_clip"]) if first else float("nan")
    if first:
        print(f"  first-step loss |finegrain - open_clip| = {loss_diff:.2e} (same weights, same batch)", flush=True)

    times = {"finegrain": [], "open_clip": []}
    for i in range(repeats):
        for setup in (fg, oc):
            seconds, _ = timed_step(setup, batch)
            times[setup.label].append(seconds)
        print(f"  pair {i + 1:3d}/{repeats}: finegrain {times['finegrain'][-1] * 1e3:9.1f} ms   "
              f"open_clip {times['open_clip'][-1] * 1e3:9.1f} ms", flush=True)

    memory = {setup.label: peak_memory_mb(setup, batch) for setup in (fg, oc)}

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["finegrain"] / med["open_clip"]
    paired = statistics.median(a / b for a, b in zip(times["finegrain"], times["open_clip"]))
    spread = {k: relative_iqr(v) for k, v in times.items()}
    result = {
        "model": name, "batch_size": batch_size, "image_size": list(fg.model.image_size),
        "context_length": fg.model.context_length, "params": n_params, "device": str(device),
        "precision": args.precision, "compile": args.compile, "warmup": args.warmup, "repeats": repeats,
        "first_step_loss": first, "first_step_loss_abs_diff": loss_diff,
        "times_s": times,
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "samples_per_s": {k: batch_size / v for k, v in med.items()},
        "peak_memory_mib": memory,
        "memory_method": ("cuda max_memory_allocated - allocated before the step" if device.type == "cuda" else
                          "sampled peak RSS - RSS before the step (psutil, after malloc_trim; approximate)" if psutil else
                          "n/a on CPU (psutil not installed)"),
        "relative_iqr": spread, "noisy": max(spread.values()) > NOISY_IQR,
        "ratio": ratio, "paired_ratio_median": paired,
        "threshold": args.threshold, "pass": ratio <= args.threshold,
    }
    print(f"  median: finegrain {med['finegrain'] * 1e3:.1f} ms, open_clip {med['open_clip'] * 1e3:.1f} ms, "
          f"ratio {ratio:.3f} (median of paired ratios {paired:.3f}) -> {'PASS' if result['pass'] else 'FAIL'}",
          flush=True)
    if result["noisy"]:
        print(f"  warning: noisy timings (interquartile range / median: finegrain {spread['finegrain']:.0%}, "
              f"open_clip {spread['open_clip']:.0%}); other load on the machine? rerun, or raise --repeats",
              flush=True)
    del fg, oc
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ----- reporting ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
        "finegrain": finegrain.__version__, "cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def fmt_mem(value: float | None) -> str:
    return "n/a on CPU" if value is None else f"{value:.0f}"


def print_table(results: list[dict]) -> None:
    headers = ["model", "batch", "prec", "fg ms", "oc ms", "fg samp/s", "oc samp/s", "fg MiB", "oc MiB",
               "ratio", "result", "noise"]
    rows = [[r["model"], str(r["batch_size"]), r["precision"] + ("+compile" if r["compile"] else ""),
             f"{r['median_s']['finegrain'] * 1e3:.1f}", f"{r['median_s']['open_clip'] * 1e3:.1f}",
             f"{r['samples_per_s']['finegrain']:.1f}", f"{r['samples_per_s']['open_clip']:.1f}",
             fmt_mem(r["peak_memory_mib"]["finegrain"]), fmt_mem(r["peak_memory_mib"]["open_clip"]),
             f"{r['ratio']:.3f}", "PASS" if r["pass"] else "FAIL",
             f"IQR {max(r['relative_iqr'].values()):.0%}" + (" NOISY" if r["noisy"] else "")] for r in results]
    print_rows(headers, rows, "(median step time over interleaved repeats; ratio = finegrain / open_clip median; "
               "MiB = peak memory one step adds;\n noise = the larger interquartile range / median of the two "
               "set-ups' step times)")


def print_rows(headers: list[str], rows: list[list[str]], footnote: str) -> None:
    """A left-aligned text table under a rule, then a footnote."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print("\n" + line + "\n" + "-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(footnote)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " See the module docstring / docs/benchmarks.md for the method.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated model names (default: %(default)s)")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated batch sizes, one per model, or one for all (default: 64 for "
                        "finegrain-tiny, 4 for ViT-B-16, 32 for other models)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="fp32, or bf16 autocast as train.precision=bf16 (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="regional compilation: .compile() each open_clip ResidualAttentionBlock of both models")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps of each (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved A,B pairs to time (default: 20 for models under 50M parameters such as "
                        "finegrain-tiny, 5 otherwise such as ViT-B-16)")
    p.add_argument("--threshold", type=float, default=1.05,
                   help="PASS when median ratio finegrain/open_clip <= this (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="exit with code 1 when any configuration FAILs")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if args.batch_sizes is None:
        args.batch_sizes = [DEFAULT_BATCH_SIZES.get(m, 32) for m in args.models]
    else:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if len(args.batch_sizes) == 1:
        args.batch_sizes *= len(args.models)
    if len(args.batch_sizes) != len(args.models):
        p.error(f"--batch-sizes has {len(args.batch_sizes)} values for {len(args.models)} models")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def run_benchmark(args, run) -> int:
    """Open the device, ``run(device) -> results`` (a list of dicts), write ``--json``; 2 when the device
    is missing, else 0."""
    opened = open_device(args)
    if opened is None:
        return 2
    device, env = opened
    results = run(device)
    if args.json:
        write_json(args.json, env, args, results)
    return 0


def open_device(args) -> tuple[torch.device, dict] | None:
    """The ``--device`` (None, with a message, when CUDA is asked for and absent), ``--threads`` applied,
    and the environment, printed on one line."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    return device, env


def write_json(path: str, env: dict, args, results: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"environment": env, "args": vars(args), "results": results}, indent=2))
    print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    opened = open_device(args)
    if opened is None:
        return 2
    device, env = opened
    if device.type == "cpu" and psutil is None:
        print("note: psutil is not installed: peak memory is n/a on CPU")

    results = [run_config(name, bs, args, device) for name, bs in zip(args.models, args.batch_sizes)]
    print_table(results)
    failed = [f"{r['model']}@{r['batch_size']}" for r in results if not r["pass"]]
    if failed:
        print(f"\nFAIL: finegrain/open_clip step-time ratio > {args.threshold} for {', '.join(failed)}")
    else:
        print(f"\nPASS: finegrain/open_clip step-time ratio <= {args.threshold} for all configurations")
    if args.json:
        write_json(args.json, env, args, results)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
