"""The trainer's method hooks: the evaluated and exported model, EMA teacher in the checkpoint, resume."""

import torch
from hook_methods import EMAClip  # noqa: F401  (registers "ema_clip_test")

from finegrain.train.trainer import Trainer, train


def test_ema_teacher_is_exported_evaluated_and_resumed(tiny_data, tiny_config):
    cfg = tiny_config("method.name=ema_clip_test", "train.steps=3", "train.save_every=3",
                      f"data.val.path={tiny_data / 'val.jsonl'}", "train.best_metric=retrieval/i2t_r1")
    trainer = Trainer(cfg)
    assert not any(p is trainer.method.teacher["visual"].conv1.weight for g in trainer.optimizer.param_groups
                   for p in g["params"])
    conv1 = trainer.model.clip.visual.conv1.weight.detach().clone()
    assert not trainer.model.clip.visual.conv1.weight.requires_grad
    unused_group = next(g for g in trainer.optimizer.param_groups if any(p is trainer.method.unused for p in g["params"]))
    assert unused_group["lr_scale"] == 0.5  # the method's own parameter rules reach the optimizer
    evaluated = []
    original = trainer.method.eval_model
    trainer.method.eval_model = lambda model: evaluated.append(original(model)) or evaluated[-1]
    result = trainer.fit()
    state = torch.load(result.output_dir / "step_00000003.pt", weights_only=True)
    teacher = trainer.method.teacher["visual"]
    student = trainer.model.clip.visual
    assert not torch.equal(teacher.proj, student.proj)  # momentum 0.5: the teacher lags the student
    torch.testing.assert_close(state["state_dict"]["visual.proj"], teacher.proj)  # export = teacher tower
    torch.testing.assert_close(state["train_state_dict"]["visual.proj"], student.proj)  # resume = student
    torch.testing.assert_close(state["state_dict"]["text_projection"], trainer.model.clip.text_projection)
    assert evaluated and evaluated[-1].clip.visual is teacher
    torch.testing.assert_close(student.conv1.weight, conv1)  # frozen by the method's rule: never updated
    best = torch.load(result.output_dir / "best.pt", weights_only=True)
    assert "train_state_dict" in best

    resumed = Trainer(tiny_config("method.name=ema_clip_test", "train.steps=4", "train.save_every=3",
                                  f"data.val.path={tiny_data / 'val.jsonl'}"), resume="latest")
    torch.testing.assert_close(resumed.model.clip.visual.proj, student.proj)
    torch.testing.assert_close(resumed.method.teacher["visual"].proj, teacher.proj)


def test_method_parameter_rules_and_config_rules_freeze(tiny_config):
    result_trainer = Trainer(tiny_config("optim.param_groups=[{prefix: model.clip.visual.conv1, trainable: false}]",
                                         "train.steps=2"))
    before = result_trainer.model.clip.visual.conv1.weight.detach().clone()
    result_trainer.fit()
    assert torch.equal(result_trainer.model.clip.visual.conv1.weight, before)
    assert train(tiny_config("method.name=ema_clip_test", "train.steps=2", output="b"), progress_bar=False).step == 2
