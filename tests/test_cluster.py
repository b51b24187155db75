"""Cluster launches: srun-started processes (SLURM's variables, no torchrun) and requeued jobs (--resume auto)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from finegrain.devices import pick_device
from finegrain.train import checkpoint as ckpt
from finegrain.train.distributed import first_host, slurm_launch
from finegrain.train.trainer import progress_fields


def test_first_host_of_slurm_node_lists():
    assert first_host("gpu[07-10,12],cpu3") == "gpu07"
    assert first_host("node1,node2") == "node1"
    assert first_host("a-b[001-004]") == "a-b001"
    assert first_host("n[3,5]") == "n3"


def test_srun_variables_become_torchrun_variables_and_torchrun_wins():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    assert slurm_launch(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                 "MASTER_PORT": str(15000 + 123456 % 20000)}
    assert slurm_launch({**env, "MASTER_PORT": "29400"})["MASTER_PORT"] == "29400"
    assert slurm_launch({**env, "WORLD_SIZE": "8", "RANK": "3"}) == {}  # torchrun inside an allocation
    assert slurm_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == {}  # the batch script, not an srun step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(tiny_data, out, steps):
    return ["-m", "finegrain", "train", "--no-progress", "model.name=finegrain-test",
            f"data.train.path={tiny_data / 'train.jsonl'}", "data.batch_size=4", "data.num_workers=0",
            f"train.output_dir={out}", "train.save_every=2", "train.log_every=1", f"train.steps={steps}"]


def srun(args, port, extra=()):
    """Start 2 processes as `srun --ntasks 2` would on one node (SLURM's variables, no torchrun)."""
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
               "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "42",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, *args, *extra], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    return procs


@pytest.mark.slow
def test_srun_launch_trains_exactly_as_torchrun(tiny_data, tmp_path):
    procs = srun(train_args(tiny_data, tmp_path / "srun", 2), free_port())
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                *train_args(tiny_data, tmp_path / "torchrun", 2)]
    subprocess.run(torchrun, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                   capture_output=True)
    a = torch.load(tmp_path / "srun" / "step_00000002.pt", weights_only=True)
    b = torch.load(tmp_path / "torchrun" / "step_00000002.pt", weights_only=True)
    assert len(a["rng"]) == 2 and a["data_position"] == 2  # two ranks, each consumed its own micro-batches
    line = json.loads((tmp_path / "srun" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["samples_per_s_per_device"] * 2 == pytest.approx(line["samples_per_s"])
    assert 0 <= line["data_wait_share"] <= 1
    for name, value in b["state_dict"].items():  # synchronised gradients: the same weights as torchrun's
        torch.testing.assert_close(a["state_dict"][name], value, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_requeued_two_process_job_resumes_by_itself(tiny_data, tmp_path):
    """SLURM's pre-emption warning (SIGUSR1) stops both ranks with a checkpoint; the same command, started
    again as a requeued job is, resumes from it (--resume auto) and finishes every step once."""
    out = tmp_path / "job"
    command = train_args(tiny_data, out, 40)
    procs = srun(command, free_port(), ["--resume", "auto"])
    deadline = time.monotonic() + 120
    while not (out / "step_00000004.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for proc in procs:
        os.killpg(proc.pid, signal.SIGUSR1)
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 138, err
    stopped = ckpt.list_checkpoints(out)[-1]
    assert torch.load(stopped, weights_only=True)["step"] < 40
    procs = srun(command, free_port(), ["--resume", "auto"])
    outs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs[0][1]
    assert f"resumed from {stopped}" in outs[0][0]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 41))


def test_resume_auto_starts_fresh_resumes_and_never_takes_a_foreign_folder(tmp_path):
    assert ckpt.check_run_folder(tmp_path / "new", "auto", overwrite=False) is None
    run = tmp_path / "run"
    run.mkdir()
    (run / "step_00000002.pt").write_bytes(b"x")
    (run / "step_00000004.pt").write_bytes(b"x")
    assert ckpt.check_run_folder(run, "auto", overwrite=False) == run / "step_00000004.pt"
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        ckpt.check_run_folder(other, "auto", overwrite=False)
    assert (other / "metrics.jsonl").read_text() == "{}\n"


def test_progress_bar_shows_throughput_data_wait_and_peak_memory():
    values = {"loss": 1.23456, "samples_per_s": 2048.4, "samples_per_s_per_device": 256.05, "data_wait_share": 0.125}
    assert progress_fields(values) == {"loss": "1.2346", "samples_s": "2048", "per_device": "256", "data_wait": "12%"}
    assert progress_fields({**values, "peak_memory_gib": 21.04})["mem"] == "21.0G"


def test_auto_device_is_this_process_gpu_by_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda:1")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
