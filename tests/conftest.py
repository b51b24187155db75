import json

import pytest

from finegrain.config import load_config
from finegrain.data.demo import make_demo_dataset
from finegrain.train.trainer import Trainer, train


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small demo-format dataset (96 train / 24 val images) made once per test session."""
    root = tmp_path_factory.mktemp("tiny_data")
    make_demo_dataset(root, num_train=96, num_val=24, seed=3)
    return root


@pytest.fixture
def tiny_records(tiny_data, tmp_path):
    """``make(split, edit, name)``: ``tiny_data``'s ``split`` records, each passed through ``edit`` (record dict ->
    record dict) with its image path made absolute, written to ``tmp_path / name``; returns that path."""

    def make(split: str, edit, name: str):
        path = tmp_path / name
        with path.open("w") as out:
            for line in (tiny_data / f"{split}.jsonl").read_text().splitlines():
                record = json.loads(line)
                out.write(json.dumps({**edit(record), "image": str(tiny_data / record["image"])}) + "\n")
        return path

    return make


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """Build a config for the finegrain-test model on ``tiny_data``; extra dotted overrides allowed."""

    def make(*overrides: str, output: str = "run"):
        return load_config(None, [
            "model.name=finegrain-test", f"data.train.path={tiny_data / 'train.jsonl'}",
            "data.batch_size=8", "data.num_workers=0", "optim.warmup_steps=2", "optim.lr=1e-3",
            f"train.output_dir={tmp_path / output}", "train.steps=6", "train.save_every=3", "train.keep_last=5",
            *overrides])

    return make


class Killed(Exception):
    """Stands for the process dying."""


@pytest.fixture
def train_killed_after_checkpoint(monkeypatch):
    """``run(cfg, step)``: train ``cfg`` until its step-``step`` checkpoint is written, then die there (as a
    killed process would), leaving the run folder for a ``--resume latest``."""

    def run(cfg, step: int) -> None:
        original_save = Trainer.save

        def save_then_die(self):
            path = original_save(self)
            if self.step == step:
                raise Killed
            return path

        monkeypatch.setattr(Trainer, "save", save_then_die)
        with pytest.raises(Killed):
            train(cfg, progress_bar=False)
        monkeypatch.setattr(Trainer, "save", original_save)

    return run
