"""What a run folder records about how it was made: versions, git commit, seed, world size, command."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: str | Path = ".") -> str | None:
    """The commit of the git checkout holding the finegrain sources, with ``-dirty`` if modified."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True,
                               timeout=5, check=False).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(seed: int, world_size: int, device: str) -> dict:
    import torch

    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "seed": seed,
        "world_size": world_size,
        "device": device,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("finegrain", "torch", "torchvision", "open_clip_torch", "numpy")},
        "git_commit": git_commit(Path(__file__).resolve().parent),
    }
