import pytest

from finegrain.config import ConfigError, config_to_yaml, load_config


def test_builtin_demo_config_and_overrides():
    cfg = load_config("demo", ["optim.lr=1e-4", "train.steps=7", "data.val=null", "train.eval_every=0",
                               "train.best_metric=null", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 1e-4 and cfg.train.steps == 7 and cfg.data.val is None
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.method.name == "clip" and cfg.method.options.gather_with_grad is True
    assert cfg.model.name == "finegrain-tiny"


def test_yaml_round_trip(tmp_path):
    cfg = load_config("demo", ["method.local_loss=false"])
    path = tmp_path / "merged.yaml"
    path.write_text(config_to_yaml(cfg))
    again = load_config(str(path))
    assert again == cfg and again.method.options.local_loss is False


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr'; valid keys here: \[.*'lr'"),
    ("train.steps=many", r"train.steps: expected int, got 'many'"),
    ("method.temperature=1", r"unknown config key 'method.temperature'"),
    ("method.name=nope", r"unknown method 'nope'; available: \['clip'"),
    ("train.precision=fp8", r"train.precision must be fp32, bf16 or fp16"),
    ("train.keep_last=0", r"train.keep_last must be at least 1"),
    ("data.train.pathh=x", r"unknown config key 'data.train.pathh'"),
    ("data.val=null", r"train.eval_every / train.best_metric need a held-out set"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_missing_config_file_lists_builtins():
    with pytest.raises(FileNotFoundError, match="demo"):
        load_config("no-such-config")
