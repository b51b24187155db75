"""best.pt keeps what evaluation and export need, not the optimizer state that only resuming uses."""

import pytest
import torch

from finegrain.models import model_from_checkpoint
from finegrain.train.trainer import train


def test_best_checkpoint_has_no_optimizer_state_and_cannot_be_resumed_from(tiny_config, tiny_data, tmp_path):
    cfg = tiny_config(f"data.val.path={tiny_data / 'val.jsonl'}", "train.eval_every=3",
                      "train.best_metric=retrieval/text_retrieval_recall@1")
    train(cfg, progress_bar=False)
    run = tmp_path / "run"
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    step = torch.load(run / "step_00000006.pt", map_location="cpu", weights_only=True)
    assert "optimizer" not in best and "optimizer" in step
    assert (run / "best.pt").stat().st_size < 0.6 * (run / "step_00000006.pt").stat().st_size
    model_from_checkpoint(run / "best.pt")  # evaluation and export load it
    with pytest.raises(ValueError, match="best.pt holds no optimizer state.*resume from a step_\\*.pt"):
        train(tiny_config(f"data.val.path={tiny_data / 'val.jsonl'}", "train.steps=8"), resume=str(run / "best.pt"),
              progress_bar=False)
