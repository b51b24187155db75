"""Where to run: device names as the command line takes them (a leaf module: imports nothing from finegrain)."""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: this process's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU; any other
    name as ``torch.device`` takes it (``cpu``, ``cuda``, ``cuda:1``)."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    """A context running in ``precision`` (``fp32`` | ``bf16`` | ``fp16``) on ``device``: autocast, or nothing for
    fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
