"""DDP on CPU with gloo, 2 processes: gradients are truly synchronised and equal single-process ones."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hook_methods import EMAClip  # noqa: F401  (registers "ema_clip_test")

from finegrain.models import create_model
from finegrain.objectives import MaskedContrastiveLoss, Progress, create_method
from finegrain.train.trainer import Trainer, TrainModule, total_loss

GLOBAL_BATCH = 8


def _masked_worker(rank, world_size, init_file, out_file):
    """Masked InfoNCE with different numbers of valid rows per rank (3 and 1, then 2 and 0)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = []
        for counts in ((3, 1), (2, 0)):
            net = masked_net()
            ddp = torch.nn.parallel.DistributedDataParallel(net)
            x, valid = masked_inputs(counts)
            start = sum(counts[:rank])
            mine = slice(start, start + counts[rank])
            padded = torch.cat([x[mine], 100 * torch.ones(2, 4)])  # this rank's rows + two padding rows
            padded_valid = torch.cat([valid[mine], torch.zeros(2, dtype=torch.bool)])
            a, b, scale = ddp(padded)
            MaskedContrastiveLoss()(a, b, scale, padded_valid).backward()
            results.append({n: p.grad.clone() for n, p in net.named_parameters()})
        torch.save(results, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


class _PairNet(torch.nn.Module):
    """Two projections and a trainable logit scale (as a CLIP's)."""

    def __init__(self):
        super().__init__()
        self.fa, self.fb = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.1))

    def forward(self, x):
        return (torch.nn.functional.normalize(self.fa(x), dim=-1),
                torch.nn.functional.normalize(self.fb(x), dim=-1), self.logit_scale.exp())


def masked_net():
    torch.manual_seed(0)
    return _PairNet()


def masked_inputs(counts):
    """The valid rows of all ranks (each rank pads its slice with invalid rows of junk)."""
    g = torch.Generator().manual_seed(sum(counts))
    x = torch.randn(sum(counts), 4, generator=g)
    return x, torch.ones(sum(counts), dtype=torch.bool)


def test_masked_contrastive_ddp_gradient_equals_single_process_on_the_union_of_valid_rows(tmp_path):
    out = tmp_path / "masked"
    mp.spawn(_masked_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    for rank in range(2):
        results = torch.load(f"{out}.{rank}")
        for counts, ddp_grads in zip(((3, 1), (2, 0)), results):
            net = masked_net()
            x, valid = masked_inputs(counts)
            padded_x = torch.cat([x, 100 * torch.ones(2, 4)])  # padding rows never enter the loss
            padded_valid = torch.cat([valid, torch.zeros(2, dtype=torch.bool)])
            a, b, scale = net(padded_x)
            MaskedContrastiveLoss()(a, b, scale, padded_valid).backward()
            for name, p in net.named_parameters():
                torch.testing.assert_close(ddp_grads[name], p.grad, atol=1e-6, rtol=1e-4,
                                           msg=lambda m, n=name, c=counts: f"{c} {n}: {m}")


def _trainer_worker(rank, world_size, init_file, out_file, cfg):
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's, teacher included
        trainer = Trainer(cfg)
        batch = global_batch()
        micro = [{k: v[rank * 4 + i * 2:rank * 4 + i * 2 + 2] for k, v in batch.items()} for i in range(2)]
        trainer.accumulate_gradients(iter(micro), Progress(0, 1, 0.0))
        grads = {n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None}
        trainer.optimizer.step()
        trainer.method.after_step(trainer.model, Progress(0, 1, 0.0))
        teacher = ({k: v.clone() for k, v in trainer.method.teacher.state_dict().items()}
                   if hasattr(trainer.method, "teacher") else {})
        torch.save({"grads": grads, "teacher": teacher}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["clip", "ema_clip_test"])
def test_ddp_cached_accumulation_gradient_and_ema_teacher_match_across_ranks(tiny_config, tmp_path, method):
    """2 ranks x 2 accumulated micro-batches of 2 = the single-process gradient on 8 samples (plain CLIP:
    DDP without find_unused_parameters, so the logit scale's direct gradient must join the synced pass);
    with ema_clip_test the EMA teacher is identical on both ranks and an unused trainable parameter does
    not crash DDP."""
    cfg = tiny_config(f"method.name={method}", "train.grad_accum=2", "data.batch_size=2")
    out = tmp_path / "trainer"
    mp.spawn(_trainer_worker, args=(2, str(tmp_path / "init"), str(out), cfg), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert len(ranks[0]["teacher"]) == (method == "ema_clip_test") * len(ranks[1]["teacher"])
    for key, value in ranks[0]["teacher"].items():
        assert torch.equal(value, ranks[1]["teacher"][key]), key
    torch.manual_seed(0)
    single = Trainer(tiny_config(f"method.name={method}", output="single"))
    single.accumulate_gradients(iter([global_batch()]), Progress(0, 1, 0.0))
    for name, p in single.module.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ranks[0]["grads"][name], p.grad, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, n=name: f"{n}: {m}")


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


@pytest.mark.slow
def test_torchrun_lists_each_bad_record_once_in_bad_records_jsonl(tiny_data, tmp_path):
    """Two ranks meet different bad records (and, past an epoch, each other's): rank 0 writes each once."""
    lines = (tiny_data / "train.jsonl").read_text().splitlines()
    data = tmp_path / "some_missing.jsonl"
    data.write_text("".join(json.dumps({**json.loads(line), "image": f"missing/{i}.png"} if i % 12 == 0 else
                                       json.loads(line)) + "\n" for i, line in enumerate(lines)))
    out = tmp_path / "ddp_run"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "finegrain", "train", "--no-progress", "model.name=finegrain-test",
                    f"data.train.path={data}", f"data.train.root={tiny_data}", "data.batch_size=4",
                    "data.num_workers=0", "data.max_bad_fraction=0.5", f"train.output_dir={out}", "train.steps=20",
                    "train.log_every=5", "train.save_every=100"],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, capture_output=True)
    entries = [json.loads(line) for line in (out / "bad_records.jsonl").read_text().splitlines()]
    assert sorted(e["record"] for e in entries) == list(range(0, len(lines), 12))  # 20 steps x 8: over an epoch
    assert all(f"missing/{e['record']}.png" in e["reason"] for e in entries)

