"""Step checkpoints: atomic writes, keep-last-K, ``latest`` lookup, run-folder checks, readable load errors.

Layout of ``step_000100.pt`` (``torch.save`` dict)::

    state_dict   the CLIP's open_clip-named state dict (open_clip's loaders read this key)
    method       the method's own state (heads, teacher, centres), may be empty
    optimizer, scaler, step, data_position, bad_records, rng (per rank), config, finegrain_version
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import torch
import yaml

from ..config import EPOCH_COUNTS, ExperimentConfig, load_config, to_dict
from ..errors import DataError
from ..models.factory import read_checkpoint
from ..objectives import complete_method_options

CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")
TEMP_RE = re.compile(r"^\.(step_\d+|best)\.pt\.tmp\.\d+$")  # what save_atomic leaves when killed mid-write
RUN_FILES_RE = re.compile(r"^(best\.pt|metrics\.jsonl|bad_records\.jsonl|config\.yaml|run_info.*\.json|loss\.png"
                          r"|wandb_id\.txt)$")

log = logging.getLogger(__name__)


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def save_atomic(obj, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``. A failed write
    removes the temp file (``path`` and the files beside it are untouched); a full disk is one error line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        # torch's zip writer reports a short write as "[enforce fail at inline_container.cc] unexpected pos"
        if getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e):
            raise OSError(f"could not write {path}: no space left on the device (the files already in "
                          f"{path.parent} are intact)") from None
        raise


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
    for path in found[:max(len(found) - keep_last, 0)]:  # none while fewer than keep_last exist
        path.unlink(missing_ok=True)


def run_artefacts(directory: str | Path) -> list[str]:
    """Names of the files of an earlier run in ``directory``: step checkpoints, best.pt, metrics.jsonl,
    bad_records.jsonl, config.yaml, run_info*.json, loss.png, wandb_id.txt (every file a run writes there)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = [p.name for p in list_checkpoints(directory)]
    return names + sorted(p.name for p in directory.iterdir() if RUN_FILES_RE.match(p.name))


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that were killed mid-way (``.step_*.pt.tmp.<pid>``)."""
    directory = Path(directory)
    removed = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if TEMP_RE.match(path.name):
            try:
                path.unlink()
            except FileNotFoundError:  # another rank removed it first
                continue
            log.warning("removed %s, the temp file of a checkpoint write that did not finish", path)
            removed.append(path)
    return removed


def is_run_of(config_file: Path, cfg: ExperimentConfig) -> bool:
    """Whether ``config_file`` (a run folder's ``config.yaml``) holds ``cfg``, the step counts that the run
    derived from epoch counts aside."""
    try:
        stored = to_dict(complete_method_options(load_config(str(config_file))))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    current = to_dict(complete_method_options(cfg))
    for section, steps_key, epochs_key in EPOCH_COUNTS:
        if current[section][epochs_key] is not None:
            stored[section][steps_key] = current[section][steps_key]
    return stored == current


def check_run_folder(out_dir: str | Path, resume: str | None, overwrite: bool,
                     cfg: ExperimentConfig | None = None) -> Path | None:
    """The checkpoint to resume from (None for a fresh run), after checking that no earlier run is lost.

    ``resume`` is ``"latest"`` (the newest step checkpoint in ``out_dir``; an error when there is none),
    ``"auto"`` (the newest step checkpoint when there is one, else a fresh run: the same command works for a
    job's first start and for every requeue), a checkpoint path, or None for a fresh run, which ``out_dir``
    must not hold an earlier run for unless ``overwrite``. With ``"auto"``, a folder without checkpoints
    whose ``config.yaml`` is ``cfg`` holds this run's start, killed before its first checkpoint: it starts
    again. Stale temp files of interrupted checkpoint writes are removed first.
    """
    out_dir = Path(out_dir)
    remove_stale_temp_files(out_dir)
    found = run_artefacts(out_dir)
    if resume == "auto":
        resume = "latest" if list_checkpoints(out_dir) else None
        if resume is None and found and cfg is not None and is_run_of(out_dir / "config.yaml", cfg):
            log.warning("%s holds this run's start (same config.yaml) and no checkpoint yet: starting again "
                        "from step 0", out_dir)
            overwrite = True
    if resume is not None:
        path = resolve_resume(resume, out_dir)
        if path is None:
            holds = (f"it holds only {', '.join(found)}" if found else
                     "it holds no run files" if out_dir.is_dir() else "it does not exist")
            fresh = "without --resume and with train.overwrite=true" if found else "without --resume"
            raise FileNotFoundError(f"--resume latest: {out_dir} has no step_*.pt checkpoint to resume from "
                                    f"({holds}); start a fresh run {fresh}, or pass a checkpoint file to --resume")
        if path.resolve().parent != out_dir.resolve() and found and not overwrite:
            raise FileExistsError(f"--resume {path}: that checkpoint is not from {out_dir}, which holds another "
                                  f"run ({', '.join(found)}); resume into an empty train.output_dir, or set "
                                  "train.overwrite=true to replace that run")
        return path
    if found and not overwrite:
        hint = "pass --resume latest (or auto) to continue it, " if list_checkpoints(out_dir) else ""
        raise FileExistsError(f"{out_dir} holds an earlier run ({', '.join(found)}): {hint}set train.overwrite=true "
                              "to replace it, or choose another train.output_dir")
    return None


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint's dict; a corrupt file or one that is not a training checkpoint is one error line
    (for a corrupt file, naming the newest older checkpoint beside it that loads)."""
    state = read_checkpoint(path)
    missing = [k for k in ("state_dict", "optimizer", "step") if not isinstance(state, dict) or k not in state]
    if missing == ["optimizer"]:
        raise DataError(f"{path} holds no optimizer state (best.pt is kept for evaluation and export): resume "
                        "from a step_*.pt checkpoint, e.g. --resume latest")
    if missing:
        raise DataError(f"{path} is not a finegrain training checkpoint (no {', '.join(missing)}); resuming "
                        "needs a step_*.pt written by finegrain train")
    return state


def check_same_run(path: str | Path, state: dict, cfg: ExperimentConfig) -> None:
    """A ``DataError`` naming the checkpoint when it is not of a run like ``cfg``: another model or method, or for a
    fine-tuning task other classes (what it holds and what the run needs)."""
    stored = (state.get("config") or {})
    held = {"model": (stored.get("model") or {}).get("name"), "method": (stored.get("method") or {}).get("name")}
    wanted = {"model": cfg.model.name, "method": cfg.method.name}
    for key in ("model", "method"):
        if held[key] is not None and held[key] != wanted[key]:
            raise DataError(f"--resume {path}: a checkpoint of {key} {held[key]!r}, but this run's {key}.name is "
                            f"{wanted[key]!r}; resume it with its own config (its run folder's config.yaml)")
    options = (stored.get("method") or {}).get("options") or {}
    for key in ("num_classes", "class_names", "base_classes", "novel_classes", "extra_classes"):
        if key in options and key in cfg.method.options and options[key] != cfg.method.options[key]:
            raise DataError(f"--resume {path}: a checkpoint of method.{key}={options[key]!r}, but this run has "
                            f"{cfg.method.options[key]!r}")


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


def checkpoint_weights(path: str | None, key: str) -> dict:
    """The ``key`` weights (e.g. ``train_state_dict``) of the finegrain checkpoint ``path``; a DataError
    naming the file and the keys it has when it has no such entry."""
    if path is None or not Path(path).is_file():
        raise DataError(f"model.checkpoint_weights={key} needs model.pretrained to be a finegrain checkpoint file, "
                        f"got {path!r}")
    state = read_checkpoint(path)
    if not isinstance(state, dict) or key not in state:
        raise DataError(f"{path} has no {key!r} (it holds {sorted(k for k in state if 'state_dict' in k) if isinstance(state, dict) else 'no dict'}): a run "
                        "writes train_state_dict only when its exported weights differ from the trained ones "
                        "(e.g. DetailCLIP's EMA teacher)")
    return state[key]
