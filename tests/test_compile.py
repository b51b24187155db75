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


@pytest.mark.compile
def test_compiled_timm_trunk_blocks_give_the_same_losses(tiny_config, tmp_path):
    """Regional compilation reaches the blocks of a timm trunk (EVA02 structure, RoPE) too."""
    import json

    config = tmp_path / "eva-tiny.json"
    config.write_text(json.dumps({
        "embed_dim": 32, "custom_text": True,
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
        "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_tiny_patch14_224",
                       "timm_model_pretrained": False, "timm_pool": "token", "timm_proj": None}}))
    common = [f"model.name={config}", "model.image_size=28", "train.steps=2"]
    eager = train(tiny_config(*common, output="eager"), progress_bar=False)
    compiled = train(tiny_config(*common, "train.compile=true", "train.compile_backend=aot_eager",
                                 output="compiled"), progress_bar=False)
    a = [r["loss"] for r in read_metrics(eager.output_dir / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_metrics(compiled.output_dir / "metrics.jsonl") if "loss" in r]
    assert b == pytest.approx(a, rel=1e-4)
