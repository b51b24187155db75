import subprocess
import sys

from finegrain.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "finegrain", *args], capture_output=True, text=True, timeout=120)


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
    assert 0 <= metrics["retrieval/i2t_r1"] <= 100 and metrics["retrieval/num_images"] == 24
    assert "box_classification/crop_top1" in metrics
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "exported")]) == 0
    exported = open_clip.create_model(f"local-dir:{tmp_path / 'exported'}")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    torch.testing.assert_close(exported.state_dict()["visual.proj"], state["visual.proj"])
