import math

import pytest
import torch
from torch import nn

from finegrain.config import OptimConfig
from finegrain.models import EMATeacher, cosine_momentum, create_model
from finegrain.objectives import ContrastiveLoss, MaskedContrastiveLoss, Progress, create_method, list_methods
from finegrain.param_rules import ParamRule
from finegrain.train.optim import (
    apply_trainable_rules,
    create_optimizer,
    learning_rate,
    no_decay_names,
    set_learning_rate,
)


def test_contrastive_loss_by_hand():
    """Two pairs, orthogonal unit embeddings, a = b: logits s*I, so each row's CE is
    -log(e^s / (e^s + e^0)) = log(1 + e^-s), both directions alike."""
    a = torch.eye(2)
    s = torch.tensor(2.0)
    expected = math.log(1 + math.exp(-2.0))
    assert ContrastiveLoss()(a, a, s).item() == pytest.approx(expected, rel=1e-6)
    # swapped partners: the positive gets logit 0 and the negative s
    b = torch.eye(2).flip(0)
    assert ContrastiveLoss()(a, b, s).item() == pytest.approx(math.log(1 + math.exp(2.0)), rel=1e-6)


def test_contrastive_loss_matches_a_direct_formula():
    g = torch.Generator().manual_seed(0)
    a = nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    b = nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    s = torch.tensor(10.0)
    logits = s * a @ b.T
    y = torch.arange(5)
    expected = 0.5 * (nn.functional.cross_entropy(logits, y) + nn.functional.cross_entropy(logits.T, y))
    assert ContrastiveLoss()(a, b, s).item() == pytest.approx(expected.item(), rel=1e-6)


