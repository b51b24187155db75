"""torch.distributed set-up (DDP; gloo on CPU, NCCL on GPU) for the two ways clusters start processes:

- ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
- ``srun python -m finegrain train ...`` (SLURM, without torchrun) sets ``SLURM_PROCID``, ``SLURM_LOCALID`` and,
  inside a job step, ``SLURM_STEP_NUM_TASKS`` and ``SLURM_STEP_NODELIST``: the rank, local rank and world
  size come from them, the master address is the step's first node, and the port is ``MASTER_PORT`` when
  set, else derived from the job id (the same on every node, different for jobs sharing a node), as
  open_clip's ``srun`` launches work.

torchrun's variables win when both are present (torchrun started inside a SLURM allocation).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import DataError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[07-10,12],cpu3"`` -> ``"gpu07"``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise DataError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def slurm_launch(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a process that ``srun`` started (``{}`` when it was not, or when torchrun's
    variables are already there): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``."""
    if "WORLD_SIZE" in env or "SLURM_STEP_NUM_TASKS" not in env or "SLURM_PROCID" not in env:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise DataError("srun launch: SLURM_STEP_NODELIST is not set, so the master node is unknown")
    port = env.get("MASTER_PORT") or str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
            "MASTER_PORT": port}


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise the process group from torchrun's or SLURM's environment (see the module docstring; no-op for
    a single process) and pick the device: ``cuda:<local_rank>`` when CUDA is available (or asked for),
    else CPU."""
    os.environ.update(slurm_launch(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise DataError("train.device=cuda but no CUDA device is available")
    dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, local_rank, world_size), dev


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (a list of one element without distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
