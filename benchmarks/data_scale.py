#!/usr/bin/env python
"""Data-layer scale: sampler cost per micro-batch, time to open a large JSONL, loader memory with workers.

1. **Sampler.** ``ResumableBatchSampler`` micro-batch time at 100k, 3M and 15M records: the first batch of
   an epoch (it draws the epoch's permutation) and the median of the next ``--batches``; next to it the
   former formula, which drew the whole permutation for every micro-batch (``old_batch`` below, timed on
   5 batches), and the ratio of each to the 100k case.
2. **Opening a JSONL file** of ``--records`` generated region-text lines: ``read_jsonl`` (a line index)
   against the former list reader (every line parsed into a ``Record``; ``old_read`` below) on the first
   ``--old-records`` lines, extrapolated linearly and labelled so.
3. **Memory.** The main process holding ``read_jsonl`` of that file in a ``RecordDataset`` (the real
   training path: sampler, image decode, collate), alone and then with ``--workers`` forked DataLoader
   workers iterating ``--loader-batches`` batches: PSS and USS from ``/proc/<pid>/smaps_rollup`` of the
   main process and every worker. Target: total PSS within 1.5x of the main process alone. The same is
   measured for the former list of ``Record`` objects on ``--old-records`` lines, for comparison.

Generated data lives in a temporary directory that is removed at the end. Run from the repository root:

  python benchmarks/data_scale.py                      # the numbers in docs/data_scale.md (a few minutes)
  python benchmarks/data_scale.py --records 300000 --sizes 100000 1000000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from itertools import islice
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from finegrain.data.collate import collate
from finegrain.data.dataset import RecordDataset, ResumableBatchSampler, sample_seed
from finegrain.data.readers import read_jsonl
from finegrain.data.records import Record, parse_record


def old_batch(num_records: int, batch_size: int, seed: int, position: int) -> list[tuple[int, int]]:
    """The former sampler step (one rank): a fresh permutation of every record for each micro-batch."""
    epoch, batch = divmod(position, num_records // batch_size)
    order = torch.randperm(num_records, generator=torch.Generator().manual_seed(seed + epoch))
    start = batch * batch_size
    return [(int(i), sample_seed(seed, epoch, int(i))) for i in order[start:start + batch_size]]


def old_read(path: Path, limit: int) -> list[Record]:
    """The former JSONL reader: every line parsed into a Record, held in a list."""
    with path.open(encoding="utf-8") as f:
        return [parse_record(json.loads(line), f"{path}:{n}") for n, line in enumerate(islice(f, limit), 1)]


def sampler_times(sizes: list[int], batch_size: int, batches: int) -> list[dict]:
    rows = []
    for size in sizes:
        iterator = iter(ResumableBatchSampler(size, batch_size, seed=0))
        start = time.perf_counter()
        next(iterator)
        first = time.perf_counter() - start
        times = []
        for _ in range(batches):
            start = time.perf_counter()
            next(iterator)
            times.append(time.perf_counter() - start)
        old = []
        for position in range(1, 6):
            start = time.perf_counter()
            old_batch(size, batch_size, 0, position)
            old.append(time.perf_counter() - start)
        rows.append({"records": size, "first_ms": 1e3 * first, "batch_ms": 1e3 * statistics.median(times),
                     "old_batch_ms": 1e3 * statistics.median(old)})
    return rows


def write_jsonl(path: Path, count: int) -> None:
    """``count`` region-text lines about 250 bytes each, all naming one tiny image ``img.png``."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            regions = [{"box": [i % 50, 2 * k, 60 + k, 40 + i % 20], "caption": f"object {k} of {i}",
                        "label": f"class{(i + k) % 100}"} for k in range(i % 3)]
            f.write(json.dumps({"format": "finegrain.region-text/1", "image": "img.png", "width": 64,
                                "height": 48, "captions": [f"a photo number {i} of some scene"],
                                "regions": regions}) + "\n")


def memory_kib(pid: int) -> dict[str, int]:
    """PSS and USS (private clean + dirty) of a process in KiB, from ``/proc/<pid>/smaps_rollup``."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0])
    return {"pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def build(image: Image.Image, record: Record, seed: int) -> dict[str, torch.Tensor]:
    """A small sample that reads the record's fields and the decoded image."""
    return {"image": torch.tensor(image.size), "regions": torch.tensor(len(record.regions)),
            "seed": torch.tensor(seed % 1000)}


