import functools
import json
from pathlib import Path

import open_clip
import pytest
import torch

from finegrain.errors import DataError
from finegrain.objectives import Progress
from finegrain.objectives.clip import CLIP
from finegrain.train import checkpoint as ckpt
from finegrain.train.metrics_log import read_metrics
from finegrain.train.trainer import NonFiniteLossError, Trainer, check_finite, train


def losses_by_step(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


@pytest.fixture
def shards(tiny_data, tmp_path):
    from finegrain.data.readers import read_jsonl
    from finegrain.data.webdataset import write_shards

    records = read_jsonl(tiny_data / "train.jsonl")
    write_shards(((r, (tiny_data / r.image).read_bytes()) for r in records), str(tmp_path / "train-%06d.tar"), 16)
    return str(tmp_path / "train-{000000..000005}.tar")


@pytest.mark.parametrize("source", ["jsonl", "webdataset"])
def test_resume_gives_the_same_next_losses_as_an_uninterrupted_run(source, tiny_config, request,
                                                                  train_killed_after_checkpoint):
    extra = []
    if source == "webdataset":  # two loader workers: shard dealing and worker rotation must resume exactly
        extra = [f"data.train.path={request.getfixturevalue('shards')}", "data.num_workers=2",
                 "data.train.samples_per_epoch=96"]
    tiny_config = functools.partial(tiny_config, *extra)
    full = train(tiny_config(output="full"), progress_bar=False)
    reference = losses_by_step(full.output_dir)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]

    cfg = tiny_config(output="killed")
    train_killed_after_checkpoint(cfg, 3)  # the process dies right after its step-3 checkpoint
    resumed = train(cfg, resume="latest", progress_bar=False)
    after = losses_by_step(resumed.output_dir)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]  # no duplicated or missing step lines
    for step in (4, 5, 6):
        assert after[step] == reference[step]
    assert after[4] != after[3]


def test_checkpoint_layout_atomic_and_loadable_by_open_clip(tiny_config):
    result = train(tiny_config("train.keep_last=1", "train.steps=4", "train.save_every=2"), progress_bar=False)
    files = sorted(p.name for p in result.output_dir.iterdir())
    assert [f for f in files if f.startswith("step_")] == ["step_00000004.pt"]
    assert not [f for f in files if ".tmp" in f]
    assert {"config.yaml", "run_info.json", "metrics.jsonl", "loss.png"} <= set(files)
    state = torch.load(result.output_dir / "step_00000004.pt", weights_only=False)
    assert {"state_dict", "method", "optimizer", "scaler", "step", "data_position", "rng"} <= set(state)
    assert state["step"] == 4 and state["data_position"] == 4
    assert not any(k.startswith(("model.", "module.", "clip.")) for k in state["state_dict"])
    model = open_clip.create_model("finegrain-test", pretrained=str(result.output_dir / "step_00000004.pt"))
    torch.testing.assert_close(model.logit_scale, state["state_dict"]["logit_scale"])
    info = json.loads((result.output_dir / "run_info.json").read_text())
    assert info["world_size"] == 1 and info["seed"] == 0 and info["versions"]["torch"]


def test_fresh_run_refuses_to_overwrite_unless_asked(tiny_config):
    train(tiny_config("train.steps=3"), progress_bar=False)
    with pytest.raises(FileExistsError, match="--resume latest"):
        Trainer(tiny_config("train.steps=3"))
    train(tiny_config("train.steps=3", "train.overwrite=true"), progress_bar=False)


def test_loss_goes_down(tiny_config):
    result = train(tiny_config("train.steps=25", "train.save_every=100"), progress_bar=False)
    losses = losses_by_step(result.output_dir)
    assert sum(losses[s] for s in range(21, 26)) < sum(losses[s] for s in range(1, 6)) - 0.5


