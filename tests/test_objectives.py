import math

import pytest
import torch
from torch import nn

from finegrain.config import OptimConfig
from finegrain.models import create_model
from finegrain.objectives import ContrastiveLoss, Progress, create_method, list_methods
from finegrain.train.optim import create_optimizer, learning_rate


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
