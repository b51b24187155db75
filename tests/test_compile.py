import pytest

from finegrain.train.metrics_log import read_metrics
from finegrain.train.trainer import train


@pytest.mark.compile
def test_compiled_blocks_give_the_same_losses(tiny_config):
    """Regional torch.compile (cheap aot_eager backend here; inductor on GPU) changes speed, not numbers."""
    eager = train(tiny_config("train.steps=2", output="eager"), progress_bar=False)
    compiled = train(tiny_config("train.steps=2", "train.compile=true", "train.compile_backend=aot_eager",
                                 output="compiled"), progress_bar=False)
    a = [r["loss"] for r in read_metrics(eager.output_dir / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_metrics(compiled.output_dir / "metrics.jsonl") if "loss" in r]
    assert b == pytest.approx(a, rel=1e-4)
