"""Bad input is a DataError that the CLI reports as one line (exit code 2), also from a data loader worker; any
other exception is a bug in finegrain: one line says so, then it propagates with its traceback."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from finegrain import cli
from finegrain.cli import main
from finegrain.data.coco_panoptic import PanopticError
from finegrain.data.images import ImageError
from finegrain.data.records import RecordError
from finegrain.data.text_cache import TextCacheError
from finegrain.errors import ConfigError, DataError
from finegrain.models.factory import CheckpointError
from finegrain.models.released import ReleasedCheckpointError
from finegrain.models.tower import UnsupportedModelError
from finegrain.train.run_lock import RunFolderLocked
from finegrain.train.trainer import NonFiniteLossError

TYPED = [ConfigError, RecordError, ImageError, PanopticError, ReleasedCheckpointError, UnsupportedModelError,
         CheckpointError, TextCacheError, RunFolderLocked, NonFiniteLossError]


def one_error_line(err: str, command: str) -> str:
    """The only line of ``err``, checked to be ``finegrain COMMAND: error: ...`` without a traceback."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finegrain {command}: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


@pytest.mark.parametrize("error", TYPED)
def test_every_typed_error_is_a_data_error_a_value_error_made_from_one_message(error):
    assert issubclass(error, DataError) and issubclass(error, ValueError)
    assert str(error("what is wrong")) == "what is wrong"  # how torch rebuilds a worker's error


@pytest.mark.parametrize("error, old_base", [(CheckpointError, RuntimeError), (TextCacheError, RuntimeError),
                                             (RunFolderLocked, RuntimeError), (NonFiniteLossError, FloatingPointError)])
def test_typed_errors_keep_their_former_base_for_code_that_catches_it(error, old_base):
    assert issubclass(error, old_base)


def test_cli_usage_mistake_is_one_line_with_exit_code_2(capsys):
    assert main(["eval"]) == 2
    line = one_error_line(capsys.readouterr().err, "eval")
    assert "say what to evaluate: --benchmark NAMES, --task PROTOCOLS with --data, or --config FILE" in line