def test_clip_method_returns_named_loss_and_metric():
    torch.manual_seed(0)
    model = create_model("finegrain-test")
    method = create_method("clip", None, model)
    assert "clip" in list_methods() and method.sample_spec().views == 1
    batch = {"image": torch.randn(4, 3, 32, 32), "text": torch.randint(1, 49000, (4, 16))}
    out = method(model, batch, Progress(0, 10, 0.0))
    image = model.encode_image(batch["image"], normalize=True)
    text = model.encode_text(batch["text"], normalize=True)
    expected = ContrastiveLoss()(image, text, model.logit_scale.exp())
    assert out["contrastive_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert not out["logit_scale"].requires_grad


def test_weight_decay_groups_follow_open_clip():
    model = create_model("finegrain-test")
    optimizer = create_optimizer(model, OptimConfig(weight_decay=0.3))
    plain, decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert plain["weight_decay"] == 0 and decay["weight_decay"] == 0.3
    assert {"clip.logit_scale", "clip.visual.class_embedding", "clip.visual.ln_pre.weight",
            "clip.transformer.resblocks.0.attn.in_proj_bias"} <= plain_names
    assert {"clip.visual.conv1.weight", "clip.visual.proj", "clip.token_embedding.weight",
            "clip.visual.positional_embedding"} <= decay_names
    assert plain_names.isdisjoint(decay_names)
    assert len(plain_names) + len(decay_names) == len(list(model.parameters()))


def test_learning_rate_schedule_by_hand():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr=0.1)
    assert [learning_rate(s, 12, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, 12, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert learning_rate(8, 12, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: mean of peak and floor
    assert learning_rate(12, 12, cfg) == pytest.approx(0.1)


def test_masked_contrastive_by_hand_ignores_padding():
    """Padded (B=2, M=2) rows, one invalid: the loss is the 3-row InfoNCE; the padding row (huge values,
    which would dominate any logit it entered) changes nothing."""
    a = torch.tensor([[[1.0, 0, 0], [0, 1, 0]], [[0, 0, 1], [50, 50, 50]]])
    b = a.clone()
    valid = torch.tensor([[True, True], [True, False]])
    s = torch.tensor(2.0)
    # three orthogonal pairs: each row's CE is log(e^s + 2) - s, both directions alike
    expected = math.log(math.exp(2.0) + 2) - 2.0
    assert MaskedContrastiveLoss()(a, b, s, valid).item() == pytest.approx(expected, rel=1e-6)
    assert MaskedContrastiveLoss()(a[valid], b[valid], s).item() == pytest.approx(expected, rel=1e-6)


def test_masked_contrastive_equals_clip_loss_when_all_rows_are_valid():
    g = torch.Generator().manual_seed(1)
    a = nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    b = nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    s = torch.tensor(7.0)
    assert MaskedContrastiveLoss()(a, b, s).item() == pytest.approx(ContrastiveLoss()(a, b, s).item(), rel=1e-6)


def test_masked_contrastive_without_valid_rows_is_zero_with_a_graph():
    a = torch.randn(2, 3, requires_grad=True)
    loss = MaskedContrastiveLoss()(a, a, torch.tensor(1.0), torch.zeros(2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0 and torch.equal(a.grad, torch.zeros(2, 3))


def test_ema_teacher_update_by_hand_and_cosine_momentum():
    student = nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.fill_(1.0)
        student.bias.fill_(2.0)
    teacher = EMATeacher({"net": student})
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        student.weight.fill_(3.0)
    teacher.update({"net": student}, momentum=0.75)  # 0.75 * 1 + 0.25 * 3 = 1.5
    torch.testing.assert_close(teacher["net"].weight, torch.full((1, 2), 1.5))
    torch.testing.assert_close(teacher["net"].bias, torch.full((1,), 2.0))
    teacher.update({"net": student}, momentum=1.0)  # a frozen teacher does not move
    torch.testing.assert_close(teacher["net"].weight, torch.full((1, 2), 1.5))
    nn.Sequential(teacher).train()
    assert not teacher.training and not teacher["net"].training  # stays in eval mode
    assert cosine_momentum(0, 100) == pytest.approx(0.996)
    assert cosine_momentum(50, 100) == pytest.approx(0.998)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="teacher holds"):
        teacher.update({"other": student}, 0.5)


def test_no_decay_is_taken_from_modules_own_no_weight_decay():
    """A head's own ``no_weight_decay`` list adds to open_clip's rule (its bias stays exempt too)."""

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"mask_token", "proj.weight"}

    module = nn.ModuleDict({"head": Head(), "plain": nn.Linear(4, 4)})
    assert no_decay_names(module) == {"head.mask_token", "head.proj.weight", "head.proj.bias", "plain.bias"}
    model = create_model("finegrain-test")  # the open_clip model's own list (position embeddings) is not used
    exempt = no_decay_names(nn.ModuleDict({"model": model}))
    assert "model.clip.visual.positional_embedding" not in exempt and "model.clip.visual.ln_pre.weight" in exempt


def test_parameter_rules_freeze_and_scale_learning_rates():
    model = create_model("finegrain-test")
    rules = [ParamRule("clip.visual.conv1", trainable=False),
             ParamRule("clip.visual.proj", lr_scale=0.1, weight_decay=0.5)]
    apply_trainable_rules(model, rules)
    optimizer = create_optimizer(model, OptimConfig(weight_decay=0.2), rules)
    assert not model.clip.visual.conv1.weight.requires_grad
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert id(model.clip.visual.conv1.weight) not in by_param
    proj_group = by_param[id(model.clip.visual.proj)]
    assert (proj_group["lr_scale"], proj_group["weight_decay"]) == (0.1, 0.5)
    set_learning_rate(optimizer, 1e-3)
    assert proj_group["lr"] == pytest.approx(1e-4)
    assert by_param[id(model.clip.token_embedding.weight)]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="matches no parameter"):
        apply_trainable_rules(model, [ParamRule("clip.nothing")])


def test_lock_image_tower_keeps_the_last_groups_trainable():
    model = create_model("finegrain-test")  # 2 blocks: groups [embeddings, ln_pre], block 0, [block 1, ln_post], proj
    model.lock_image_tower(unlocked_groups=2)
    visual = model.clip.visual
    assert not visual.conv1.weight.requires_grad and not visual.transformer.resblocks[0].attn.in_proj_weight.requires_grad
    assert visual.transformer.resblocks[1].attn.in_proj_weight.requires_grad and visual.proj.requires_grad
    assert model.clip.token_embedding.weight.requires_grad


def test_lock_text_tower_with_unlocked_layers_follows_open_clip_groups():
    model = create_model("finegrain-test")
    model.lock_text_tower(unlocked_layers=1)  # open_clip's last text group: the projection (ln_final stays frozen)
    assert model.clip.text_projection.requires_grad and not model.clip.ln_final.weight.requires_grad
    assert not model.clip.transformer.resblocks[1].attn.in_proj_weight.requires_grad
    assert not model.text_locked and model.clip.visual.proj.requires_grad
