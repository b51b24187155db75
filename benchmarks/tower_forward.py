#!/usr/bin/env python
"""Vision-tower forward time: finegrain's tower vs open_clip's own forward, and v-only dense vs global only.

For each model, one process builds ``finegrain.create_model(name)`` (random weights) and times, under
``torch.no_grad`` on the same random batch, interleaved for ``--repeats`` rounds after ``--warmup`` calls:

  open_clip  ``model.clip.visual(images)``: open_clip's own forward of the vision tower;
  finegrain  ``model.encode_image(images)``: the same embedding through finegrain's tower walk (checked
             equal to open_clip's);
  dense      ``model.forward_tower(images, dense="v_only")``: the global embedding and the v-only dense map
             from one pass (the dense path re-runs the last block without attention mixing: about one
             extra block).

Ratios of medians: finegrain / open_clip (goal <= 1.05) and dense / finegrain (expected about 1 + 1/L for
L blocks, printed beside it).

Examples:
  python benchmarks/tower_forward.py                                  # ViT-B-16 and EVA02-B-16, batch 4 @224, CPU
  python benchmarks/tower_forward.py --models ViT-B-16 --batch-size 8 --json out.json
  python benchmarks/tower_forward.py --device cuda --precision bf16 --batch-size 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from step_time import relative_iqr, run_benchmark, sync

import finegrain
from finegrain.train.trainer import autocast


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def run_model(name: str, args, device) -> dict:
    torch.manual_seed(args.seed)
    model = finegrain.create_model(name).to(device).eval()
    images = torch.randn(args.batch_size, 3, *model.image_size, device=device)
    calls = {"open_clip": lambda: model.clip.visual(images), "finegrain": lambda: model.encode_image(images),
             "dense": lambda: model.forward_tower(images, dense="v_only")}
    with torch.no_grad(), autocast(device, args.precision):
        difference = (model.encode_image(images) - model.clip.visual(images)).abs().max().item()
        for fn in calls.values():
            for _ in range(args.warmup):
                fn()
        times = {k: [] for k in calls}
        for _ in range(args.repeats):
            for k, fn in calls.items():
                times[k].append(timed(fn, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    layers = model.tower.num_layers
    result = {"model": name, "batch_size": args.batch_size, "image_size": list(model.image_size), "layers": layers,
              "device": str(device), "precision": args.precision, "repeats": args.repeats,
              "max_abs_difference_vs_open_clip": difference, "times_s": times, "median_s": med,
              "relative_iqr": {k: relative_iqr(v) for k, v in times.items()},
              "finegrain_vs_open_clip": med["finegrain"] / med["open_clip"],
              "dense_vs_global": med["dense"] / med["finegrain"], "expected_dense_vs_global": 1 + 1 / layers}
    result["pass"] = result["finegrain_vs_open_clip"] <= args.threshold
    print(f"{name:12s} batch {args.batch_size}: open_clip {med['open_clip'] * 1e3:8.1f} ms  finegrain "
          f"{med['finegrain'] * 1e3:8.1f} ms  dense {med['dense'] * 1e3:8.1f} ms  finegrain/open_clip "
          f"{result['finegrain_vs_open_clip']:.3f} ({'PASS' if result['pass'] else 'FAIL'} at {args.threshold})  "
          f"dense/global {result['dense_vs_global']:.3f} (1 + 1/{layers} = {1 + 1 / layers:.3f})  "
          f"max |diff| {difference:.1e}", flush=True)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ViT-B-16,EVA02-B-16", help="comma-separated (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threshold", type=float, default=1.05, help="PASS when finegrain/open_clip <= this")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", default=None)
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_benchmark(args, lambda device: [run_model(name, args, device) for name in args.models])


if __name__ == "__main__":
    sys.exit(main())
