"""Evaluation results on disk, and runs compared side by side.

Each evaluation of a benchmark appends one JSON line to ``<eval dir>/results.jsonl`` and (re)writes
``<eval dir>/<benchmark>.json`` with the same entry, in CLIP_benchmark's layout::

    {"benchmark": "coco-panoptic", "task": "panoptic_boxes", "model": "ViT-B-16", "pretrained": "openai",
     "metrics": {"roi_macc1": 18.2, ...}, "options": {...}, "seconds": 41.0, "time": "2026-11-24T10:00:00"}

The eval dir of a training run is ``<run>/eval``. :func:`compare_runs` reads several eval dirs (or run dirs,
or results files) and tabulates the newest entry of each benchmark (of each protocol and data, for runs of
``finegrain eval --task``), one column per run.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finegrain.errors import DataError
from finegrain.tables import NOT_COMPUTED, NOT_COMPUTED_NOTE, format_table

RESULTS_FILE = "results.jsonl"


def append_result(eval_dir: str | Path, entry: dict[str, Any]) -> Path:
    """Append ``entry`` to ``eval_dir/results.jsonl`` and write it to ``eval_dir/<benchmark>.json``
    (atomically); returns the results file. A metric that could not be computed (NaN: e.g. an AP without ground
    truth, pycocotools' -1) is written as null."""
    eval_dir = Path(eval_dir)
    metrics = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in entry["metrics"].items()}
    entry = {**entry, "metrics": metrics}
    eval_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps(entry)
    results = eval_dir / RESULTS_FILE
    with results.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    latest = eval_dir / f"{entry['benchmark']}.json"
    tmp = latest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, latest)
    return results


def results_file(path: str | Path) -> Path:
    """The results file of a run dir (``run/eval/results.jsonl``), an eval dir, or the file itself."""
    path = Path(path)
    for candidate in (path, path / RESULTS_FILE, path / "eval" / RESULTS_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no evaluation results ({RESULTS_FILE} in it or in its eval/ folder); "
                            "run `finegrain eval` first")


def result_name(entry: dict[str, Any]) -> str:
    """What a result is of: its benchmark's name; for a protocol run on the user's data (``--task``, named by
    its protocol) the protocol and the data, so runs of one protocol on different data stay apart."""
    if entry.get("task") != entry["benchmark"] or not entry.get("data"):
        return entry["benchmark"]
    root = entry.get("data_root")
    return f"{entry['benchmark']} on {os.path.join(root, entry['data']) if root else entry['data']}"


def read_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: newest entry}`` of a results file (see :func:`results_file`; names: :func:`result_name`); a
    line that is not a result entry is an error naming the file and line."""
    file = results_file(path)
    newest: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            newest[result_name(entry)] = {**entry, "metrics": dict(entry["metrics"])}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{file}:{number}: not an evaluation result ({e})") from e
    return newest


def run_label(path: str | Path) -> str:
    """A column header for a run: its folder name (the run's, not ``eval``)."""
    path = Path(path).resolve()
    if path.is_file():
        path = path.parent
    return path.parent.name if path.name == "eval" else path.name


def compare_runs(paths: Sequence[str | Path]) -> str:
    """A table with one row per benchmark metric and one column per run (newest result of each benchmark;
    ``-`` where a run lacks it, ``-*`` where it could not be computed). Rates print with two decimals, counts
    (``num_*``, ``skipped_*``) as integers. Folders without results are named below the table; none with
    results is an error."""
    runs, skipped = {}, []
    for path in paths:
        try:
            results = read_results(path)
        except FileNotFoundError:
            skipped.append(str(path))
            continue
        label = run_label(path)
        while label in runs:
            label += "'"
        runs[label] = results
    if not runs:
        raise FileNotFoundError(f"no evaluation results in {', '.join(skipped)} ({RESULTS_FILE} in each or in its "
                                "eval/ folder); run `finegrain eval` first")
    rows: dict[tuple[str, str], list[str]] = {}
    for column, results in enumerate(runs.values()):
        for benchmark, entry in results.items():
            for metric, value in entry["metrics"].items():
                row = rows.setdefault((benchmark, metric), ["-"] * len(runs))
                count = isinstance(value, int) or metric.startswith(("num_", "skipped_"))
                row[column] = NOT_COMPUTED if value is None else f"{value:.0f}" if count else f"{value:.2f}"
    order = {benchmark: i for i, benchmark in enumerate(dict.fromkeys(b for b, _ in rows))}  # rows by benchmark
    body = [[benchmark, metric, *values]
            for (benchmark, metric), values in sorted(rows.items(), key=lambda row: order[row[0][0]])]
    table = format_table(["benchmark", "metric", *runs], body, right=tuple(range(2, 2 + len(runs))))
    notes = []
    if any(NOT_COMPUTED in values for values in rows.values()):
        notes.append(NOT_COMPUTED_NOTE)
    if skipped:
        notes.append(f"no results (skipped): {', '.join(skipped)}")
    return "\n".join([table, *notes])
