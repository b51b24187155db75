#!/usr/bin/env python
"""Whole training runs: `finegrain train` against open_clip's own trainer (`open_clip_train`), same data,
model and settings, as whole processes (start-up, data loading, steps, logging, checkpoints).

Data: the demo's training images (2,000 64x64 PNGs with two captions each): finegrain reads its
region-text JSONL (one record per image, a caption drawn per sample), open_clip_train a CSV holding both
captions of each image as rows (4,000 rows). Both run the same number of samples: ``--steps`` x
``--batch-size`` (310 x 64 = 5 open_clip epochs of 62 batches). Model ``finegrain-tiny`` (open_clip_train
gets its config through ``open_clip.add_model_config``), AdamW (0.9, 0.98), eps 1e-6, lr 1e-3, weight decay
0.1, 30 warmup steps then cosine, fp32 on the CPU, ``--workers`` loader workers, one checkpoint at the end,
no evaluation. open_clip_train needs ``braceexpand``, ``webdataset`` and ``pandas``.

The runs alternate (finegrain, open_clip, finegrain, ...) for ``--pairs`` pairs; the wall time and the CPU
time (user + system of the process and its loader workers) of each are measured from the outside, and the
ratios finegrain / open_clip of the medians reported (goal: wall ratio <= 1.0).

  python benchmarks/whole_run.py                          # 3 pairs on the CPU (about 15 min on 2 cores)
  python benchmarks/whole_run.py --pairs 1 --steps 100    # a quick look
  python benchmarks/whole_run.py --device cuda --model ViT-B-16 --batch-size 256 --workers 16 \\
      --precision bf16 --data /data/coco-jpeg.jsonl    # a GPU comparison on your own JPEG data
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from step_time import print_rows

from finegrain.data.demo import ensure_demo_dataset
from finegrain.data.readers import read_jsonl

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "src" / "finegrain" / "models" / "model_configs"
OPEN_CLIP_MAIN = ("import sys, open_clip; open_clip.add_model_config(sys.argv.pop(1)); "
                  "from open_clip_train.main import main; main(sys.argv[1:])")


def write_csv(records_path: Path, root: Path, out: Path) -> int:
    """open_clip_train's CSV (tab-separated ``filepath``, ``title``): one row per caption; returns rows."""
    rows = [(str(root / record.image), caption) for record in read_jsonl(records_path, strict=True)
            for caption in record.captions]
    with out.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return len(rows)


def finegrain_command(args, records: Path, root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "finegrain", "train", "--no-progress",
            f"model.name={args.model}", "method.name=clip", f"data.train.path={records}", f"data.train.root={root}",
            f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}", f"optim.lr={args.lr}",
            "optim.weight_decay=0.1", "optim.warmup_steps=30", "optim.betas=[0.9,0.98]", "optim.eps=1e-6",
            f"train.steps={args.steps}", f"train.save_every={args.steps}", f"train.device={args.device}",
            f"train.precision={args.precision}", f"train.output_dir={out}", "train.overwrite=true"]


def open_clip_command(args, table: Path, rows: int, out: Path) -> list[str]:
    batches = rows // args.batch_size
    epochs = -(-args.steps // batches)
    return [sys.executable, "-c", OPEN_CLIP_MAIN, str(MODEL_CONFIGS), "--train-data", str(table),
            "--dataset-type", "csv", "--csv-separator", "\t", "--model", args.model,
            "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--lr", str(args.lr),
            "--wd", "0.1", "--warmup", "30", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
            "--epochs", str(epochs), "--save-frequency", str(epochs), "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--device", args.device,
            "--precision", {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision],
            "--logs", str(out.parent), "--name", out.name, "--log-every-n-steps", "1000"]


def timed(command: list[str], log: Path) -> dict[str, float]:
    """Run ``command`` to completion; its wall and CPU seconds (its own and its children's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as f:
        subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3, help="interleaved finegrain/open_clip pairs (default: %(default)s)")
    p.add_argument("--steps", type=int, default=310, help="optimizer steps of each run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="loader workers (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="finegrain-tiny", help="(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--data", default=None,
                   help="region-text JSONL to train on, image paths relative to its folder (default: the demo's "
                        "training split)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    records = Path(args.data) if args.data else ensure_demo_dataset() / "train.jsonl"
    root = records.parent
    work = Path(tempfile.mkdtemp(prefix="finegrain-whole-run-"))
    rows = write_csv(records, root, work / "train.csv")
    runs: dict[str, list[dict[str, float]]] = {"finegrain": [], "open_clip": []}
    for pair in range(args.pairs):
        for name, results in runs.items():
            out = work / f"{name}-{pair}"
            command = (finegrain_command(args, records, root, out) if name == "finegrain"
                       else open_clip_command(args, work / "train.csv", rows, out))
            results.append(timed(command, work / f"{name}-{pair}.log"))
            print(f"pair {pair + 1}: {name:9s} wall {results[-1]['wall_s']:6.1f} s, "
                  f"CPU {results[-1]['cpu_s']:6.1f} s", flush=True)
    median = {name: {k: statistics.median(r[k] for r in values) for k in ("wall_s", "cpu_s")}
              for name, values in runs.items()}
    ratios = {k: median["finegrain"][k] / median["open_clip"][k] for k in ("wall_s", "cpu_s")}
    pair_ratios = [f["wall_s"] / o["wall_s"] for f, o in zip(runs["finegrain"], runs["open_clip"])]
    print_rows(["whole process", "finegrain train", "open_clip_train", "ratio"],
               [["wall s (median)", f"{median['finegrain']['wall_s']:.1f}", f"{median['open_clip']['wall_s']:.1f}",
                 f"{ratios['wall_s']:.3f} (pairs {min(pair_ratios):.3f}-{max(pair_ratios):.3f})"],
                ["CPU s (median)", f"{median['finegrain']['cpu_s']:.1f}", f"{median['open_clip']['cpu_s']:.1f}",
                 f"{ratios['cpu_s']:.3f}"]],
               f"({args.model}, batch {args.batch_size}, {args.workers} workers, {args.steps} steps, {args.device} "
               f"{args.precision}; logs in {work}) -> wall ratio {'PASS' if ratios['wall_s'] <= 1.0 else 'FAIL'} "
               "(goal <= 1.0)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "median": median, "ratios": ratios,
                                               "pair_ratios": pair_ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