def loader_memory(records, root: Path, workers: int, batches: int, batch_size: int) -> dict:
    dataset = RecordDataset(records, root, build)
    alone = memory_kib(os.getpid())
    loader = DataLoader(dataset, batch_sampler=ResumableBatchSampler(len(records), batch_size, seed=0),
                        num_workers=workers, collate_fn=collate, prefetch_factor=2, multiprocessing_context="fork")
    iterator = iter(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    elapsed = time.perf_counter() - start
    main = memory_kib(os.getpid())
    worker_mem = [memory_kib(w.pid) for w in iterator._workers]
    del iterator
    total_pss = main["pss"] + sum(w["pss"] for w in worker_mem)
    return {"main_alone": alone, "main": main, "workers": worker_mem, "total_pss": total_pss,
            "ratio": total_pss / alone["pss"], "samples_per_s": batches * batch_size / elapsed}


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f} MiB"


def report_memory(name: str, result: dict) -> None:
    workers = result["workers"]
    print(f"{name}: main alone PSS {mib(result['main_alone']['pss'])}; with workers: main PSS "
          f"{mib(result['main']['pss'])}, workers PSS {mib(sum(w['pss'] for w in workers))} "
          f"(USS per worker {mib(statistics.median(w['uss'] for w in workers))} median); total PSS "
          f"{mib(result['total_pss'])} = {result['ratio']:.2f}x main alone; {result['samples_per_s']:,.0f} samples/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 3_000_000, 15_000_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200, help="timed sampler micro-batches per size")
    parser.add_argument("--records", type=int, default=3_000_000, help="lines of the generated JSONL")
    parser.add_argument("--old-records", type=int, default=300_000, help="lines read by the former list reader")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--loader-batches", type=int, default=400)
    parser.add_argument("--loader-batch-size", type=int, default=64)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name"))
    print(f"machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}")

    print(f"\n1. sampler, batch size {args.batch_size}: ms per micro-batch")
    rows = sampler_times(args.sizes, args.batch_size, args.batches)
    base = rows[0]
    print(f"{'records':>12} {'epoch start':>12} {'per batch':>10} {'x first':>8} {'former':>10} {'x first':>8}")
    for row in rows:
        print(f"{row['records']:>12,} {row['first_ms']:>12.1f} {row['batch_ms']:>10.3f} "
              f"{row['batch_ms'] / base['batch_ms']:>8.2f} {row['old_batch_ms']:>10.1f} "
              f"{row['old_batch_ms'] / base['old_batch_ms']:>8.1f}")

    with tempfile.TemporaryDirectory(prefix="finegrain-data-scale-") as tmp:
        root = Path(tmp)
        Image.new("RGB", (64, 48), (120, 80, 40)).save(root / "img.png")
        path = root / "data.jsonl"
        start = time.perf_counter()
        write_jsonl(path, args.records)
        print(f"\n2. JSONL of {args.records:,} lines ({path.stat().st_size / 2**20:,.0f} MiB) "
              f"written in {time.perf_counter() - start:.1f} s")
        before = memory_kib(os.getpid())["pss"]
        start = time.perf_counter()
        index = read_jsonl(path)
        print(f"read_jsonl (line index): {time.perf_counter() - start:.2f} s for {len(index):,} records "
              f"(arrays {3 * index.starts.nbytes / 2**20:,.0f} MiB)")
        # the index is measured first: memory the former list frees may stay with the process afterwards
        index_memory = loader_memory(index, root, args.workers, args.loader_batches, args.loader_batch_size)
        del index
        start = time.perf_counter()
        old = old_read(path, args.old_records)
        old_s = time.perf_counter() - start
        print(f"former list reader: {old_s:.2f} s for {len(old):,} lines -> ~{old_s * args.records / len(old):.0f} s "
              f"extrapolated to {args.records:,}")
        old_memory = loader_memory(old, root, args.workers, args.loader_batches, args.loader_batch_size)

        print(f"\n3. memory: main process + {args.workers} forked workers, {args.loader_batches} batches of "
              f"{args.loader_batch_size} (main process before reading the file: PSS {mib(before)})")
        report_memory(f"JSONL index, {args.records:,} records", index_memory)
        report_memory(f"former list, {len(old):,} records", old_memory)


if __name__ == "__main__":
    main()