def test_missing_records_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    assert main(["train", "--no-progress", "model.name=finegrain-test", f"data.train.path={missing}",
                 f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert str(missing) in one_error_line(capsys.readouterr().err, "train")
    assert not (tmp_path / "run").exists()


def test_a_wrong_method_value_of_a_built_in_recipe_is_one_line_naming_the_key(tiny_data, tmp_path, capsys):
    assert main(["train", "--config", "demo-finetune-seg", "--no-progress", "method.aux_level=7",
                 f"data.train.path={tiny_data / 'train.jsonl'}", "data.val=null", "train.eval_tasks=[]",
                 "train.best_metric=null", "data.num_workers=0", f"train.output_dir={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "method.aux_level must name a pyramid level 0..3, got 7" in line


def test_pretrained_that_is_not_a_checkpoint_given_to_finetune_is_one_line(tmp_path, capsys):
    from test_finetune_user import ade_folder

    notes = tmp_path / "notes.pt"
    notes.write_text("my notes\n")
    data = ade_folder(tmp_path / "ade", count=1)
    assert main(["finetune", "--task", "seg", "--data", str(data), "--pretrained", str(notes),
                 "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err, "finetune")
    assert str(notes) in line and "it holds text starting 'my notes'" in line


def test_open_clip_weights_of_another_model_are_one_line_naming_the_file(tiny_config, tmp_path, capsys):
    from finegrain.models import create_model

    weights = tmp_path / "tiny_weights.pt"
    torch.save(create_model("finegrain-tiny").clip.state_dict(), weights)  # an open_clip state dict, not a run's
    assert main(["train", "--no-progress", "model.name=finegrain-test", "data.num_workers=0",
                 f"data.train.path={tiny_config().data.train.path}", f"train.output_dir={tmp_path / 'run'}",
                 f"model.pretrained={weights}"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{weights}: its weights do not load into model finegrain-test (" in line
    assert line.endswith("set model.name to the model they were trained as")


def test_a_held_out_box_of_negative_width_is_one_line_naming_file_annotation_and_field(tiny_data, tmp_path,
                                                                                       capsys):
    from test_finetune_detection import _coco_gt

    gt_path = _coco_gt(tmp_path)
    gt = json.loads(gt_path.read_text())
    gt["annotations"][1]["bbox"] = [20, 5, -15, 20]
    gt_path.write_text(json.dumps(gt))
    names = tmp_path / "names.txt"
    names.write_text("red circle\nblue square\n")
    assert main(["train", "--config", "demo-finetune-det", "--no-progress", f"data.train.path={gt_path}",
                 f"data.train.root={tmp_path}", f"data.val.path={gt_path}", f"data.val.root={tmp_path}",
                 f"method.class_names={names}", "train.eval_tasks=[detection]", "data.num_workers=0",
                 f"train.output_dir={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{gt_path}: annotations[1] (id 2): field 'bbox' must be [x, y, width, height]" in line
    assert not (tmp_path / "run").exists()


def test_an_eval_option_of_the_wrong_kind_is_one_line_naming_it(tiny_data, capsys):
    assert main(["eval", "--model", "finegrain-test", "--no-progress", "--task", "box_classification",
                 "--data", str(tiny_data / "val.jsonl"), "--option", "crop_scale=abc"]) == 2
    note, line = capsys.readouterr().err.splitlines()  # a random model is said in a note
    assert note.startswith("finegrain eval: note: no --pretrained")
    assert line == "finegrain eval: error: benchmark 'box_classification': option crop_scale='abc': expected a number"


@pytest.mark.parametrize("bug", [TypeError("boom"), KeyError("state_dict"), AttributeError("no .shape")])
def test_a_bug_in_a_command_propagates_after_one_internal_error_line(monkeypatch, capsys, bug):
    def broken(args):
        raise bug

    monkeypatch.setattr(cli.methods, "run", broken)
    with pytest.raises(type(bug)):
        main(["methods"])
    err = capsys.readouterr().err
    message = "state_dict" if isinstance(bug, KeyError) else str(bug)
    assert err == (f"finegrain methods: internal error (a bug in finegrain): {type(bug).__name__}: {message}; "
                   "the traceback follows\n")
    monkeypatch.setenv("FINEGRAIN_DEBUG", "1")  # the same with tracebacks for all
    with pytest.raises(type(bug)):
        main(["methods"])
    assert "internal error (a bug in finegrain)" in capsys.readouterr().err


def test_a_bug_deep_inside_a_command_is_not_a_one_line_user_error(monkeypatch, capsys):
    import finegrain.config

    def broken(*args, **kwargs):
        return {}["model"]  # an internal KeyError, as a bug would raise it

    monkeypatch.setattr(finegrain.config, "load_config", broken)
    with pytest.raises(KeyError):
        main(["config", "--config", "demo"])
    err = capsys.readouterr().err
    assert err.startswith("finegrain config: internal error (a bug in finegrain): KeyError: model;")
    assert ": error:" not in err


def test_user_errors_under_finegrain_debug_show_their_traceback(monkeypatch):
    monkeypatch.setenv("FINEGRAIN_DEBUG", "1")
    with pytest.raises(DataError, match="say what to evaluate"):
        main(["eval"])


def test_a_bug_exits_1_with_the_notice_then_the_traceback():
    script = textwrap.dedent("""
        import sys
        from finegrain import cli

        def broken(args):
            raise TypeError("boom")

        cli.methods.run = broken
        sys.exit(cli.main(["methods"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 1
    notice = "finegrain methods: internal error (a bug in finegrain): TypeError: boom; the traceback follows"
    assert result.stderr.startswith(notice + "\n")
    assert result.stderr.index("Traceback (most recent call last)") > 0
    assert result.stderr.rstrip().endswith("TypeError: boom")


def test_cuda_out_of_memory_is_the_users_to_fix():
    assert cli.user_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert cli.user_error(FileNotFoundError("gone.jsonl")) and cli.user_error(ImportError("pip install x"))
    assert not cli.user_error(RuntimeError("a bug")) and not cli.user_error(ValueError("a bug"))


class Failing(Dataset):
    """Raises ``error`` when item 1 is loaded."""

    def __init__(self, error: Exception):
        self.error = error

    def __len__(self):
        return 4

    def __getitem__(self, index):
        if index == 1:
            raise self.error
        return torch.zeros(2)


def _load_all(error: Exception):
    def command(args):
        for _ in DataLoader(Failing(error), batch_size=1, num_workers=1, multiprocessing_context="fork"):
            pass
        return 0

    return command


@pytest.mark.parametrize("error", [DataError("data.jsonl:2: field 'captions' must be a list"),
                                   RecordError("data.jsonl:2: field 'captions' must be a list")])
def test_a_data_error_in_a_loader_worker_is_one_line_of_its_message(monkeypatch, capsys, error):
    monkeypatch.setattr(cli.methods, "run", _load_all(error))
    assert main(["methods"]) == 2
    assert one_error_line(capsys.readouterr().err, "methods") == \
        "finegrain methods: error: data.jsonl:2: field 'captions' must be a list"
    with pytest.raises(type(error)):  # torch rebuilds the worker's error as the same type
        _load_all(error)(None)


def test_a_bug_in_a_loader_worker_is_an_internal_error_naming_the_original_message(monkeypatch, capsys):
    monkeypatch.setattr(cli.methods, "run", _load_all(TypeError("unsupported operand")))
    with pytest.raises(TypeError, match="(?s)Caught TypeError in DataLoader worker process 0.*unsupported operand"):
        main(["methods"])
    assert capsys.readouterr().err == ("finegrain methods: internal error (a bug in finegrain): TypeError: "
                                       "unsupported operand; the traceback follows\n")
