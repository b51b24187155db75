"""The trainer's method hooks: the evaluated and exported model, EMA teacher in the checkpoint, resume."""

import open_clip
import torch
from hook_methods import EMAClip, ExtraEvalClip  # noqa: F401  (registers "ema_clip_test", "extra_eval_test")

from finegrain.eval import evaluate
from finegrain.train.metrics_log import read_metrics
from finegrain.train.trainer import Trainer, train


def test_ema_teacher_is_exported_evaluated_and_resumed(tiny_data, tiny_config):
    cfg = tiny_config("method.name=ema_clip_test", "train.steps=3", "train.save_every=3",
                      f"data.val.path={tiny_data / 'val.jsonl'}", "train.best_metric=retrieval/text_retrieval_recall@1")
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


def test_extra_eval_models_are_evaluated_prefixed_printed_and_leave_best_to_the_eval_model(tiny_data, tiny_config,
                                                                                           capsys):
    cfg = tiny_config("method.name=extra_eval_test", f"data.val.path={tiny_data / 'val.jsonl'}", "train.eval_every=3",
                      "train.best_metric=retrieval/text_retrieval_recall@1", "optim.lr=1e-2")
    trainer = Trainer(cfg, progress_bar=False)
    result = trainer.fit()
    student = {k: v for k, v in result.eval_metrics.items() if k.startswith("retrieval/")}
    teacher = {k.removeprefix("teacher/"): v for k, v in result.eval_metrics.items() if k.startswith("teacher/")}
    assert set(teacher) == set(student) and "retrieval/text_retrieval_recall@1" in teacher
    assert teacher != student  # the trained student and the initial tower rank the captions differently
    evaluated = {}
    teacher_model = trainer.model.with_visual(trainer.method.teacher["visual"])
    for name, model in {"": trainer.model, "teacher": teacher_model}.items():
        transform = open_clip.image_transform(model.image_size, is_train=False, mean=trainer.mean, std=trainer.std)
        evaluated[name] = evaluate(model, ["retrieval"], *trainer.val_source, transform, trainer.tokenizer,
                                   progress=False)
    assert evaluated[""] == student and evaluated["teacher"] == teacher
    logged = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "eval/teacher/retrieval/text_retrieval_recall@1" in r]
    assert [r["step"] for r in logged] == [3, 6]
    assert "teacher/retrieval" in capsys.readouterr().out  # the table printed at step 3
    best = torch.load(result.output_dir / "best.pt", weights_only=True)
    assert best["best"] == max(r["eval/retrieval/text_retrieval_recall@1"] for r in logged)
