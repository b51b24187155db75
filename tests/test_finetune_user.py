"""Fine-tuning from a new user's chair: a finegrain checkpoint says which model it holds, block fractions fit any
tower, settings that cannot work are said before step one, quiet runs still report, tables never abort or lie."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.cli import main
from finegrain.eval.detection import computed
from finegrain.eval.results import append_result, compare_runs
from finegrain.models.backbone import ViTBackbone
from finegrain.train.trainer import print_interval, status_line, train

SMALL_SEG = ["data.batch_size=2", "data.num_workers=0", "train.steps=2", "train.save_every=2",
             "method.crop=[64,64]", "method.scale=[128,64]", "method.test_scale=[128,64]", "method.test_window=[64,64]",
             "method.test_stride=[43,43]", "method.channels=32", "method.aux_channels=16", "method.norm=batch",
             "train.precision=fp32", "train.eval_precision=fp32"]


def ade_folder(root, count=4):
    """An ADEChallengeData2016 layout with ``count`` 64x48 photos per split and their label maps (0..3)."""
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        images, labels = root / "ADEChallengeData2016/images" / split, root / "ADEChallengeData2016/annotations" / split
        images.mkdir(parents=True), labels.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / f"ADE_{i}.jpg")
            Image.fromarray(rng.integers(0, 4, (48, 64), dtype=np.uint8)).save(labels / f"ADE_{i}.png")
    return root


@pytest.fixture
def demo_checkpoint(tiny_config):
    """A finegrain-test run's best.pt (the demo's kind of checkpoint: another model than the recipes')."""
    result = train(tiny_config("train.steps=1", "train.save_every=1", output="pretrain"), progress_bar=False)
    return result.output_dir / "step_00000001.pt"


def test_the_help_example_fine_tunes_the_checkpoints_own_model(demo_checkpoint, tmp_path, capsys):
    """``finegrain finetune --task seg --data DIR --pretrained RUN/best.pt`` with a 4-block finegrain-test run: the
    recipe's ViT-B-16 gives way to the checkpoint's model, its block fractions fit 4 blocks, and the settings the
    small run cannot honour are said before step one."""
    data = ade_folder(tmp_path / "ade")
    code = main(["finetune", "--task", "seg", "--data", str(data), "--pretrained", str(demo_checkpoint),
                 "--output", str(tmp_path / "seg"), "--no-progress", *SMALL_SEG])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"model: {demo_checkpoint} holds a finegrain-test model; using it instead of ViT-B-16" in out
    assert "optim.warmup_steps=1500 is not shorter than the run (2 steps)" in err
    assert "train.eval_every=64000 is past the last step (2)" in err
    config = (tmp_path / "seg" / "config.yaml").read_text()
    assert "name: finegrain-test" in config


def test_a_model_the_user_forces_that_cannot_load_the_weights_is_one_line_naming_both(demo_checkpoint, tmp_path,
                                                                                   capsys):
    data = ade_folder(tmp_path / "ade")
    code = main(["finetune", "--task", "seg", "--data", str(data), "--pretrained", str(demo_checkpoint),
                 "--output", str(tmp_path / "seg"), "model.name=finegrain-tiny", *SMALL_SEG])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{demo_checkpoint} holds a finegrain-test model" in err and "model finegrain-tiny" in err


@pytest.mark.parametrize("layers, expected", [(12, [3, 5, 7, 11]), (4, [0, 1, 2, 3]), (2, [0, 0, 0, 1])])
def test_block_fractions_fit_any_depth_and_a_shallow_tower_reads_a_block_for_several_levels(tmp_path, layers, expected):
    from test_backbone import vit

    model = vit(tmp_path, layers=layers).eval()
    backbone = ViTBackbone(model, [0.3333, 0.5, 0.6667, 1.0]).eval()
    assert backbone.block_indices == expected
    size = 4 * model.patch_size[0]
    maps = backbone.block_maps(torch.randn(1, 3, size, size))
    assert len(maps) == 4
    if layers == 2:
        torch.testing.assert_close(maps[0], maps[2])
    with pytest.raises(ValueError, match="block fractions must lie in \\(0, 1\\]"):
        ViTBackbone(model, [0.3, 0.5, 0.7, 1.5])


