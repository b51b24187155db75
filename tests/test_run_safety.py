"""Runs are never lost: earlier run folders, torn files, corrupt checkpoints, signals, offline weights."""

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from finegrain.cli import main
from finegrain.config import read_yaml
from finegrain.models import factory
from finegrain.models.factory import (
    CheckpointError,
    PretrainedWeightsUnavailable,
    create_model,
    model_from_checkpoint,
)
from finegrain.train import checkpoint as ckpt
from finegrain.train.interrupt import StopSignals, TrainingStopped
from finegrain.train.metrics_log import MetricsLog, read_metrics
from finegrain.train.trainer import Trainer, train


# ----- earlier runs are never deleted or overwritten ------------------------------------------------------
@pytest.mark.parametrize("files", [["best.pt"], ["metrics.jsonl"], ["config.yaml"], ["run_info.json"],
                                   ["loss.png"], ["bad_records.jsonl"], ["wandb_id.txt"],
                                   ["step_00000003.pt", "metrics.jsonl"]])
def test_fresh_run_refuses_a_folder_holding_any_earlier_run_file(tmp_path, files):
    for name in files:
        (tmp_path / name).write_text("x")
    with pytest.raises(FileExistsError, match=re.escape(files[0]) + ".*train.overwrite=true"):
        ckpt.check_run_folder(tmp_path, None, overwrite=False)
    assert ckpt.check_run_folder(tmp_path, None, overwrite=True) is None
    assert all((tmp_path / name).exists() for name in files)  # checking deletes nothing


def test_unrelated_files_do_not_block_a_fresh_run(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    assert ckpt.check_run_folder(tmp_path, None, overwrite=False) is None
    assert ckpt.check_run_folder(tmp_path / "new", None, overwrite=False) is None


def test_resume_latest_without_checkpoints_is_an_error_saying_what_the_folder_holds(tmp_path):
    (tmp_path / "best.pt").write_text("x")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="no step_.*it holds only best.pt, metrics.jsonl"):
        ckpt.check_run_folder(tmp_path, "latest", overwrite=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.check_run_folder(tmp_path / "missing", "latest", overwrite=True)
    assert (tmp_path / "best.pt").exists()


def test_resume_from_another_runs_checkpoint_never_replaces_the_run_in_the_folder(tmp_path):
    other, here = tmp_path / "other", tmp_path / "here"
    ckpt.save_atomic({"step": 2}, ckpt.checkpoint_path(other, 2))
    ckpt.save_atomic({"step": 8}, ckpt.checkpoint_path(here, 8))
    (here / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="not from .*here.*holds another run"):
        ckpt.check_run_folder(here, str(other / "step_00000002.pt"), overwrite=False)
    assert ckpt.check_run_folder(tmp_path / "new", str(other / "step_00000002.pt"), overwrite=False).name == \
        "step_00000002.pt"  # into an empty folder: fine
    assert ckpt.check_run_folder(here, str(here / "step_00000008.pt"), overwrite=False).name == "step_00000008.pt"


def test_resume_latest_picks_the_newest_checkpoint_and_removes_stale_temp_files(tmp_path, caplog):
    for step in (2, 10):
        ckpt.save_atomic({"step": step}, ckpt.checkpoint_path(tmp_path, step))
    stale = tmp_path / ".step_00000012.pt.tmp.4242"
    stale.write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING):
        assert ckpt.check_run_folder(tmp_path, "latest", overwrite=False).name == "step_00000010.pt"
    assert not stale.exists() and str(stale) in caplog.text


def test_trainer_refuses_a_folder_holding_only_best_and_metrics(tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"the best model of an earlier run")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(FileExistsError, match="best.pt, metrics.jsonl"):
        Trainer(tiny_config())
    with pytest.raises(FileNotFoundError, match="--resume latest"):
        Trainer(tiny_config(), resume="latest")
    assert (run / "best.pt").read_bytes() == b"the best model of an earlier run"


@pytest.mark.parametrize("steps, keep_last, kept", [(6, 3, [4, 5, 6]), (8, 5, [4, 5, 6, 7, 8])])
def test_keep_last_keeps_that_many_checkpoints(tiny_config, steps, keep_last, kept):
    result = train(tiny_config(f"train.steps={steps}", "train.save_every=1", f"train.keep_last={keep_last}",
                               "optim.warmup_steps=1"), progress_bar=False)
    assert [p.name for p in ckpt.list_checkpoints(result.output_dir)] == [f"step_{s:08d}.pt" for s in kept]


class Killed(Exception):
    """Stands for the process dying."""


def _die_at_step_2(monkeypatch):
    """Training dies at step 2, before the first checkpoint (at step 3)."""
    original = Trainer.train_step

    def step_then_die(self, batches):
        original(self, batches)
        if self.step == 2:
            self.flush_log()  # metrics.jsonl holds steps 1 and 2, as a killed run's may
            raise Killed

    monkeypatch.setattr(Trainer, "train_step", step_then_die)


