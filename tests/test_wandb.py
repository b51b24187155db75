"""Weights & Biases logging (offline mode): the scalars of metrics.jsonl and evaluation tables, one run id
across a resume."""

from __future__ import annotations

import json

import pytest

from finegrain.train.trainer import train

wandb_run = pytest.importorskip("wandb.sdk.wandb_run")


@pytest.fixture
def logged(monkeypatch, tmp_path):
    """Every ``Run.log`` call as ``(run id, step, data)``, passed on to the real (offline) run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    calls = []
    original = wandb_run.Run.log

    def spy(self, data, step=None, **kwargs):
        calls.append((self.id, step, dict(data)))
        return original(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb_run.Run, "log", spy)
    return calls


def test_wandb_gets_the_metrics_lines_and_eval_tables_and_a_resume_continues_its_run(tiny_config, tiny_data,
                                                                                    tmp_path, logged):
    options = ["train.wandb.project=finegrain-test", "train.wandb.tags=[ci]", f"data.val.path={tiny_data / 'val.jsonl'}",
               "train.eval_every=2", "train.eval_tasks=[retrieval]", "train.save_every=2"]
    train(tiny_config(*options, "train.steps=2"), progress_bar=False)
    run_dir = tmp_path / "run"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(step, {k: v for k, v in data.items() if k != "eval_table"}) for _, step, data in logged] == \
        [(line["step"], {k: v for k, v in line.items() if k != "step"}) for line in lines]
    assert {run for run, _, _ in logged} == {run_id}
    assert "loss" in logged[0][2] and "samples_per_s_per_device" in logged[0][2]
    table = next(data["eval_table"] for _, _, data in logged if "eval_table" in data)
    assert table.columns == ["task", "metric", "value"]
    assert ["retrieval", "text_retrieval_recall@1", lines[-1]["eval/retrieval/text_retrieval_recall@1"]] in table.data

    logged.clear()
    train(tiny_config(*options, "train.steps=4"), resume="latest", progress_bar=False)
    assert {run for run, _, _ in logged} == {run_id}  # the same W&B run goes on
    assert [step for _, step, data in logged if "loss" in data] == [3, 4]
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
