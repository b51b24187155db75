import importlib
import json
import re
import subprocess
import sys

import pytest
import torch

from finegrain.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "finegrain", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo", "train", "eval", "export", "config", "models", "methods"):
        assert command in out.stdout
    assert "torchrun" in out.stdout


def test_subcommand_help_and_config(capsys):
    assert main(["config", "--config", "demo", "train.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert main(["methods"]) == 0
    assert "clip" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "finegrain-tiny" in capsys.readouterr().out


def test_bad_override_is_a_one_line_error(capsys):
    assert main(["train", "--config", "demo", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.lrr'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["train"], ["config"], ["demo"], ["embed-text", "--output", "o"]])
def test_overrides_may_stand_on_both_sides_of_options(command):
    from finegrain.cli import build_parser, parse_args

    name, *options = command
    args = parse_args(build_parser(), [name, "model.name=X", "--no-progress" if name != "config" else "--config",
                                       *([] if name != "config" else ["demo"]), "train.steps=1", *options, "a.b=2"])
    assert args.overrides == ["model.name=X", "train.steps=1", "a.b=2"]


def test_train_with_an_override_after_a_flag_runs_it(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "model.name=finegrain-test", "--no-progress", "train.steps=1",
                 f"data.train.path={tiny_data / 'train.jsonl'}", "data.batch_size=8", "data.num_workers=0",
                 f"train.output_dir={run_dir}"]) == 0
    assert "trained to step 1" in capsys.readouterr().out


def test_stray_arguments_are_still_refused(capsys):
    with pytest.raises(SystemExit):
        main(["train", "train.steps=1", "--no-progress", "junk"])
    assert "unrecognized arguments: junk" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "train.steps=1"])  # eval takes no overrides


@pytest.mark.parametrize("override", ["data.batch_size=0", "data.batch_size=-2", "data.prefetch_factor=0",
                                      "data.max_bad_fraction=-1"])
def test_bad_numbers_stop_train_in_one_line_before_the_run_folder_is_made(tiny_data, tmp_path, capsys, override):
    run_dir = tmp_path / "run"
    assert main(["train", "--no-progress", "model.name=finegrain-test", f"data.train.path={tiny_data / 'train.jsonl'}",
                 f"train.output_dir={run_dir}", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: {override.split('=')[0]} must be" in err and "Traceback" not in err
    assert not run_dir.exists()


def test_train_eval_export_round_trip(tiny_data, tmp_path, capsys):
    import json

    import open_clip
    import torch

    run_dir = tmp_path / "run"
    assert main(["train", "--no-progress", "model.name=finegrain-test", f"data.train.path={tiny_data / 'train.jsonl'}",
                 "data.batch_size=8", "data.num_workers=0", "train.steps=2", f"train.output_dir={run_dir}"]) == 0
    capsys.readouterr()
    ckpt = run_dir / "step_00000002.pt"
    metrics_file = tmp_path / "metrics.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(tiny_data / "val.jsonl"),
                 "--tasks", "retrieval,box_classification", "--output", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert 0 <= metrics["retrieval/text_retrieval_recall@1"] <= 100 and metrics["retrieval/num_images"] == 24
    assert "box_classification/crop_acc1" in metrics
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "exported")]) == 0
    exported = open_clip.create_model(f"local-dir:{tmp_path / 'exported'}")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    torch.testing.assert_close(exported.state_dict()["visual.proj"], state["visual.proj"])


