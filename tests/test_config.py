import pytest

from finegrain.config import ConfigError, config_to_yaml, load_config, read_yaml
from finegrain.objectives import complete_method_options


def test_builtin_demo_config_and_overrides():
    cfg = load_config("demo", ["optim.lr=1e-4", "train.steps=7", "data.val=null", "train.eval_every=0",
                               "train.best_metric=null", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 1e-4 and cfg.train.steps == 7 and cfg.data.val is None
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.method.name == "clip" and cfg.method.options == {}
    assert complete_method_options(cfg).method.options["gather_with_grad"] is True
    assert cfg.model.name == "finegrain-tiny"


def test_yaml_round_trip(tmp_path):
    cfg = load_config("demo", ["method.local_loss=false"])
    path = tmp_path / "merged.yaml"
    path.write_text(config_to_yaml(cfg))
    again = load_config(str(path))
    assert again == cfg and again.method.options == {"local_loss": False}
    complete = complete_method_options(cfg)  # as a run's config.yaml holds it
    path.write_text(config_to_yaml(complete))
    assert load_config(str(path)) == complete and complete.method.options["local_loss"] is False


@pytest.mark.parametrize("override, message", [
    ("method.temperature=1", r"^unknown config key 'method.temperature'; valid keys here: \[.*'local_loss'"),
    ("method.name=nope", r"^method.name: unknown method 'nope'; available: \['clip'"),
    ("method.local_loss=maybe", r"^method.local_loss: expected bool, got 'maybe'$"),
])
def test_method_options_are_checked_by_the_method_registry_naming_the_key(override, message):
    cfg = load_config("demo", [override])  # the config layer knows no methods
    with pytest.raises(ConfigError, match=message):
        complete_method_options(cfg)


def test_method_section_that_is_not_a_mapping_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"^method: expected a mapping \(name and the method's options\), "
                                          r"got 'clip'$"):
        load_config("demo", ["method=clip"])
    with pytest.raises(ConfigError, match=r"^method.name: expected str, got 3$"):
        load_config("demo", ["method.name=3"])


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr'; valid keys here: \[.*'lr'"),
    ("train.steps=many", r"train.steps: expected int, got 'many'"),
    ("train.precision=fp8", r"train.precision must be fp32, bf16 or fp16"),
    ("train.keep_last=0", r"train.keep_last must be >= 1, got 0"),
    ("data.train.pathh=x", r"unknown config key 'data.train.pathh'"),
    ("data.val=null", r"train.eval_every / train.best_metric need a held-out set"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", r"^data.batch_size must be >= 1, got 0$"),
    ("data.batch_size=-2", r"^data.batch_size must be >= 1, got -2$"),
    ("data.prefetch_factor=0", r"^data.prefetch_factor must be >= 1, got 0$"),
    ("data.max_bad_fraction=-1", r"^data.max_bad_fraction must be >= 0 and <= 1, got -1$"),
    ("data.max_bad_fraction=1.5", r"^data.max_bad_fraction must be >= 0 and <= 1, got 1.5$"),
    ("data.num_workers=-1", r"^data.num_workers must be >= 0, got -1$"),
    ("train.steps=0", r"^train.steps must be >= 1, got 0$"),
    ("optim.lr=-0.001", r"^optim.lr must be >= 0, got -0.001$"),
    ("optim.betas=[0.9, 1.0]", r"^optim.betas must be >= 0 and < 1, got \(0.9, 1.0\)$"),
    ("optim.eps=0", r"^optim.eps must be > 0, got 0$"),
    ("data.train.samples_per_epoch=0", r"^data.train.samples_per_epoch must be >= 1, got 0$"),
])
def test_out_of_range_numbers_are_refused_at_load_naming_key_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_yaml_key_given_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  name: finegrain-tiny\ntrain: {steps: 3}\nmodel:\n  name: finegrain-test\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:1: key 'model' is given twice in one mapping "
                                          r"\(first on line 1\); YAML would keep only the last"):
        load_config(str(path))
    path.write_text("base: &b {steps: 3, log_every: 1}\ntrain:\n  <<: *b\n  log_every: 2\n")  # merges may override
    assert read_yaml(path)["train"] == {"steps": 3, "log_every": 2}
    path.write_text("train: {steps: 3, steps: 4}\n")
    with pytest.raises(ConfigError, match=r":1:19: key 'steps' is given twice"):
        load_config(str(path))


def test_missing_config_file_lists_builtins():
    with pytest.raises(FileNotFoundError, match="demo"):
        load_config("no-such-config")


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: finegrain-tiny\ntrain: {steps: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}:4:1: YAML syntax error") and "\n" not in str(info.value)


def test_non_utf8_config_is_named_and_a_bom_is_accepted(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model: {name: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"{latin1}:1: not UTF-8 text \(byte 0xe9 at column 18\)"):
        load_config(str(latin1))
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbftrain: {steps: 4}\n")
    assert load_config(str(bom)).train.steps == 4


@pytest.mark.parametrize("text, message", [
    ("- a\n- b\n", "expected a mapping of sections"),
    ("data: {val: {root: images}}\n", r"data.val.root is set but data.val.path is empty"),
    ("train: {best_metric: box_classification/roi_acc1, eval_tasks: [retrieval]}\ndata: {val: {path: demo:val}}\n",
     (r"train.best_metric='box_classification/roi_acc1' names task 'box_classification', which is not in "
      r"train.eval_tasks=\['retrieval'\]")),
    ("train: {eval_every: 10}\n", r"train.eval_every / train.best_metric need a held-out set"),
])
def test_cross_field_errors_name_the_keys(tmp_path, text, message):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(str(path))


def test_override_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'optim.betas=\[0.8,': the value is not valid YAML"):
        load_config("demo", ["optim.betas=[0.8,"])


def test_data_paths_are_checked_before_a_run_not_when_loading(tmp_path, tiny_data):
    from finegrain.data.readers import read_jsonl
    from finegrain.data.webdataset import write_shards
    from finegrain.train.preflight import check_data_paths

    missing = load_config(None, [f"data.train.path={tmp_path / 'nope.jsonl'}",
                                 f"data.val.path={tmp_path / 'val-{000000..000003}.tar'}"])  # loads fine
    with pytest.raises(ConfigError, match=r"data.train.path=.*nope.jsonl.*: the file does not exist; "
                                          r"data.val.path=.*: its first shard .*val-000000.tar does not exist"):
        check_data_paths(missing)
    records = read_jsonl(tiny_data / "val.jsonl")
    write_shards(((r, (tiny_data / r.image).read_bytes()) for r in records), str(tmp_path / "val-%06d.tar"), 8)
    check_data_paths(load_config(None, [f"data.train.path={tiny_data / 'train.jsonl'}",
                                        f"data.val.path={tmp_path / 'val-{000000..000002}.tar'}"]))
    check_data_paths(load_config("demo"))  # demo: sources are generated on demand
    with pytest.raises(ConfigError, match=r"data.train.root='/no/such/folder' is not a folder"):
        check_data_paths(load_config(None, [f"data.train.path={tiny_data / 'train.jsonl'}",
                                            "data.train.root=/no/such/folder"]))