def test_settings_that_cannot_work_here_are_said_once_and_workers_are_capped(tiny_config, capsys, monkeypatch):
    from finegrain.train import preflight

    monkeypatch.setattr(preflight, "available_cores", lambda: 2)
    cfg = tiny_config("train.precision=fp16", "optim.warmup_steps=10", "data.num_workers=8", "train.steps=2",
                      "train.save_every=2", "train.device=cpu")
    from finegrain.train.trainer import Trainer

    trainer = Trainer(cfg, progress_bar=False)
    err = capsys.readouterr().err
    assert "train.precision=fp16 on a CPU runs many times slower than fp32" in err
    assert "optim.warmup_steps=10 is not shorter than the run (2 steps)" in err
    assert "data.num_workers=8 is more than the 2 cores here allow: using 2" in err
    assert trainer.loader.num_workers == 2 and trainer.cfg.data.num_workers == 8  # the config keeps what was asked


def test_a_quiet_run_prints_a_status_line_every_so_many_steps(tiny_config, capsys):
    cfg = tiny_config("train.steps=6", "train.log_every=2", "train.print_every=3", "train.save_every=6")
    assert print_interval(cfg) == 4  # rounded up to a multiple of log_every
    train(cfg, progress_bar=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["4/6"]
    assert "loss" in lines[0] and "samples/s" in lines[0] and lines[0].endswith("left")
    assert status_line(10, 100, {"loss": 1.5, "lr": 1e-4, "samples_per_s": 12.0}, 2.0) == (
        "step 10/100  loss 1.5000  lr 0.0001  12 samples/s  0:03:00 left")
    assert print_interval(tiny_config("train.steps=1000", "train.log_every=10")) == 50  # about 20 lines a run


def test_tables_name_the_folders_without_results_and_mark_metrics_not_computed(tmp_path):
    append_result(tmp_path / "a" / "eval", {"benchmark": "finetune-det.detection", "task": "detection",
                                            "metrics": {"bbox_ap": 12.5, "bbox_aps": math.nan}})
    (tmp_path / "empty").mkdir()
    stored = json.loads((tmp_path / "a" / "eval" / "results.jsonl").read_text())
    assert stored["metrics"]["bbox_aps"] is None  # JSON null, not NaN
    table = compare_runs([tmp_path / "a", tmp_path / "empty"])
    assert "12.50" in table and "-*" in table
    assert "-*: could not be computed" in table and f"no results (skipped): {tmp_path / 'empty'}" in table
    with pytest.raises(FileNotFoundError, match="no evaluation results in"):
        compare_runs([tmp_path / "empty"])
    assert math.isnan(computed(-1.0)) and computed(0.25) == 25.0


@pytest.mark.parametrize("content, said", [(b"", "is empty, not a checkpoint"),
                                           (b"my notes\n", "it holds text starting 'my notes'"),
                                           (None, "it holds a truncated or damaged archive")])
def test_pretrained_that_is_not_a_checkpoint_is_one_line_naming_the_file(tiny_config, tmp_path, capsys, content,
                                                                        said):
    path = tmp_path / "weights.pt"
    if content is None:  # the first half of a real checkpoint
        torch.save({"state_dict": {"w": torch.zeros(4096)}}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    code = main(["train", "--no-progress", "model.name=finegrain-test", "data.num_workers=0",
                 f"data.train.path={tiny_config().data.train.path}", f"train.output_dir={tmp_path / 'run'}",
                 f"model.pretrained={path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(path) in err and said in err
    assert not (tmp_path / "run").exists()
