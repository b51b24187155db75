"""What fine-tuning runs add to the run machinery: mmcv's poly / step schedules with their linear warmup, recipe data
roots, a method's own evaluations (logged, kept as best.pt, written to the run's eval folder), the task base's
parameter rules, and `finegrain finetune`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from finegrain.cli import main
from finegrain.config import ConfigError, OptimConfig, load_config
from finegrain.eval.results import compare_runs
from finegrain.finetune import DenseTask
from finegrain.models import create_model
from finegrain.objectives import register_method
from finegrain.sample_spec import DenseTargets, SampleSpec
from finegrain.train.optim import learning_rate
from finegrain.train.trainer import Trainer, train


def test_poly_schedule_with_mmcv_warmup_by_hand():
    cfg = OptimConfig(lr=1e-4, warmup_steps=1500, warmup_ratio=1e-6, schedule="poly", poly_power=1.0)
    total = 160_000
    # mmcv: regular lr = 1e-4 (1 - t / T); warmup factor 1 - (1 - t / 1500)(1 - 1e-6)
    assert learning_rate(0, total, cfg) == pytest.approx(1e-4 * 1e-6)
    assert learning_rate(750, total, cfg) == pytest.approx(1e-4 * (1 - 750 / total) * (1 - 0.5 * (1 - 1e-6)))
    assert learning_rate(80_000, total, cfg) == pytest.approx(0.5e-4)
    assert learning_rate(159_999, total, cfg) == pytest.approx(1e-4 / total)


def test_step_schedule_drops_at_the_milestone_fractions():
    cfg = OptimConfig(lr=2e-4, warmup_steps=0, schedule="step", step_milestones=[8 / 12, 11 / 12], step_gamma=0.1)
    assert [learning_rate(s, 1200, cfg) for s in (0, 799, 800, 1099)] == pytest.approx([2e-4, 2e-4, 2e-5, 2e-5])
    assert learning_rate(1100, 1200, cfg) == pytest.approx(2e-6)


def test_unknown_schedule_and_milestones_outside_the_run_are_config_errors():
    with pytest.raises(ConfigError, match="optim.schedule must be one of"):
        load_config(None, ["optim.schedule=linear"])
    with pytest.raises(ConfigError, match=r"optim.step_milestones must be > 0 and < 1, got \[8.0\]"):
        load_config(None, ["optim.step_milestones=[8]"])


def test_recipe_data_roots_are_filled_in_or_named_when_missing():
    overrides = ["data.train.path=ade20k-150:{data}@training", "data.train.root=null"]
    assert load_config(None, overrides, "/d/ade/").data.train.path == "ade20k-150:/d/ade@training"
    with pytest.raises(ConfigError, match=r"data.train.path='ade20k-150:\{data\}@training' is relative to the data "
                                          r"root \{data\}: give --data DIR"):
        load_config(None, overrides)


@register_method("finetune_linear_test")
class LinearSegmentation(DenseTask):
    """A 1x1 conv on the last block map, scored by pixel accuracy: the smallest task for the machinery."""

    pyramid = False
    evaluations = ("pixel_accuracy",)

    def __init__(self, options, model):
        super().__init__(options, model)
        self.head = torch.nn.Conv2d(self.backbone.out_channels, 28, 1)

    def sample_spec(self):
        return SampleSpec(caption="none", augment="none", dense=DenseTargets(
            "segmentation", 28, scale=(64, 64), ratio_range=(0.75, 1.25), crop=(64, 64), pad=(64, 64)))

    def logits(self, images):
        maps = self.backbone(images)
        return F.interpolate(self.head(maps[str(len(maps) - 1)]), size=images.shape[-2:], mode="bilinear")

    def forward(self, model, batch, progress):
        return {"ce_loss": F.cross_entropy(self.logits(batch["image"]), batch["label"], ignore_index=255)}

    def evaluate(self, task, model, context):
        return {"records": float(len(context.records)), "head_norm": float(self.head.weight.norm())}


def _config(tiny_data, tmp_path, *overrides):
    return load_config(None, [
        "model.name=finegrain-test", "method.name=finetune_linear_test", f"data.train.path={tiny_data / 'train.jsonl'}",
        f"data.val.path={tiny_data / 'val.jsonl'}", "data.batch_size=4", "data.num_workers=0", "optim.warmup_steps=0",
        "optim.lr=1e-3", f"train.output_dir={tmp_path / 'run'}", "train.steps=4", "train.eval_tasks=[pixel_accuracy]",
        "train.best_metric=pixel_accuracy/head_norm", *overrides])


def test_a_methods_own_evaluation_is_logged_kept_as_best_and_tabulated(tiny_data, tmp_path):
    result = train(_config(tiny_data, tmp_path, "train.eval_every=2"), progress_bar=False)
    assert result.eval_metrics["pixel_accuracy/records"] == 24.0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval/pixel_accuracy/records" in line] == [2, 4]
    entries = [json.loads(line) for line in (tmp_path / "run" / "eval" / "results.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["benchmark"] == "finetune_linear_test.pixel_accuracy"  # the final one
    assert entries[0]["metrics"]["records"] == 24.0 and entries[0]["options"]["step"] == 4
    assert "finetune_linear_test.pixel_accuracy" in compare_runs([tmp_path / "run"])
    assert (tmp_path / "run" / "best.pt").is_file()


def test_task_rules_freeze_the_text_tower_and_decay_block_learning_rates(tiny_data, tmp_path):
    trainer = Trainer(_config(tiny_data, tmp_path, "method.backbone.layer_decay=0.5"), progress_bar=False)
    named = dict(trainer.module.named_parameters())
    assert not any(p.requires_grad for n, p in named.items() if n.startswith("model.") and ".visual." not in n)
    assert not named["model.clip.visual.proj"].requires_grad  # after the blocks: unused by block maps
    scales = {id(p): group["lr_scale"] for group in trainer.optimizer.param_groups for p in group["params"]}
    layers = trainer.model.tower.num_layers
    assert scales[id(named["method.head.weight"])] == 1.0
    assert scales[id(named["model.clip.visual.transformer.resblocks.0.attn.in_proj_weight"])] == 0.5 ** layers
    assert scales[id(named["model.clip.visual.conv1.weight"])] == 0.5 ** (layers + 1)
    decay = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert decay[id(named["model.clip.visual.positional_embedding"])] > 0  # decayed, as iBOT's release does
    assert decay[id(named["model.clip.visual.class_embedding"])] == 0.0  # 1-D
    assert decay[id(named["model.clip.visual.conv1.weight"])] > 0
    state = trainer._state()
    assert sorted(state["method"]) == ["head.bias", "head.weight"]  # the tower is saved once, in state_dict


def test_a_frozen_backbone_keeps_its_weights_and_stays_in_eval_mode(tiny_data, tmp_path):
    cfg = _config(tiny_data, tmp_path, "method.backbone.frozen=true", "method.backbone.drop_path_rate=0.3")
    trainer = Trainer(cfg, progress_bar=False)
    before = {k: v.clone() for k, v in trainer.model.clip.visual.state_dict().items()}
    trainer.fit()
    after = trainer.model.clip.visual.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.module.train()
    assert not trainer.model.clip.visual.training and trainer.method.head.training


def test_checkpoint_weights_picks_the_trained_weights_of_a_run(tiny_data, tmp_path):
    model = create_model("finegrain-test")
    torch.manual_seed(1)
    student = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in model.clip.state_dict().items()}
    path = tmp_path / "teacher_student.pt"
    torch.save({"state_dict": model.clip.state_dict(), "train_state_dict": student}, path)
    cfg = _config(tiny_data, tmp_path, f"model.pretrained={path}", "model.checkpoint_weights=train_state_dict")
    trainer = Trainer(cfg, progress_bar=False)
    assert torch.equal(trainer.model.clip.visual.conv1.weight, student["visual.conv1.weight"])
    torch.save({"state_dict": model.clip.state_dict()}, path)
    with pytest.raises(ValueError, match="has no 'train_state_dict'"):
        Trainer(_config(tiny_data, tmp_path, f"model.pretrained={path}", "model.checkpoint_weights=train_state_dict",
                        "train.overwrite=true"), progress_bar=False)


def test_finetune_command_needs_a_task_and_names_the_heads(capsys):
    assert main(["finetune"]) == 2
    assert "say what to fine-tune: --task seg|det|ovd" in capsys.readouterr().err
    assert main(["finetune", "--task", "seg", "--head", "maskrcnn"]) == 2
    assert "--task seg has heads ['upernet', 'linear'], not 'maskrcnn'" in capsys.readouterr().err


def test_finetune_command_runs_a_config_with_the_backbone_it_is_given(tiny_data, tmp_path, capsys):
    model = create_model("finegrain-test")
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": model.clip.state_dict()}, path)
    config = tmp_path / "task.yaml"
    config.write_text("""
model: {name: finegrain-test}
method: {name: finetune_linear_test}
data: {train: {path: "{data}/train.jsonl"}, batch_size: 4, num_workers: 0}
optim: {warmup_steps: 0, schedule: poly}
train: {steps: 2}
""")
    code = main(["finetune", "--config", str(config), "--data", str(tiny_data), "--pretrained", str(path),
                 "--output", str(tmp_path / "ft"), "--no-progress", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2 and math.isfinite(json.loads((tmp_path / "ft" / "metrics.jsonl").read_text()
                                                            .splitlines()[-1])["ce_loss"])
    assert f"pretrained: {path}" in (tmp_path / "ft" / "config.yaml").read_text()