def test_nan_loss_stops_with_step_and_terms(tiny_config, monkeypatch):
    original = CLIP.forward

    def poisoned(self, model, batch, progress):
        out = original(self, model, batch, progress)
        if progress.step == 2:
            out["contrastive_loss"] = out["contrastive_loss"] * float("nan")
        return out

    monkeypatch.setattr(CLIP, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 2.*contrastive_loss=nan"):
        train(tiny_config(), progress_bar=False)


def test_bad_records_are_skipped_and_counted_then_too_many_stop(tiny_data, tiny_config, tmp_path):
    lines = (tiny_data / "train.jsonl").read_text().splitlines()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = json.loads(lines[0])
    broken["image"] = str(tmp_path / "broken.png")
    one_bad = tmp_path / "one_bad.jsonl"
    one_bad.write_text("\n".join([json.dumps(broken)] + lines[1:]) + "\n")
    trainer = Trainer(tiny_config(f"data.train.path={one_bad}", f"data.train.root={tiny_data}",
                                  "data.min_records_before_bad_check=8", "data.max_bad_fraction=0.5",
                                  "train.steps=12", "train.save_every=100"))
    trainer.fit()
    assert trainer.bad_records.bad == 1 and "broken.png" in trainer.bad_records.examples[0]

    many_bad = tmp_path / "many_bad.jsonl"
    many_bad.write_text("\n".join(json.dumps(broken) if i % 3 == 0 else line for i, line in enumerate(lines)) + "\n")
    with pytest.raises(DataError, match="(?s)max_bad_fraction.*broken.png"):
        train(tiny_config(f"data.train.path={many_bad}", f"data.train.root={tiny_data}", "data.max_bad_fraction=0.1",
                          "data.min_records_before_bad_check=8", "train.steps=12", "train.overwrite=true"),
              progress_bar=False)


def test_every_skipped_record_goes_to_bad_records_jsonl_once_across_a_resume(tiny_data, tiny_config, tmp_path,
                                                                              train_killed_after_checkpoint, capsys):
    """15 bad records (more than the 10 the log names): 3 malformed CSV rows, 12 missing images. The closing
    line used to say "first: []" for reader skips; a resumed run appends without repeating a line."""
    rows = ["filepath,title"]
    for i, line in enumerate((tiny_data / "train.jsonl").read_text().splitlines()):
        record = json.loads(line)
        rows.append(f"{'missing' if i % 8 == 0 else record['image']},{record['captions'][0].replace(',', '')}")
    rows[1:1] = ["a.png,a red, round ball", "b.png", "c.png,x,y"]  # field counts unlike the header
    data = tmp_path / "pairs.csv"
    data.write_text("\n".join(rows) + "\n")
    cfg = tiny_config(f"data.train.path={data}", f"data.train.root={tiny_data}", "data.max_bad_fraction=0.5",
                      "data.min_records_before_bad_check=8", "train.steps=14", "train.save_every=7",
                      "train.log_every=7")
    train_killed_after_checkpoint(cfg, 7)
    run_dir = cfg.train.output_dir
    before = (Path(run_dir) / "bad_records.jsonl").read_text().splitlines()
    assert 3 < len(before) < 15  # the reader's 3 and the missing images met in 7 steps
    train(cfg, resume="latest", progress_bar=False)
    entries = [json.loads(line) for line in (Path(run_dir) / "bad_records.jsonl").read_text().splitlines()]
    assert len(entries) == 15 and entries[:len(before)] == [json.loads(line) for line in before]
    assert [e["record"] for e in entries[:3]] == [f"{data}:2", f"{data}:3", f"{data}:4"]
    assert sum("missing" in e["reason"] for e in entries) == 12
    assert all(e["source"] == str(data) and e["skipped"] == "record" for e in entries)
    out = capsys.readouterr().out
    assert (f"skipped 15 of 99 records and 0 malformed regions (every one in {run_dir}/bad_records.jsonl); "
            f"first: {data}:2: 3 field(s) where the header has 2") in out


def test_eval_during_training_keeps_best_checkpoint(tiny_data, tiny_config):
    result = train(tiny_config(f"data.val.path={tiny_data / 'val.jsonl'}", "train.eval_every=3",
                               "train.best_metric=retrieval/text_retrieval_recall@1", "train.eval_tasks=[retrieval,box_classification]"),
                   progress_bar=False)
    evals = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "eval/retrieval/text_retrieval_recall@1" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert "box_classification/roi_acc1" in result.eval_metrics
    best = torch.load(result.output_dir / "best.pt", weights_only=False)
    assert best["best"] == max(r["eval/retrieval/text_retrieval_recall@1"] for r in evals)


def test_grad_accumulation_logs_samples_and_epochs_per_optimizer_step(tiny_config):
    result = train(tiny_config("data.batch_size=4", "train.grad_accum=2", "train.steps=2"), progress_bar=False)
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert [r["samples"] for r in rows] == [8, 8]
    assert rows[-1]["epoch"] == pytest.approx(4 / 24)


def _device_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text": torch.randint(1, 49000, (n, 16), generator=g)}


@pytest.mark.parametrize("local_loss", [True, False])
def test_accumulation_with_cached_features_matches_a_bigger_batch(tiny_config, local_loss):
    """Two accumulated micro-batches of 4 give the gradient of one batch of 8 (negatives span both)."""
    trainer = Trainer(tiny_config("train.grad_accum=2", f"method.local_loss={str(local_loss).lower()}"))
    first, second = _device_batch(4, 1), _device_batch(4, 2)
    progress = Progress(0, 1, 0.0)
    accumulated = trainer.accumulate_gradients(iter([first, second]), progress)
    grads = {n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.cfg.train.grad_accum = 1
    big = trainer.accumulate_gradients(iter([{k: torch.cat([first[k], second[k]]) for k in first}]), progress)
    assert accumulated["loss"].item() == pytest.approx(big["loss"].item(), rel=1e-5)
    assert len(grads) > 10
    for name, p in trainer.module.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_cached_accumulation_replays_random_features_and_passes_non_float_ones(tiny_config):
    """A method drawing random numbers in ``features`` sees the same features in the no-grad pass and in
    the recompute with gradients; a bool feature crosses the cache untouched."""
    from hook_methods import NoisyClip  # noqa: F401  (registers "noisy_clip_test")

    trainer = Trainer(tiny_config("train.grad_accum=2", "method.name=noisy_clip_test"))
    trainer.accumulate_gradients(iter([_device_batch(4, 1), _device_batch(4, 2)]), Progress(0, 1, 0.0))
    calls = trainer.method.calls
    assert len(calls) == 4  # no-grad pass over both micro-batches, then each recomputed
    for first, again in ((calls[0], calls[2]), (calls[1], calls[3])):
        assert torch.equal(first["image"], again["image"]) and torch.equal(first["keep"], again["keep"])
    assert not torch.equal(calls[0]["image"], calls[1]["image"])


def test_non_finite_gradient_norm_alone_does_not_stop_the_run():
    """fp16: the grad scaler skips a step whose gradients overflowed; only losses stop the run."""
    check_finite(3, {"loss": 1.0, "contrastive_loss": 1.0, "grad_norm": float("nan")})
    with pytest.raises(NonFiniteLossError, match="step 3"):
        check_finite(3, {"loss": float("inf"), "grad_norm": 1.0})


def test_plain_accumulation_averages_micro_batch_gradients(tiny_config):
    """Without cached features each micro-batch is its own contrastive batch: the gradient is the mean
    of the two micro-batches' gradients (and differs from the big batch's)."""
    trainer = Trainer(tiny_config("train.grad_accum=2", "train.accum_features=false"))
    first, second = _device_batch(4, 1), _device_batch(4, 2)
    progress = Progress(0, 1, 0.0)
    trainer.accumulate_gradients(iter([first, second]), progress)
    accumulated = trainer.model.clip.visual.proj.grad.clone()
    expected = 0
    for batch in (first, second):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.cfg.train.grad_accum = 1
        trainer.accumulate_gradients(iter([batch]), progress)
        expected = expected + trainer.model.clip.visual.proj.grad / 2
    torch.testing.assert_close(accumulated, expected, atol=1e-6, rtol=1e-4)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate_gradients(iter([{k: torch.cat([first[k], second[k]]) for k in first}]), progress)
    assert not torch.allclose(accumulated, trainer.model.clip.visual.proj.grad, atol=1e-6, rtol=1e-4)


def test_loss_values_are_read_back_only_at_log_steps(tiny_config, monkeypatch):
    flushed = []
    original = Trainer.flush_log

    def spy(self):
        flushed.append((self.step, len(self.pending)))
        return original(self)

    reads = []  # tensor -> Python reads (host-device syncs on CUDA) during forward/backward
    inside = [False]
    original_accumulate = Trainer.accumulate_gradients

    def watched_accumulate(self, *args):
        inside[0] = True
        try:
            return original_accumulate(self, *args)
        finally:
            inside[0] = False

    original_next = Trainer._next_batch

    def unwatched_next(self, batches):  # the loader runs here (num_workers=0): not the step's own reads
        inside[0] = False
        try:
            return original_next(self, batches)
        finally:
            inside[0] = True

    monkeypatch.setattr(Trainer, "_next_batch", unwatched_next)
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original_read = getattr(torch.Tensor, name)

        def read(tensor, *args, _name=name, _original=original_read):
            if inside[0]:
                reads.append(_name)
            return _original(tensor, *args)

        monkeypatch.setattr(torch.Tensor, name, read)
    monkeypatch.setattr(Trainer, "flush_log", spy)
    monkeypatch.setattr(Trainer, "accumulate_gradients", watched_accumulate)
    result = train(tiny_config("train.steps=7", "train.log_every=3", "train.save_every=100"), progress_bar=False)
    assert [f for f in flushed if f[1]] == [(3, 3), (6, 3), (7, 1)]
    assert reads == []
    assert sorted(losses_by_step(result.output_dir)) == list(range(1, 8))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs(tiny_config, precision):
    result = train(tiny_config(f"train.precision={precision}", "train.steps=3"), progress_bar=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses_by_step(result.output_dir).values())


def test_grad_checkpointing_gives_the_same_loss(tiny_config):
    plain = losses_by_step(train(tiny_config("train.steps=2", output="a"), progress_bar=False).output_dir)
    ckpt_run = losses_by_step(train(tiny_config("train.steps=2", "model.grad_checkpointing=true", output="b"),
                                    progress_bar=False).output_dir)
    assert ckpt_run[2] == pytest.approx(plain[2], rel=1e-5)


def test_prune_and_resolve(tmp_path):
    for step in (1, 2, 10):
        ckpt.save_atomic({"step": step}, ckpt.checkpoint_path(tmp_path, step))
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_00000010.pt"
    ckpt.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000010.pt"]
    assert ckpt.resolve_resume("latest", tmp_path / "empty") is None


def test_grad_clipping_logs_the_norm_and_tensorboard_writes(tiny_config):
    pytest.importorskip("tensorboard")
    result = train(tiny_config("optim.clip_grad_norm=0.5", "train.steps=2", "train.tensorboard=true"),
                   progress_bar=False)
    rows = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r]
    assert all(r["grad_norm"] > 0 for r in rows)
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_locked_text_tower_stays_frozen(tiny_config):
    trainer = Trainer(tiny_config("model.lock_text=true", "train.steps=2"))
    before = trainer.model.clip.text_projection.detach().clone()
    visual_before = trainer.model.clip.visual.proj.detach().clone()
    trainer.fit()
    assert torch.equal(trainer.model.clip.text_projection, before)
    assert not torch.equal(trainer.model.clip.visual.proj, visual_before)
    assert not trainer.model.clip.transformer.training and trainer.model.clip.visual.training
