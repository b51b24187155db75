"""DDP on CPU with gloo, 2 processes: gradients are truly synchronised and equal single-process ones."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finegrain.models import create_model
from finegrain.objectives import Progress, create_method
from finegrain.train.trainer import TrainModule, total_loss

GLOBAL_BATCH = 8


def make_module(seed=0):
    torch.manual_seed(seed)
    model = create_model("finegrain-test")
    return TrainModule(model, create_method("clip", None, model))


def global_batch():
    g = torch.Generator().manual_seed(123)
    return {"image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g),
            "text": torch.randint(1, 49000, (GLOBAL_BATCH, 16), generator=g)}


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank, world_size, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        module = make_module()
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        per_rank = GLOBAL_BATCH // world_size
        batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in global_batch().items()}
        loss = total_loss(ddp(batch, Progress(0, 1, 0.0)))
        loss.backward()
        if rank == 0:
            torch.save(grads(module), out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_gradients(tmp_path):
    out_file = tmp_path / "ddp_grads.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    ddp_grads = torch.load(out_file)

    single = make_module()
    total_loss(single(global_batch(), Progress(0, 1, 0.0))).backward()
    ref = grads(single)
    assert set(ddp_grads) == set(ref) and len(ref) > 10
    for name, g in ref.items():
        torch.testing.assert_close(ddp_grads[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    # the text and image towers both received gradient through the gathered negatives
    assert ref["model.clip.visual.proj"].abs().sum() > 0 and ref["model.clip.text_projection"].abs().sum() > 0


@pytest.mark.slow
def test_torchrun_trains_and_resumes(tiny_data, tmp_path):
    """The real launcher: `torchrun -m finegrain train` with 2 CPU processes, then --resume latest."""
    out = tmp_path / "ddp_run"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "finegrain", "train", "--no-progress", "model.name=finegrain-test",
            f"data.train.path={tiny_data / 'train.jsonl'}", "data.batch_size=4", "data.num_workers=0",
            f"train.output_dir={out}", "train.save_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(base + ["train.steps=2"], check=True, env=env, timeout=300, capture_output=True)
    assert (out / "step_00000002.pt").exists()
    subprocess.run(base + ["train.steps=4", "--resume", "latest"], check=True, env=env, timeout=300,
                   capture_output=True)
    state = torch.load(out / "step_00000004.pt", weights_only=True)
    assert state["step"] == 4 and state["data_position"] == 4 and len(state["rng"]) == 2