def _disk_full_at(step: int):
    """A ``torch.save`` that fails as torch's zip writer does on a full disk when saving step ``step``."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if not (isinstance(obj, dict) and obj.get("step") == step):
            return original(obj, f, *args, **kwargs)
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000 vs 901")

    return save


@pytest.mark.parametrize("fail", ["kill", "disk full"])
def test_resume_auto_starts_again_a_run_that_stopped_before_its_first_checkpoint(tiny_config, monkeypatch, fail):
    cfg = tiny_config()
    with monkeypatch.context() as patch:
        if fail == "kill":
            _die_at_step_2(patch)
        else:
            patch.setattr(torch, "save", _disk_full_at(3))
        with pytest.raises((Killed, OSError)):
            train(cfg, progress_bar=False)
    run = Path(cfg.train.output_dir)
    assert not ckpt.list_checkpoints(run) and "config.yaml" in ckpt.run_artefacts(run)
    with pytest.raises(FileExistsError, match="holds an earlier run"):  # another run's config: refused
        Trainer(tiny_config("optim.lr=5e-4"), resume="auto")
    result = train(cfg, resume="auto", progress_bar=False)
    assert result.step == 6
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == list(range(1, 7))


def test_a_run_counted_in_epochs_is_recognised_by_its_config(tiny_config):
    cfg = tiny_config("train.steps=null", "train.epochs=1")
    Trainer(cfg)  # writes config.yaml with the derived step count, then dies
    assert ckpt.is_run_of(Path(cfg.train.output_dir) / "config.yaml", cfg)
    assert not ckpt.is_run_of(Path(cfg.train.output_dir) / "config.yaml", tiny_config("train.steps=null",
                                                                                      "train.epochs=2"))
    assert Trainer(cfg, resume="auto").step == 0


def test_a_runs_config_holds_every_method_option_and_is_recognised_with_defaults_given_or_not(tiny_config):
    cfg = tiny_config()  # no method options given
    Trainer(cfg)  # writes config.yaml, then dies
    config_file = Path(cfg.train.output_dir) / "config.yaml"
    assert read_yaml(config_file)["method"] == {"name": "clip", "local_loss": True, "gather_with_grad": True,
                                                "augment": "open_clip", "resize_mode": "squash"}
    assert ckpt.is_run_of(config_file, cfg) and ckpt.is_run_of(config_file, tiny_config("method.local_loss=true"))
    assert not ckpt.is_run_of(config_file, tiny_config("method.local_loss=false"))


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_earlier_ones(tiny_data, tmp_path, monkeypatch,
                                                                               capsys):
    monkeypatch.setattr(torch, "save", _disk_full_at(4))
    run = tmp_path / "run"
    code = main(["train", "--no-progress", "model.name=finegrain-test", f"data.train.path={tiny_data / 'train.jsonl'}",
                 "data.batch_size=8", "data.num_workers=0", "train.steps=4", "train.save_every=2",
                 "optim.warmup_steps=1", f"train.output_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith(f"finegrain train: error: could not write {run / 'step_00000004.pt'}: no space left on "
                          "the device")
    assert sorted(p.name for p in run.iterdir() if ".pt" in p.name) == ["step_00000002.pt"]  # no temp file left
    assert torch.load(run / "step_00000002.pt", weights_only=True)["step"] == 2


# ----- corrupt checkpoints -------------------------------------------------------------------------------
@pytest.fixture
def run_with_torn_checkpoint(tiny_config):
    result = train(tiny_config(), progress_bar=False)  # checkpoints at steps 3 and 6
    newest = result.output_dir / "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    os.utime(newest)
    return result.output_dir


def test_corrupt_checkpoint_is_one_line_naming_an_intact_older_one(run_with_torn_checkpoint, tiny_config):
    newest = run_with_torn_checkpoint / "step_00000006.pt"
    intact = run_with_torn_checkpoint / "step_00000003.pt"
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(newest)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{newest}: cannot be read")
    assert f"loads is {intact}" in message
    with pytest.raises(CheckpointError, match=re.escape(str(intact))):
        Trainer(tiny_config(), resume="latest")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        model_from_checkpoint(newest)
    assert Trainer(tiny_config(), resume=str(intact)).step == 3


def test_a_file_that_is_no_training_checkpoint_is_named(tmp_path):
    torch.save({"visual.proj": torch.zeros(2)}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="weights.pt is not a finegrain training checkpoint"):
        ckpt.load_checkpoint(tmp_path / "weights.pt")


# ----- metrics.jsonl -------------------------------------------------------------------------------------
def test_torn_last_metrics_line_is_dropped_on_read_and_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "metrics.jsonl:3: dropped a torn last line" in caplog.text
    log = MetricsLog(tmp_path, resume_step=2)
    log.write(3, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]

    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(path)


# ----- signals -------------------------------------------------------------------------------------------
def test_signals_become_a_flag_and_a_second_ctrl_c_aborts():
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.stop_requested and stop.signal_name == "SIGTERM" and stop.should_stop(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with StopSignals() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal_name == "SIGINT"
    assert TrainingStopped("SIGINT", 5, Path("c.pt")).exit_code == 130
    assert TrainingStopped("SIGTERM", 5, Path("c.pt")).exit_code == 143


def test_a_finished_run_ends_its_loader_workers_while_the_trainer_lives(tiny_config):
    # The workers block the stop signals; persistent ones of a loader still referenced at exit would make
    # Python's exit (which ends children with SIGTERM) wait on them forever.
    before = set(mp.active_children())
    trainer = Trainer(tiny_config("data.num_workers=1", "data.persistent_workers=true"), progress_bar=False)
    trainer.fit()
    assert [child for child in mp.active_children() if child not in before] == []
    assert trainer.step == 6


def _agree_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        with StopSignals(check_every=3) as stop:
            for step in range(1, 20):
                if rank == 1 and step == 4:  # only rank 1 is signalled, after step 4
                    os.kill(os.getpid(), signal.SIGTERM)
                if stop.should_stop(step):
                    break
        Path(out_dir, str(rank)).write_text(f"{step} {stop.signal_name}")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_step_to_stop_at(tmp_path):
    mp.spawn(_agree_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / str(rank)).read_text() for rank in (0, 1)] == ["6 SIGTERM", "6 SIGTERM"]


STOP_LINE = re.compile(r"stopped by (SIG\w+) at step (\d+); checkpoint (\S+); resume with: (.+)$")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)])
def test_signal_stops_training_with_a_checkpoint_and_resume_finishes(tiny_data, tmp_path, sig, code):
    run = tmp_path / "run"
    args = ["train", "--no-progress", "model.name=finegrain-test", f"data.train.path={tiny_data / 'train.jsonl'}",
            "data.batch_size=8", "data.num_workers=1", "train.steps=300", "train.save_every=5",
            f"train.output_dir={run}"]
    # a new session, signalled as a process group: the loader worker gets the signal too, as on Ctrl-C
    proc = subprocess.Popen([sys.executable, "-m", "finegrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / "step_00000005.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    match = STOP_LINE.search(err.strip().splitlines()[-1])
    assert match and match[1] == sig.name, err
    step = int(match[2])
    assert 5 <= step < 300 and Path(match[3]) == ckpt.checkpoint_path(run, step)
    assert torch.load(match[3], weights_only=True)["step"] == step
    resume = shlex.split(match[4])
    assert resume[:2] == ["finegrain", "train"] and resume[-2:] == ["--resume", "latest"]

    end = step + 3  # the resumed run stops a few steps later: no race with the wall clock
    done = subprocess.run([sys.executable, "-m", *resume[:-2], f"train.steps={end}", *resume[-2:]],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {match[3]} at step {step}" in done.stdout
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, end + 1))
    assert ckpt.list_checkpoints(run)[-1] == ckpt.checkpoint_path(run, end)


# ----- pretrained weights offline ------------------------------------------------------------------------
def _no_network(*args, **kwargs):
    raise AssertionError("the network must not be tried")


def test_offline_uncached_weights_fail_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(factory.socket, "create_connection", _no_network)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        create_model("ViT-B-16", pretrained="openai", cache_dir=str(tmp_path))
    message = str(info.value)
    assert time.monotonic() - start < 10
    assert "\n" not in message and "ViT-B-16 / openai are not in the cache" in message
    assert str(tmp_path) in message and "local checkpoint file" in message


def test_unreachable_host_is_tried_once_briefly(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    tried = []

    def unreachable(address, timeout):
        tried.append((address, timeout))
        raise OSError("no route to host")

    monkeypatch.setattr(factory.socket, "create_connection", unreachable)
    with pytest.raises(PretrainedWeightsUnavailable, match="huggingface.co is unreachable"):
        factory.check_pretrained_available("ViT-B-16", "openai", cache_dir=str(tmp_path))
    assert tried == [(("huggingface.co", 443), factory.CONNECT_TIMEOUT_S)]


def test_cached_weights_need_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(factory.socket, "create_connection", _no_network)
    repo = tmp_path / "models--timm--vit_base_patch16_clip_224.openai"  # the hub cache layout
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").write_bytes(b"weights")
    factory.check_pretrained_available("ViT-B-16", "openai", cache_dir=str(tmp_path))  # no error


def test_intended_random_init_is_not_reported_as_missing_weights(caplog):
    with caplog.at_level(logging.WARNING):
        open_clip.create_model("finegrain-test")
    assert "No pretrained weights loaded" in caplog.text  # what open_clip says on its own
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_model("finegrain-test")
        logging.getLogger().warning("other warnings still pass")
    assert "No pretrained weights loaded" not in caplog.text and "other warnings still pass" in caplog.text


def test_finegrain_configs_are_registered_with_open_clip_on_import():
    assert {"finegrain-tiny", "finegrain-test"} <= set(open_clip.list_models())
    assert json.dumps(open_clip.get_model_config("finegrain-test"))


def test_unknown_pretrained_tag_is_one_error_listing_the_tags():
    from finegrain.models import create_model

    with pytest.raises(ValueError, match="'nosuchtag' is neither a file nor a pretrained tag of ViT-B-32 .*openai"):
        create_model("ViT-B-32", pretrained="nosuchtag")
