"""Schedules by epoch: train.epochs / optim.warmup_epochs become step counts, warmup from optim.warmup_start_lr."""

import math

import pytest

from finegrain.config import ConfigError, OptimConfig, load_config
from finegrain.train.metrics_log import read_metrics
from finegrain.train.optim import learning_rate
from finegrain.train.trainer import Trainer

# tiny_data: 96 training records; tiny_config: data.batch_size=8, one process -> 12 micro-batches per epoch
BY_EPOCHS = ("train.steps=null", "optim.warmup_steps=null")


@pytest.fixture
def shards(tiny_data, tmp_path):
    from finegrain.data.readers import read_jsonl
    from finegrain.data.webdataset import write_shards

    records = read_jsonl(tiny_data / "train.jsonl")
    write_shards(((r, (tiny_data / r.image).read_bytes()) for r in records), str(tmp_path / "train-%06d.tar"), 16)
    return str(tmp_path / "train-{000000..000005}.tar")


def test_warmup_from_start_lr_reaches_lr_at_its_last_step_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=5, warmup_start_lr=0.2, min_lr=0.1)
    # np.linspace(0.2, 1.0, 5) for steps 0-4, then 0.1 + 0.45 * (1 + cos(pi * (step - 5) / 10))
    expected = {0: 0.2, 1: 0.4, 4: 1.0, 5: 1.0, 10: 0.55, 15: 0.1}
    assert {s: learning_rate(s, 15, cfg) for s in expected} == pytest.approx(expected)
    assert learning_rate(0, 15, OptimConfig(lr=1.0, warmup_steps=1, warmup_start_lr=0.2)) == 0.2
    assert learning_rate(1, 15, OptimConfig(lr=1.0, warmup_steps=4)) == 0.5  # no start lr: lr * (step + 1) / 4


def test_lr_and_epoch_of_a_warmup_epochs_run_and_its_config_resumes(tiny_config):
    cfg = tiny_config(*BY_EPOCHS, "data.batch_size=16", "train.epochs=2", "optim.warmup_epochs=0.5",
                      "optim.warmup_start_lr=1e-6", "optim.lr=5e-4", "optim.min_lr=1e-5", "train.save_every=100",
                      "train.log_every=12")
    trainer = Trainer(cfg, progress_bar=False)
    assert (trainer.cfg.train.steps, trainer.cfg.optim.warmup_steps) == (12, 3)  # 6 batches of 16 per epoch
    assert cfg.train.steps is None  # the caller's config is left as it was
    result = trainer.fit()
    rows = {r["step"] - 1: r for r in read_metrics(result.output_dir / "metrics.jsonl") if "lr" in r}
    cosine = {k: 1e-5 + 0.5 * 4.9e-4 * (1 + math.cos(math.pi * (k - 3) / 9)) for k in (3, 7, 11)}
    expected = {0: 1e-6, 1: 1e-6 + 4.99e-4 / 2, 2: 5e-4, **cosine}
    assert {k: rows[k]["lr"] for k in expected} == pytest.approx(expected, rel=1e-9)
    assert cosine[3] == pytest.approx(5e-4) and cosine[11] == pytest.approx(1e-5 + 2.45e-4 * (1 - math.cos(math.pi / 9)))
    assert [rows[k]["epoch"] for k in (0, 5, 11)] == pytest.approx([1 / 6, 1.0, 2.0])

    written = load_config(str(result.output_dir / "config.yaml"))  # holds both counts, which agree
    assert (written.train.steps, written.train.epochs, written.optim.warmup_steps) == (12, 2.0, 3)
    assert Trainer(written, resume="latest").step == 12


@pytest.mark.parametrize("overrides, steps, warmup", [
    (("train.epochs=2", "optim.warmup_epochs=1"), 24, 12),
    (("train.epochs=1", "optim.warmup_epochs=0.25", "train.grad_accum=5"), 3, 1),  # 2.4 steps per epoch
    (("train.epochs=2", "optim.warmup_epochs=1", "data.batch_size=10"), 18, 9),  # 96 // 10 = 9 whole batches
])
def test_steps_from_epochs_of_map_style_data_count_whole_global_batches(tiny_config, overrides, steps, warmup):
    cfg = Trainer(tiny_config(*BY_EPOCHS, *overrides)).cfg
    assert (cfg.train.steps, cfg.optim.warmup_steps) == (steps, warmup)


def test_steps_from_epochs_of_shards_use_samples_per_epoch(tiny_config, shards):
    # 100 samples per epoch, 2 x 8 per step: 3 epochs = 18.75 -> 19 steps, 1 epoch of warmup = 6.25 -> 7
    cfg = Trainer(tiny_config(*BY_EPOCHS, f"data.train.path={shards}", "data.train.samples_per_epoch=100",
                              "train.grad_accum=2", "train.epochs=3", "optim.warmup_epochs=1")).cfg
    assert (cfg.train.steps, cfg.optim.warmup_steps) == (19, 7)


def test_shards_without_samples_per_epoch_are_an_error_before_the_run_folder(tiny_config, shards, tmp_path):
    with pytest.raises(ConfigError, match=r"train.epochs needs the size of an epoch.*data.train.samples_per_epoch"):
        Trainer(tiny_config(*BY_EPOCHS, f"data.train.path={shards}", "train.epochs=1", "optim.warmup_steps=2"))
    assert not (tmp_path / "run").exists()


def test_steps_that_disagree_with_epochs_are_an_error_naming_both(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"train.steps=25 disagrees with train.epochs=2.0, which is 24 steps here "
                                          r"\(12 steps per epoch\).*train.steps=null"):
        Trainer(tiny_config("train.steps=25", "train.epochs=2"))
    with pytest.raises(ConfigError, match=r"optim.warmup_steps=2 disagrees with optim.warmup_epochs=1.0"):
        Trainer(tiny_config("train.steps=null", "train.epochs=2", "optim.warmup_epochs=1"))
    assert not (tmp_path / "run").exists()
    assert Trainer(tiny_config("train.steps=24", "train.epochs=2")).cfg.train.steps == 24  # agreeing: fine


@pytest.mark.parametrize("override, message", [
    ("train.steps=null", r"train.steps is null: set it, or train.epochs"),
    ("optim.warmup_steps=null", r"optim.warmup_steps is null: set it, or optim.warmup_epochs"),
    ("train.epochs=0", r"train.epochs must be > 0, got 0"),
    ("optim.warmup_epochs=-1", r"optim.warmup_epochs must be >= 0, got -1"),
])
def test_bad_epoch_settings_name_the_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_epochs_without_steps_leave_the_step_count_to_the_trainer():
    cfg = load_config(None, ["train.epochs=1.5", "optim.warmup_epochs=0.1"])
    assert (cfg.train.steps, cfg.train.epochs, cfg.optim.warmup_steps) == (None, 1.5, None)
