"""Step checkpoints: atomic writes, keep-last-K, ``latest`` lookup.

Layout of ``step_000100.pt`` (``torch.save`` dict)::

    state_dict   the CLIP's open_clip-named state dict (open_clip's loaders read this key)
    method       the method's own state (heads, teacher, centres), may be empty
    optimizer, scaler, step, data_position, bad_records, rng (per rank), config, finegrain_version
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Step checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints (all of them for 0)."""
    found = list_checkpoints(directory)
    for path in found[:len(found) - keep_last] if keep_last > 0 else found:
        path.unlink(missing_ok=True)


def resolve_resume(resume: str, directory: str | Path) -> Path | None:
    """``"latest"`` -> newest step checkpoint in ``directory`` (None if there is none); else a path."""
    if resume == "latest":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def capture_rng() -> dict:
    """RNG states as plain types and tensors, so checkpoints load with ``torch.load(weights_only=True)``."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                     cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
