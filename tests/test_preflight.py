"""Checks that used to come after training started now come before the first step, with nothing written."""

import pytest

from finegrain.cli import main
from finegrain.errors import ConfigError
from finegrain.train.trainer import train


def _without_labels(record: dict) -> dict:
    record.pop("label", None)
    for region in record.get("regions", []):
        region.pop("label", None)
    return record


@pytest.fixture
def unlabelled_val(tiny_records):
    """The held-out records with their region labels (and image labels) removed: captions and boxes only."""
    return tiny_records("val", _without_labels, "val-unlabelled.jsonl")


def test_box_classification_on_unlabelled_val_fails_before_the_first_step_and_writes_nothing(
        tiny_config, unlabelled_val, tmp_path):
    cfg = tiny_config(f"data.val.path={unlabelled_val}", "train.eval_every=3",
                      "train.eval_tasks=[retrieval, box_classification]")
    with pytest.raises(ConfigError, match=r"train.eval_tasks=.*box_classification.*val-unlabelled.jsonl.*"
                                          r"needs regions with a 'label'"):
        train(cfg, progress_bar=False)
    assert not (tmp_path / "run").exists()  # no run folder: the same command runs once the setting is fixed
    train(tiny_config(f"data.val.path={unlabelled_val}", "train.steps=1", "train.eval_tasks=[retrieval]"),
          progress_bar=False)


def test_config_command_checks_eval_tasks_against_the_held_out_data(unlabelled_val, capsys):
    args = ["config", "--config", "demo", f"data.val.path={unlabelled_val}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "box classification needs regions with a 'label'" in err
    assert main([*args, "train.eval_tasks=[retrieval]"]) == 0
    assert main(["config", "--config", "demo", "train.eval_tasks=[retreival]", "train.best_metric=null"]) == 2
    assert "unknown evaluation task(s) ['retreival']" in capsys.readouterr().err


def test_too_few_records_for_a_batch_fails_before_the_run_folder_is_written(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        train(tiny_config("data.batch_size=200"), progress_bar=False)
    assert not (tmp_path / "run").exists()


def test_eval_every_null_means_only_the_final_evaluation(tiny_config, tiny_data, tmp_path):
    result = train(tiny_config(f"data.val.path={tiny_data / 'val.jsonl'}", "train.eval_every=null",
                               "train.steps=2", "train.save_every=2"), progress_bar=False)
    evals = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"eval/' in line]
    assert len(evals) == 1 and result.eval_metrics