def test_config_errors_are_one_line_and_missing_data_is_a_warning(tmp_path, capsys):
    assert main(["config", "--config", "demo", "train.best_metric=zero_shot/acc1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finegrain config: error: train.best_metric=") and err.count("\n") == 1
    assert main(["config", "--config", "demo", "method.temperature=1"]) == 2  # checked by the method registry
    assert capsys.readouterr().err.startswith("finegrain config: error: unknown config key 'method.temperature'; "
                                              "valid keys here: ['augment', 'gather_with_grad', 'local_loss'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1,\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == f"finegrain config: error: {bad}:2:1: YAML syntax error: expected the node " \
                                      "content, but found '<stream end>'\n"
    assert main(["config", f"data.train.path={tmp_path / 'later.jsonl'}"]) == 0
    out = capsys.readouterr()
    assert "later.jsonl" in out.out and out.err.startswith("finegrain config: warning: data.train.path=")


def test_resume_without_checkpoints_is_one_line(tmp_path, capsys):
    (tmp_path / "best.pt").write_text("x")
    assert main(["train", "model.name=finegrain-test", f"train.output_dir={tmp_path}", "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finegrain train: error: --resume latest:") and "best.pt" in err and err.count("\n") == 1


def test_ctrl_c_outside_training_is_one_line_with_exit_code_130(monkeypatch, capsys):
    from finegrain.cli import methods

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(methods, "run", interrupted)
    assert main(["methods"]) == 130
    assert capsys.readouterr().err == "finegrain methods: interrupted (Ctrl-C)\n"
    monkeypatch.setenv("FINEGRAIN_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        main(["methods"])


def test_models_marks_dense_support_and_lists_pretrained_tags(capsys):
    assert main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert " yes " in rows["ViT-B-16"] and "openai" in rows["ViT-B-16"] and "laion2b_s34b_b88k" in rows["ViT-B-16"]
    assert "no: ResNet tower" in rows["RN50"] and "openai" in rows["RN50"]
    assert "no: CoCa" in rows["coca_ViT-B-32"]
    assert " yes " in rows["EVA02-B-16"] and "no: timm trunk (convnext_base" in rows["convnext_base"]
    assert "no: timm trunk (vit_base_mci_224" in rows["MobileCLIP-B"]
    assert rows["finegrain-tiny"].split()[1:] == ["8.0M", "64", "yes", "-"]
    assert rows["ViT-L-14-336"].split()[1:4] == ["427.9M", "336", "yes"]
    assert rows["RN50"].split()[1:3] == ["-", "224"]
    assert main(["models", "--dense-only"]) == 0
    dense = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert {"ViT-B-16", "ViT-L-14", "finegrain-tiny"} <= dense and not dense & {"RN50", "coca_ViT-B-32", "convnext_base"}
    assert "EVA02-B-16" in dense


@pytest.mark.parametrize("name", ["finegrain-tiny", "ViT-B-32", "ViT-M-16-alt", "ViT-L-16-320"])
def test_parameter_count_from_the_config_equals_the_built_models(name):
    import open_clip
    import torch

    from finegrain.models.factory import model_config, parameter_count

    with torch.device("meta"):
        model = open_clip.create_model(name, device="meta")
    assert parameter_count(model_config(name)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("vision, reason", [
    ({}, None),
    ({"qk_norm": True}, "custom attention blocks"),
    ({"scaled_cosine_attn": True}, "custom attention blocks"),
    ({"attentional_pool": True}, "attentional pooling"),
    ({"pool_type": "avg"}, "pool_type='avg'"),
    ({"final_ln_after_pool": True}, "final_ln_after_pool"),
    ({"layers": [1, 1, 1, 1], "width": 16}, "ResNet tower"),
])
def test_dense_support_from_the_config_agrees_with_building_the_model(tmp_path, vision, reason):
    from finegrain.models import UnsupportedModelError, create_model
    from finegrain.models.factory import dense_support

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, **vision},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    path = tmp_path / f"variant-{len(vision)}-{abs(hash(str(vision)))}.json"
    path.write_text(json.dumps(cfg))
    found = dense_support(cfg)
    assert (found is None) if reason is None else (reason in found)
    if reason is None:
        create_model(str(path))
    else:
        with pytest.raises(UnsupportedModelError):
            create_model(str(path))


def test_train_summary_is_a_table_with_an_optional_json_line(tiny_data, tmp_path, capsys):
    args = ["train", "--no-progress", "model.name=finegrain-test", f"data.train.path={tiny_data / 'train.jsonl'}",
            f"data.val.path={tiny_data / 'val.jsonl'}", "data.batch_size=8", "data.num_workers=0", "train.steps=1"]
    assert main([*args, f"train.output_dir={tmp_path / 'a'}"]) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[out.index(f"trained to step 1; run folder {tmp_path / 'a'}") + 1:]
    assert table[0].split() == ["task", "metric", "value"]
    assert any(re.fullmatch(r"retrieval +text_retrieval_recall@1 +\d+\.\d\d", line) for line in table)
    assert any(re.fullmatch(r"retrieval +num_images +24", line) for line in table)
    assert not any(line.startswith("{") for line in out)
    assert main([*args, f"train.output_dir={tmp_path / 'b'}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["step"] == 1 and result["eval"]["retrieval/num_images"] == 24


def test_format_metrics_aligns_and_prints_counts_as_integers():
    from finegrain.train.report import format_metrics

    table = format_metrics({"retrieval/text_retrieval_recall@1": 56.04166, "retrieval/num_images": 200,
                            "box_classification/roi_acc1": 19.6})
    assert table.splitlines() == [
        "task                metric                   value",
        "retrieval           text_retrieval_recall@1  56.04",
        "retrieval           num_images                 200",
        "box_classification  roi_acc1                 19.60",
    ]


def test_demo_closing_note_states_the_measured_gap():
    from finegrain.demo import region_gap_note

    note = region_gap_note({"box_classification/roi_acc1": 19.6, "box_classification/crop_acc1": 27.4})
    assert note.startswith("RoI (dense) box classification is 7.8 points below crop classification (19.6 vs 27.4)")
    assert "within 1 point" in region_gap_note({"box_classification/roi_acc1": 8.6,
                                                "box_classification/crop_acc1": 8.9})
    assert "2.6 points above" in region_gap_note({"box_classification/roi_acc1": 30.0,
                                                  "box_classification/crop_acc1": 27.4})


def test_version():
    from finegrain import __version__

    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == __version__


def test_demo_never_replaces_a_run_it_did_not_write(tmp_path):
    from finegrain.demo import run_demo

    (tmp_path / "config.yaml").write_text("model: {name: ViT-B-16}\n")
    with pytest.raises(FileExistsError, match="did not write.*--overwrite"):
        run_demo(tmp_path, steps=1)
    assert (tmp_path / "config.yaml").read_text() == "model: {name: ViT-B-16}\n"


def _user_run(folder):
    """A training run of the user's in ``folder``; returns its files' bytes."""
    folder.mkdir(parents=True)
    for name in ("step_00000001.pt", "step_00000002.pt", "config.yaml", "metrics.jsonl", "run_info.json"):
        (folder / name).write_text(f"the user's {name}")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_demo_refuses_an_override_that_redirects_its_run(tmp_path, capsys):
    user = _user_run(tmp_path / "B")
    code = main(["demo", "--output", str(tmp_path / "A"), "--steps", "2", f"train.output_dir={tmp_path / 'B'}",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "train.output_dir" in err and "--output" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (tmp_path / "B").iterdir()} == user
    assert not (tmp_path / "A").exists()  # refused before anything was written


def test_method_demo_checks_every_folder_it_writes_before_writing(tmp_path, capsys):
    from finegrain.demo import DEMO_MARKER

    out = tmp_path / "D"
    user = _user_run(out / "clip")
    args = ["demo", "--method", "fineclip", "--start", str(tmp_path / "start.pt"), "--output", str(out),
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"did not write {out / 'clip'} (step_00000001.pt" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in (out / "clip").iterdir()} == user
    assert sorted(p.name for p in out.iterdir()) == ["clip"]  # nothing written: no marker, no fineclip/
    assert main([*args[:4], str(out / "clip" / "step_00000002.pt"), *args[5:], "--overwrite"]) == 2
    assert "the demo replaces the run in" in capsys.readouterr().err  # a start the demo would delete
    assert not (out / DEMO_MARKER).exists()


def test_demo_refuses_an_annotation_folder_it_did_not_write_before_training(tmp_path):
    from finegrain.demo import run_demo

    (tmp_path / "annotate").mkdir()
    (tmp_path / "annotate" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="annotate \\(an annotation folder\\).*--overwrite"):
        run_demo(tmp_path, steps=1)
    with pytest.raises(ValueError, match="holds no annotation"):  # --overwrite never deletes files it did not write
        run_demo(tmp_path, steps=1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotate"]
    assert (tmp_path / "annotate" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, message", [
    (["train", "--confg", "demo"], "finegrain train: error: unrecognized arguments: --confg (did you mean --config?)"),
    (["eval", "--checkpont=x.pt"],
     "finegrain eval: error: unrecognized arguments: --checkpont=x.pt (did you mean --checkpoint?)"),
    (["viz", "clusters", "--models", "a=b", "--outt"],
     "finegrain viz clusters: error: unrecognized arguments: --outt (did you mean --out?)"),
    (["--verson"], "finegrain: error: unrecognized arguments: --verson (did you mean --version?)"),
])
def test_unknown_option_is_an_error_of_its_command_with_the_closest_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == message


def test_output_cut_short_by_its_reader_stops_quietly():
    """`finegrain models | head -1`: the closed pipe ends the command without an error line."""
    shell = f"{sys.executable} -m finegrain models | head -1"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", shell], capture_output=True, text=True, timeout=180,
                         check=False)
    assert out.stdout.count("\n") == 1
    assert "error" not in out.stderr.lower() and "Traceback" not in out.stderr


def test_methods_are_listed_from_their_entry_points_without_importing_torch():
    code = ("import sys; from finegrain.cli import main; main(['methods']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    methods, terms = out.stdout.split("\n\n")
    declared = declared_entry_points()
    assert methods.split() == sorted(declared["finegrain.methods"])
    assert [line.strip() for line in terms.splitlines()[1:]] == sorted(declared["finegrain.terms"])
    assert {"clip", "clipself", "detailclip", "fineclip"} <= set(methods.split())


def declared_entry_points() -> dict:
    """The entry points finegrain's pyproject.toml declares, by group."""
    from pathlib import Path

    import tomllib

    return tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["entry-points"]


def test_every_term_finegrain_registers_is_declared_as_an_entry_point():
    from finegrain.objectives import list_terms, term

    declared = declared_entry_points()["finegrain.terms"]
    assert sorted(declared) == sorted(term._TERMS) == list_terms()
    for name, value in declared.items():
        module, cls = value.split(":")
        assert getattr(importlib.import_module(module), cls).term_name == name


def test_a_term_another_package_declares_composes_with_a_method_and_is_listed(monkeypatch, capsys):
    from importlib.metadata import EntryPoint

    from finegrain import plugins
    from finegrain.config import load_config
    from finegrain.models import create_model
    from finegrain.objectives import Progress, create_method, term
    from finegrain.plugins import TERM_GROUP

    declared = {"toy_term": EntryPoint("toy_term", "plugin_method:ToyTerm", TERM_GROUP)}
    monkeypatch.setattr(term, "term_entry_points", lambda: declared)
    monkeypatch.setattr(plugins, "term_entry_points", lambda: declared)
    cfg = load_config("demo", ["method.name=fineclip+toy_term", "method.toy_term.weight=0.5"])
    model = create_model("finegrain-test")
    method = create_method(cfg.method.name, cfg.method.options, model)
    length = model.context_length
    batch = {"image": torch.randn(2, 3, 32, 32), "text": torch.randint(1, 100, (2, length)),
             "boxes": torch.tensor([[[0.0, 0, 16, 16]], [[8.0, 8, 32, 24]]]), "box_valid": torch.ones(2, 1, dtype=bool),
             "region_text": torch.randint(1, 100, (2, 1, length)), "region_text_valid": torch.ones(2, 1, dtype=bool),
             "crops": torch.randn(2, 3, 32, 32)}
    losses = method(model, batch, Progress(0, 1, 0.0))
    assert losses["toy_term_loss"].item() == pytest.approx(0.5)  # weight x squared norm of unit embeddings
    assert {"global_contrastive_loss", "self_distill_loss", "region_contrastive_loss"} < set(losses)
    main(["methods"])
    assert "  toy_term" in capsys.readouterr().out.splitlines()
    bad = {"not_a_term": EntryPoint("not_a_term", "plugin_method:ToyPluginMethod", TERM_GROUP)}
    monkeypatch.setattr(term, "term_entry_points", lambda: bad)
    with pytest.raises(ValueError, match="is not a finegrain Term subclass"):
        create_method("not_a_term", None, create_model("finegrain-test"))


def test_a_method_another_package_declares_loads_when_a_config_names_it(monkeypatch):
    from importlib.metadata import EntryPoint

    from finegrain.config import load_config
    from finegrain.objectives import get_method_class, list_methods, registry
    from finegrain.plugins import METHOD_GROUP, method_entry_points

    declared = {**method_entry_points(),
                "toy_plugin": EntryPoint("toy_plugin", "plugin_method:ToyPluginMethod", METHOD_GROUP)}
    monkeypatch.setattr(registry, "method_entry_points", lambda: declared)
    assert "toy_plugin" in list_methods()
    cfg = load_config("demo", ["method.name=toy_plugin"])
    cls = get_method_class(cfg.method.name)
    assert cls.__name__ == "ToyPluginMethod" and cls.method_name == "toy_plugin"
    bad = {"not_a_method": EntryPoint("not_a_method", "plugin_method:__doc__", METHOD_GROUP)}
    monkeypatch.setattr(registry, "method_entry_points", lambda: bad)
    with pytest.raises(ValueError, match="not a finegrain Method subclass"):
        get_method_class("not_a_method")
