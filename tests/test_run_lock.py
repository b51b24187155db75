"""A run folder belongs to one run at a time: a second job is refused in one line, a dead holder's lock is replaced,
a failed start leaves nothing behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from finegrain.cli import main
from finegrain.train.run_lock import LOCK_NAME, RunFolderLocked, RunLock
from finegrain.train.trainer import Trainer, train

HOLD = "import sys, time; from finegrain.train.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(120)"


@pytest.fixture
def held_elsewhere(tmp_path):
    """``hold(folder)``: another process takes the folder's lock and keeps it; returns the process."""
    processes = []

    def hold(folder):
        process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "held"
        processes.append(process)
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait()


def test_a_second_job_in_a_locked_folder_is_refused_in_one_line(tiny_config, held_elsewhere, tmp_path, capsys):
    run = tmp_path / "run"
    process = held_elsewhere(run)
    with pytest.raises(RunFolderLocked, match=f"in use by another run \\(pid {process.pid} "):
        Trainer(tiny_config())
    code = main(["train", "--no-progress", "model.name=finegrain-test", "data.num_workers=0",
                 f"data.train.path={tiny_config().data.train.path}", f"train.output_dir={run}", "--resume", "auto"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is in use by another run" in err
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing of the refused job was written


def test_a_killed_holders_lock_is_replaced_and_the_run_resumes(tiny_config, held_elsewhere, tmp_path, caplog):
    cfg = tiny_config("train.steps=2", "train.save_every=2")
    train(cfg, progress_bar=False)
    process = held_elsewhere(tmp_path / "run")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()  # left behind by the killed holder
    resumed = Trainer(cfg, resume="auto", progress_bar=False)
    assert resumed.step == 2 and "replacing a stale lock" in caplog.text
    resumed.fit()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_requeued_slurm_job_replaces_its_own_earlier_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "another-node", "pid": 1, "slurm_job_id": "4242"}))
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "another-node", "pid": 1, "slurm_job_id": "7"}))
    with pytest.raises(RunFolderLocked, match="another-node"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600  # no heartbeat for an hour: its holder is gone
    os.utime(tmp_path / LOCK_NAME, (old, old))
    RunLock(tmp_path).acquire().release()


def test_a_start_that_fails_leaves_no_lock_and_no_folder(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError):
        Trainer(tiny_config(f"model.pretrained={tmp_path / 'missing.pt'}"))
    assert not (tmp_path / "run").exists()
    assert Trainer(tiny_config()).run_lock.held  # the corrected command starts


def test_releasing_an_older_lock_never_removes_a_newer_holders(tmp_path):
    first = RunLock(tmp_path).acquire()
    second = RunLock(tmp_path).acquire()  # this process again: an earlier trainer's lock is stale
    first.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == second.token
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()
