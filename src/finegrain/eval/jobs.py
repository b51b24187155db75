"""What ``finegrain eval`` runs: evaluation jobs from command-line flags or an eval config file, run on one
model, each result printed, appended to the results file and returned.

An eval config (YAML)::

    model: {checkpoint: runs/fineclip/best.pt}     # or {name: ViT-B-16, pretrained: openai}; flags override
    data_root: /data/coco                           # default root of the benchmarks below
    benchmarks:
      - coco-panoptic                               # a built-in benchmark by name
      - {benchmark: coco-panoptic-clipself, options: {ways: [roi, mask]}}
      - {benchmark: flickr30k-1k, data_root: /data/flickr30k}
      - {name: my-seg, protocol: segmentation, data: /data/myseg,
         options: {images: img, labels: ann, class_names: classes.txt}}
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError
from .benchmarks import BENCHMARKS, run_benchmark
from .protocols import TRAINED_PROTOCOLS

JOB_KEYS = {"benchmark", "name", "protocol", "data", "data_root", "images", "options"}
CONFIG_KEYS = {"model", "data_root", "benchmarks"}
MODEL_KEYS = {"checkpoint", "name", "pretrained"}


class OptionLoader(yaml.SafeLoader):
    """YAML that also reads ``7e-4`` (an exponent without a dot) as a float, as YAML 1.2 does."""


OptionLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                   list("-+0123456789."))


@dataclass
class EvalJob:
    """One protocol on one dataset, named ``name`` in the results."""

    name: str
    protocol: str
    data: str
    data_root: str | None = None
    images: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def benchmark_job(name: str, data_root: str | None = None, options: Mapping[str, Any] | None = None) -> EvalJob:
    """The job of a built-in benchmark, its default options updated with ``options``."""
    if name not in BENCHMARKS:
        raise DataError(f"unknown benchmark {name!r}; benchmarks: {', '.join(BENCHMARKS)} "
                        "(`finegrain eval --list` describes them)")
    bench = BENCHMARKS[name]
    return EvalJob(name, bench.protocol, bench.data, data_root, bench.images, {**bench.options, **(options or {})})


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> ``{key: YAML value}`` (``ways=[roi,mask]``, ``image_size=1024``)."""
    options = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise DataError(f"--option {pair!r}: expected KEY=VALUE")
        options[key.strip()] = yaml.load(value, Loader=OptionLoader)
    return options


def _mapping(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    """``obj`` if it is a mapping whose keys are all ``allowed``; else an error naming ``where`` and the keys."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a mapping with keys among {sorted(allowed)}, got {obj!r}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    return obj


def _job_from_entry(entry: Any, index: int, data_root: str | None, path: Path) -> EvalJob:
    where = f"{path}: benchmarks[{index}]"
    if isinstance(entry, str):
        return benchmark_job(entry, data_root)
    entry = _mapping(entry, JOB_KEYS, where)
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise DataError(f"{where}.options: expected a mapping, got {options!r}")
    root = entry.get("data_root", data_root)
    if "benchmark" in entry:
        job = benchmark_job(entry["benchmark"], root, options)
        job.name = entry.get("name", job.name)
        return job
    missing = [key for key in ("name", "protocol", "data") if key not in entry]
    if missing:
        raise DataError(f"{where}: a job without 'benchmark' needs {missing}")
    return EvalJob(entry["name"], entry["protocol"], entry["data"], root, entry.get("images", ""), dict(options))


def load_eval_config(path: str | Path) -> tuple[dict[str, Any], list[EvalJob]]:
    """``(model section, jobs)`` of an eval config file (see the module docstring)."""
    path = Path(path)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=OptionLoader) or {}
    except OSError as e:
        raise DataError(f"cannot read the eval config {path}: {e}") from e
    config = _mapping(config, CONFIG_KEYS, str(path))
    model = _mapping(config.get("model") or {}, MODEL_KEYS, f"{path}: model")
    entries = config.get("benchmarks") or []
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: benchmarks: expected a non-empty list")
    return model, [_job_from_entry(entry, i, config.get("data_root"), path) for i, entry in enumerate(entries)]


def run_jobs(model, jobs: Sequence[EvalJob], tokenizer, transform, model_info: Mapping[str, Any],
             batch_size: int = 64, device="cpu", progress: bool = True, autocast=None,
             on_result=None, runners: Mapping[str, Callable[[EvalJob], dict[str, float]]] | None = None
             ) -> dict[str, dict[str, Any]]:
    """Run each job on ``model``; returns ``{job name: result entry}`` (see :mod:`.results` for the entry).

    ``autocast``: a context-manager factory wrapped around each job (mixed precision); ``on_result(entry)`` is
    called as each job finishes (to print and save it before the next starts). ``runners``: the protocols that
    train (``linear_probe``: :mod:`finegrain.linear_probe`), run by the caller's function of the job.
    """
    from contextlib import nullcontext

    runners = runners or {}
    results = {}
    for job in jobs:
        start = time.perf_counter()
        if job.protocol in TRAINED_PROTOCOLS and job.protocol not in runners:
            raise DataError(f"benchmark {job.name!r}: protocol {job.protocol!r} trains a head; `finegrain eval` "
                            "runs it (finegrain.linear_probe.run_linear_probe)")
        if job.protocol in runners:
            metrics = runners[job.protocol](job)
        else:
            with (autocast or nullcontext)():
                metrics = run_benchmark(model, job.protocol, job.data, job.data_root, job.images, tokenizer,
                                        transform, job.options, batch_size=batch_size, device=device,
                                        progress=progress, where=f"benchmark {job.name!r}")
        seconds = time.perf_counter() - start
        entry = {"benchmark": job.name, "task": job.protocol, **model_info, "metrics": metrics,
                 "options": job.options, "data": job.data, "data_root": job.data_root,
                 "seconds": round(seconds, 2), "time": datetime.now().isoformat(timespec="seconds")}
        if "num_images" in metrics and seconds > 0:
            entry["images_per_second"] = round(metrics["num_images"] / seconds, 2)
        results[job.name] = entry
        if on_result is not None:
            on_result(entry)
    return results
