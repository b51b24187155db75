"""FineCLIP and CLIPSelf under DDP (gloo, 2 processes): gradients are synchronised and equal the
single-process gradient on the global batch, with a different number of regions on each rank (none on a
whole rank, or on one accumulated micro-batch); every rank reports the global batch's loss values."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finegrain.objectives import Progress
from finegrain.train.trainer import Trainer


def global_batch(counts):
    """8 images with ``counts[i]`` valid boxes each (of 3 slots); third regions have no caption."""
    g = torch.Generator().manual_seed(1)
    n, m = len(counts), 3
    valid = torch.tensor([[j < k for j in range(m)] for k in counts])
    xy = torch.randint(0, 14, (n, m, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.tensor([10.0, 12.0])], dim=-1) * valid[..., None]
    captioned = valid & torch.tensor([True, True, False]).expand(n, m)  # third regions have no caption
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text": torch.randint(1, 49000, (n, 16), generator=g),
            "boxes": boxes, "box_valid": valid, "region_text_valid": captioned,
            "region_text": torch.randint(1, 49000, (n, m, 16), generator=g) * captioned[..., None],
            "crops": torch.randn(int(valid.sum()), 3, 32, 32, generator=g)}


def slice_batch(batch, start, stop):
    """Samples ``start:stop``; crops follow their images (they are ordered as ``box_valid.nonzero()``)."""
    before = batch["box_valid"][:start].sum()
    inside = batch["box_valid"][start:stop].sum()
    out = {k: v[start:stop] for k, v in batch.items() if k != "crops"}
    out["crops"] = batch["crops"][before:before + inside]
    return out


def _worker(rank, world_size, init_file, out_file, cfg, counts):
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        trainer = Trainer(cfg)
        batch, per_micro = global_batch(counts), 4 // cfg.train.grad_accum
        micro = [slice_batch(batch, rank * 4 + i * per_micro, rank * 4 + (i + 1) * per_micro)
                 for i in range(cfg.train.grad_accum)]
        losses = trainer.accumulate_gradients(iter(micro), Progress(0, 1, 0.0))
        grads = {n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "losses": {k: float(v) for k, v in losses.items()}}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method,counts,grad_accum", [
    ("fineclip", (3, 1, 0, 0, 2, 2, 1, 3), 2),  # rank 0: no region in its second micro-batch
    ("fineclip", (0, 0, 0, 0, 2, 2, 1, 3), 1),  # rank 0: no region at all
    ("clipself", (0, 0, 0, 0, 2, 2, 1, 3), 1),
])
def test_ddp_gradient_equals_single_process_on_the_global_batch(tiny_config, tmp_path, method, counts, grad_accum):
    options = [f"method.name={method}", "method.max_regions=3"]
    cfg = tiny_config(*options, f"train.grad_accum={grad_accum}", f"data.batch_size={4 // grad_accum}")
    out = tmp_path / "ranks"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out), cfg, counts), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.manual_seed(0)
    single = Trainer(tiny_config(*options, output="single"))
    losses = single.accumulate_gradients(iter([global_batch(counts)]), Progress(0, 1, 0.0))
    checked = 0
    for name, p in single.module.named_parameters():
        if p.grad is not None:
            for r in range(2):
                torch.testing.assert_close(ranks[r]["grads"][name], p.grad, atol=1e-5, rtol=1e-4,
                                           msg=lambda m, n=name, r=r: f"rank {r} {n}: {m}")
            checked += 1
    assert checked > 5 and not any(n.startswith("model.clip.transformer") for n in ranks[0]["grads"])  # text frozen
    assert ("model.clip.visual.conv1.weight" in ranks[0]["grads"]) == (method == "fineclip")
    for key in [k for k in losses if k.endswith("_loss")]:
        for r in range(2):  # each rank's value is the global batch's
            assert abs(ranks[r]["losses"][key] - float(losses[key])) < 1e-5, (key, r)


def _gather_worker(rank, world_size, init_file, out_file):
    import warnings

    from finegrain.objectives.contrastive import gather_rows

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)  # 1 row on rank 0, 2 on rank 1
        weights = torch.arange(6.0).view(3, 2)  # the same on every rank
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gathered, offset = gather_rows(x)
            (gathered * weights).sum().backward()
        torch.save({"gathered": gathered.detach(), "offset": offset, "grad": x.grad,
                    "warnings": [str(w.message) for w in caught]}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_rows_gives_exact_gradients_without_deprecation_warnings(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    weights = torch.arange(6.0).view(3, 2)
    for rank, rows in ((0, slice(0, 1)), (1, slice(1, 3))):
        out = torch.load(tmp_path / f"out.{rank}")
        assert torch.equal(out["gathered"], torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]))
        assert out["offset"] == rows.start
        assert torch.equal(out["grad"], 2 * weights[rows])  # both ranks' losses reach each rank's rows
        assert out["warnings"] == []
