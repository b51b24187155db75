"""DetailCLIP under DDP (2 gloo processes): gradients, EMA teacher and iBOT centres equal the single-process
ones on the global batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finegrain.objectives import Progress
from finegrain.train.trainer import Trainer

GLOBAL_BATCH = 8
OPTIONS = ["method.name=detailclip", "method.out_dim=16", "method.hidden_dim=32", "method.bottleneck_dim=8"]


def global_batch():
    g = torch.Generator().manual_seed(123)
    return {"image": torch.randn(GLOBAL_BATCH, 2, 3, 32, 32, generator=g),
            "text": torch.randint(1, 49000, (GLOBAL_BATCH, 16), generator=g)}


def step(trainer, batch):
    """Forward + backward on ``batch``, then the optimizer step and the EMA update; returns the gradients,
    teacher and centres."""
    trainer.accumulate_gradients(iter([batch]), Progress(0, 4, 0.0))
    grads = {n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None}
    trainer.optimizer.step()
    trainer.method.after_step(trainer.model, Progress(0, 4, 0.0))
    state = trainer.method.state_dict()
    return {"grads": grads,
            "teacher": {k: v.clone() for k, v in state.items() if k.startswith("teacher.")},
            "centres": {k: v.clone() for k, v in state.items() if k.endswith("centre.value")}}


def _worker(rank, world_size, init_file, out_file, cfg):
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        trainer = Trainer(cfg)  # different initial weights per rank: DDP broadcasts rank 0's, teacher included
        per_rank = GLOBAL_BATCH // world_size
        batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in global_batch().items()}
        torch.save(step(trainer, batch), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_teacher_and_centres_equal_single_process_on_the_global_batch(tiny_config, tmp_path):
    cfg = tiny_config(*OPTIONS, f"data.batch_size={GLOBAL_BATCH // 2}")
    out = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), cfg), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    single = step(Trainer(tiny_config(*OPTIONS, output="single")), global_batch())

    assert len(single["grads"]) > 20 and "method.decoder.mask_token" in single["grads"]
    assert set(ranks[0]["grads"]) == set(single["grads"])
    for name, grad in single["grads"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["grads"][name], grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][key]), key
        torch.testing.assert_close(value, single["teacher"][key], atol=1e-5, rtol=1e-4)
    assert set(single["centres"]) == {"cls_loss.centre.value", "patch_loss.centre.value"}
    for key, value in single["centres"].items():
        assert value.abs().sum() > 0, key
        assert torch.equal(ranks[0]["centres"][key], ranks[1]["centres"][key]), key
        torch.testing.assert_close(ranks[0]["centres"][key], value, atol=1e-6, rtol=1e-5)
