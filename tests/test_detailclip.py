"""DetailCLIP: token removal, heads, decoder, each loss term against hand computations, the method's wiring,
training steps in fp32 and bf16, and a short run on the demo data."""

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from finegrain.config import load_config
from finegrain.errors import ConfigError
from finegrain.models import IBOTHead, MAEDecoder, cosine_momentum, create_model, sincos_pos_embed_2d
from finegrain.objectives import Progress, complete_method_options, create_method
from finegrain.objectives.detailclip import DetailCLIP
from finegrain.objectives.ibot import (
    IBOTClsLoss,
    IBOTPatchLoss,
    cls_distillation_loss,
    patch_distillation_loss,
    teacher_probabilities,
)
from finegrain.objectives.pixel_reconstruction import reconstruction_loss
from finegrain.objectives.token_removal import block_scores, keep_count, kept_indices, removal_mask
from finegrain.train.optim import no_decay_names
from finegrain.train.trainer import Trainer, TrainModule, train
from finegrain.viz.token_removal import plot_token_removal

SMALL = {"out_dim": 16, "hidden_dim": 32, "bottleneck_dim": 8}
SMALL_OVERRIDES = [f"method.{k}={v}" for k, v in SMALL.items()]


def make_method(seed=0, model_name="finegrain-test", **options):
    torch.manual_seed(seed)
    model = create_model(model_name)
    return model, create_method("detailclip", DetailCLIP.Options(**{**SMALL, **options}), model)


def two_view_batch(batch_size=3, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(batch_size, 2, 3, size, size, generator=g),
            "text": torch.randint(1, 49000, (batch_size, 16), generator=g)}


# ----- hand references -----------------------------------------------------------------------------------
def softmax(xs, temp):
    e = [math.exp(x / temp) for x in xs]
    return [v / sum(e) for v in e]


def entropy(target, student_logits, temp):
    """H(target, softmax(student_logits / temp)) in plain Python."""
    q = softmax(student_logits, temp)
    return -sum(p * math.log(qi) for p, qi in zip(target, q))


# ----- token removal ------------------------------------------------------------------------------------
def test_keep_count_is_floor_plus_one_clamped_to_the_number_of_blocks():
    assert [keep_count(49, r) for r in (0.5, 0.25, 0.75, 0.0)] == [25, 13, 37, 1]
    assert keep_count(4, 0.99) == 4 and keep_count(6, 0.5) == 4


def test_removal_keeps_the_top_2x2_block_means_on_a_non_square_4x6_grid():
    # block means (2 x 3 blocks): [[0.1, 0.5, 0.3], [0.4, 0.2, 0.6]]; 4 of 6 blocks kept: 0.6, 0.5, 0.4, 0.3.
    # Block (1, 1) holds the single largest patch (0.65) but has a low mean: it is removed.
    att = torch.tensor([
        [0.34, 0.02, 0.50, 0.50, 0.30, 0.30],
        [0.02, 0.02, 0.45, 0.55, 0.30, 0.30],
        [0.40, 0.40, 0.65, 0.05, 0.60, 0.60],
        [0.40, 0.40, 0.05, 0.05, 0.60, 0.60]])[None]
    torch.testing.assert_close(block_scores(att), torch.tensor([[[0.1, 0.5, 0.3], [0.4, 0.2, 0.6]]]))
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[0:2, 0:2] = True
    expected[2:4, 2:4] = True
    assert torch.equal(removal_mask(att, 0.5), expected.reshape(1, 24))


def test_ties_keep_blocks_earlier_in_raster_order_even_for_many_blocks():
    # 4 equal blocks, 3 kept: the last block (bottom-right 2x2 patches) is removed
    removed = removal_mask(torch.ones(1, 4, 4), 0.5).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[2:, 2:] = True
    assert torch.equal(removed, expected)
    # one clear winner, then ties among the rest: winner + the earliest of the tied blocks are kept
    att = torch.tensor([[0.2, 0.2, 0.5, 0.5], [0.2, 0.2, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]])
    assert torch.equal(removal_mask(att[None], 0.5).view(4, 4), expected)
    # 49 equal blocks (14 x 14 patches; torch's unstable CPU sort reorders ties from 17 elements on)
    blocks = ~removal_mask(torch.full((2, 14, 14), 0.3), 0.5).view(2, 7, 2, 7, 2)[:, :, 0, :, 0].reshape(2, 49)
    assert torch.equal(blocks, (torch.arange(49) < 25).expand(2, -1))


def test_removal_counts_and_kept_indices_match_the_released_ratio():
    att = torch.rand(5, 14, 14, generator=torch.Generator().manual_seed(0))
    for ratio, kept in ((0.5, 100), (0.25, 52), (0.75, 148)):
        removed = removal_mask(att, ratio)
        assert removed.shape == (5, 196) and ((~removed).sum(1) == kept).all()
        idx = kept_indices(removed, kept)
        assert torch.equal(idx, torch.sort(idx, dim=1).values)  # ascending
        assert not removed.gather(1, idx).any()


def test_odd_patch_grid_is_a_clear_error():
    with pytest.raises(ValueError, match=r"even patch grid, got \(3, 4\)"):
        removal_mask(torch.rand(1, 3, 4), 0.5)
    torch.manual_seed(0)
    model = create_model("finegrain-test", image_size=24)
    with pytest.raises(ValueError, match=r"image size \(24, 24\) / patch size \(8, 8\) gives \(3, 3\)"):
        create_method("detailclip", DetailCLIP.Options(**SMALL), model)


# ----- models: heads, decoder, kept-token forward --------------------------------------------------------
def test_ibot_head_logits_are_cosines_to_unit_prototypes():
    torch.manual_seed(0)
    head = IBOTHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(2, 3, 8)
    bottleneck = head.mlp(x)
    expected = F.cosine_similarity(bottleneck[..., None, :], head.last_layer.weight, dim=-1)
    torch.testing.assert_close(head(x), expected)
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)  # the prototype norm is fixed at 1 (weight norm, gain 1)
    torch.testing.assert_close(head(x), expected)
    assert all(not m.bias.detach().any() for m in head.mlp if isinstance(m, torch.nn.Linear))


def test_sincos_positions_by_hand():
    table = sincos_pos_embed_2d(8, (2, 3))  # omega = [1, 0.01]; columns encoded first, then rows
    assert table.shape == (7, 8) and float(table[0].abs().max()) == 0
    row, col = 1, 2
    expected = [math.sin(col), math.sin(col * 0.01), math.cos(col), math.cos(col * 0.01),
                math.sin(row), math.sin(row * 0.01), math.cos(row), math.cos(row * 0.01)]
    torch.testing.assert_close(table[1 + row * 3 + col], torch.tensor(expected))


def test_kept_token_forward_with_every_token_kept_equals_the_full_forward():
    torch.manual_seed(0)
    model = create_model("finegrain-test")
    x = torch.randn(2, 3, 32, 32)
    full = model.forward_tower(x, tokens=True)
    every = model.forward_tower(x, keep=torch.arange(16).expand(2, 16), tokens=True)
    torch.testing.assert_close(every.tokens, full.tokens)
    torch.testing.assert_close(every.image_embed, full.image_embed)


def test_decoder_output_does_not_depend_on_the_order_of_kept_tokens():
    torch.manual_seed(0)
    model = create_model("finegrain-test")
    decoder = MAEDecoder(64, 16, (8, 8))
    x = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 3, 5, 6, 9, 15], [1, 2, 4, 8, 10, 12]])
    encoded = [model.forward_tower(x, keep=k, tokens=True) for k in (keep, keep.flip(1))]
    out = [decoder(e.tokens, e.restore, (4, 4)) for e in encoded]
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])
    assert out[0][0].shape == (2, 17, 64) and out[0][1].shape == (2, 16, 8 * 8 * 3)


# ----- loss terms against hand computations --------------------------------------------------------------
STUDENT_CLS = [[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.2, -0.3, 0.1], [-1.0, 2.0, 0.0]]]  # (V=2, B=2, K=3)
TEACHER_CLS = [[[0.3, 0.1, 0.0], [0.0, -0.2, 0.1]], [[0.05, 0.0, 0.1], [0.2, 0.2, -0.1]]]


def hand_cls_loss(student, teacher, centre, t_temp, s_temp=0.1):
    targets = [[softmax([t - c for t, c in zip(row, centre)], t_temp) for row in view] for view in teacher]
    pairs = [(0, 1), (1, 0)]
    return sum(statistics.mean(entropy(targets[q][b], student[v][b], s_temp) for b in range(2))
               for q, v in pairs) / 2


def test_cls_loss_is_cross_view_and_uses_then_updates_the_centre():
    loss = IBOTClsLoss(out_dim=3)
    student, teacher = torch.tensor(STUDENT_CLS), torch.tensor(TEACHER_CLS)
    fresh = loss(student, teacher, teacher_temp=0.04)
    assert fresh.item() == pytest.approx(hand_cls_loss(STUDENT_CLS, TEACHER_CLS, [0, 0, 0], 0.04), rel=1e-5)
    centre = [0.1 * statistics.mean(row[k] for view in TEACHER_CLS for row in view) for k in range(3)]
    torch.testing.assert_close(loss.centre.value, torch.tensor([centre]))
    second_teacher = [[[v * 2 for v in row] for row in view] for view in TEACHER_CLS]
    updated = loss(student, torch.tensor(second_teacher), teacher_temp=0.04)
    assert updated.item() == pytest.approx(hand_cls_loss(STUDENT_CLS, second_teacher, centre, 0.04), rel=1e-5)
    # the functional term alone
    targets = teacher_probabilities(teacher, torch.zeros(1, 3), 0.04)
    assert cls_distillation_loss(student, targets, 0.1).item() == pytest.approx(fresh.item(), rel=1e-6)


STUDENT_PATCH = [[[0.1, 0.2, 0.3], [1.0, 0.0, 0.0], [0.0, -1.0, 0.5], [0.3, 0.3, 0.3]],
                 [[-0.5, 0.0, 0.5], [0.2, 0.1, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]  # (B=2, N=4, K=3)
TEACHER_PATCH = [[[0.2, 0.0, 0.1], [0.0, 0.1, 0.0], [0.1, 0.1, -0.1], [0.3, 0.0, 0.0]],
                 [[0.0, 0.2, 0.1], [0.1, 0.0, 0.1], [-0.1, 0.0, 0.0], [0.05, 0.1, 0.0]]]


def hand_patch_loss(student, teacher, removed, centre, t_temp, s_temp=0.1):
    per_sample = []
    for s_rows, t_rows, m_rows in zip(student, teacher, removed):
        terms = [entropy(softmax([t - c for t, c in zip(t_row, centre)], t_temp), s_row, s_temp)
                 for s_row, t_row, m in zip(s_rows, t_rows, m_rows) if m]
        per_sample.append(sum(terms) / max(1, len(terms)))
    return statistics.mean(per_sample)


@pytest.mark.parametrize("removed", [[[1, 0, 1, 0], [0, 0, 0, 0]], [[1, 1, 1, 0], [1, 0, 0, 0]]])
@pytest.mark.parametrize("epoch,temp", [(0.0, 0.04), (0.7, 0.04), (1.0, 0.07), (3.2, 0.07)])
def test_patch_loss_on_removed_patches_by_epoch_with_variable_counts(removed, epoch, temp):
    _, method = make_method()
    assert method.patch_teacher_temp(epoch) == temp
    mask = torch.tensor(removed, dtype=torch.bool)
    targets = teacher_probabilities(torch.tensor(TEACHER_PATCH), torch.zeros(1, 1, 3), temp)
    value = patch_distillation_loss(torch.tensor(STUDENT_PATCH), targets, mask, 0.1)
    assert value.item() == pytest.approx(hand_patch_loss(STUDENT_PATCH, TEACHER_PATCH, removed, [0, 0, 0], temp),
                                         rel=1e-5)


def test_patch_loss_module_averages_views_and_centres_on_all_patches():
    loss = IBOTPatchLoss(out_dim=3)
    removed = [[[1, 0, 1, 0], [0, 1, 1, 1]], [[0, 0, 0, 1], [1, 1, 0, 0]]]
    student = torch.tensor([STUDENT_PATCH, TEACHER_PATCH])  # (V=2, B=2, N=4, K=3)
    teacher = torch.tensor([TEACHER_PATCH, STUDENT_PATCH])
    teachers = [TEACHER_PATCH, STUDENT_PATCH]
    students = [STUDENT_PATCH, TEACHER_PATCH]

    def hand(centre):
        return statistics.mean(hand_patch_loss(students[v], teachers[v], removed[v], centre, 0.07) for v in range(2))

    fresh = loss(student, teacher, torch.tensor(removed, dtype=torch.bool), teacher_temp=0.07)
    assert fresh.item() == pytest.approx(hand([0, 0, 0]), rel=1e-5)
    patch_means = [[statistics.mean(p[k] for p in sample) for k in range(3)] for t in teachers for sample in t]
    centre = [0.1 * statistics.mean(row[k] for row in patch_means) for k in range(3)]
    torch.testing.assert_close(loss.centre.value, torch.tensor([[centre]]))
    updated = loss(student, teacher, torch.tensor(removed, dtype=torch.bool), teacher_temp=0.07)
    assert updated.item() == pytest.approx(hand(centre), rel=1e-5)


def test_patch_teacher_temperature_schedule_with_a_longer_warmup():
    _, method = make_method(patch_temp_warmup_epochs=3)
    assert [method.patch_teacher_temp(e) for e in (0.0, 1.5, 2.9, 3.0)] == pytest.approx([0.04, 0.055, 0.07, 0.07])


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_loss_is_one_mean_over_removed_patches_of_the_batch(norm_pix):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 4, 4, generator=g)
    pred = torch.randn(2, 4, 12, generator=g)
    removed = [[True, False, True, True], [False, True, False, False]]  # 3 and 1 removed
    total, count = 0.0, 0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                if not removed[b][i * 2 + j]:
                    continue
                target = [float(images[b, c, 2 * i + p, 2 * j + q])
                          for p in range(2) for q in range(2) for c in range(3)]
                if norm_pix:
                    mean, var = statistics.mean(target), statistics.variance(target)
                    target = [(t - mean) / math.sqrt(var + 1e-6) for t in target]
                total += statistics.mean((float(x) - t) ** 2 for x, t in zip(pred[b, i * 2 + j], target))
                count += 1
    value = reconstruction_loss(pred, images, torch.tensor(removed), (2, 2), norm_pix=norm_pix)
    assert value.item() == pytest.approx(total / count, rel=1e-5)


def test_ema_update_follows_the_cosine_momentum_of_the_next_step():
    model, method = make_method()
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    with torch.no_grad():
        for p in [*method.ibot_head.parameters(), *model.clip.visual.transformer.parameters()]:
            p.add_(1.0)
    assert cosine_momentum(2, 4) == pytest.approx(0.998)  # 1 - 0.004 * (1 + cos(pi / 2)) / 2
    method.after_step(model, Progress(step=1, total_steps=4, epoch=0.0))
    students = method.students(model)
    for name, value in method.teacher.state_dict().items():
        part, key = name.split(".", 2)[1:]
        student = students[part].state_dict()[key]
        torch.testing.assert_close(value, 0.998 * teacher_before[name] + 0.002 * student, msg=name)
    head_key = "copies.head.mlp.0.weight"
    assert not torch.equal(method.teacher.state_dict()[head_key], teacher_before[head_key])
    method.after_step(model, Progress(step=3, total_steps=4, epoch=0.0))  # momentum 1 at the end: no change
    torch.testing.assert_close(method.teacher.state_dict()[head_key],
                               0.998 * teacher_before[head_key] + 0.002 * students["head"].state_dict()["mlp.0.weight"])


# ----- the method ------------------------------------------------------------------------------------------
def test_forward_terms_equal_the_terms_computed_from_their_parts():
    """Encoder CLS for CLIP and L_CLS, decoder tokens for L_Patch and pixels, per-view masks from the teacher."""
    model, method = make_method(clip_weight=2.0, rec_weight=0.5)
    batch = two_view_batch()
    out = method(model, batch, Progress(0, 10, 1.0))
    views = batch["image"].transpose(0, 1).flatten(0, 1)
    _, removed = method.removal_maps(model, views)
    removed = removed.flatten(1)
    assert removed.shape == (6, 16) and ((~removed).sum(1) == 12).all()  # 3 of 4 blocks kept
    student = model.forward_tower(views, keep=kept_indices(removed, 12), tokens=True)
    decoded, pixels = method.decoder(student.tokens, student.restore, (4, 4))
    teacher_tokens = model.with_visual(method.teacher["visual"]).forward_tower(views, tokens=True).tokens
    teacher = method.teacher["head"](teacher_tokens)
    s_cls, s_patch = method.ibot_head(student.tokens[:, 0]), method.ibot_head(decoded[:, 1:])
    zero = torch.zeros(1)  # fresh centres
    cls_targets = teacher_probabilities(teacher[:, 0].view(2, 3, -1), zero, 0.04)
    cls = cls_distillation_loss(s_cls.view(2, 3, -1), cls_targets, 0.1)
    targets = teacher_probabilities(teacher[:, 1:], zero, 0.07)
    patch = (patch_distillation_loss(s_patch[:3], targets[:3], removed[:3], 0.1)
             + patch_distillation_loss(s_patch[3:], targets[3:], removed[3:], 0.1)) / 2
    rec = (reconstruction_loss(pixels[:3], views[:3], removed[:3], (8, 8))
           + reconstruction_loss(pixels[3:], views[3:], removed[3:], (8, 8))) / 2
    image = F.normalize(student.image_embed, dim=-1)
    text = model.encode_text(batch["text"], normalize=True)
    scale = model.logit_scale.exp()
    labels = torch.arange(3)

    def clip_term(img):
        logits = scale * img @ text.T
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    clip = (clip_term(image[:3]) + clip_term(image[3:])) / 2
    for key, expected in {"cls_loss": cls, "patch_loss": patch, "rec_loss": 0.5 * rec, "clip_loss": 2 * clip}.items():
        torch.testing.assert_close(out[key], expected, msg=key)
    assert out["teacher_temp_patch"].item() == pytest.approx(0.07)
    assert out["removed_fraction"].item() == pytest.approx(0.25)


def test_defaults_heads_rules_and_centres_in_the_state_dict():
    model, method = make_method()
    o = DetailCLIP.Options()
    assert (o.keep_ratio, o.ema_momentum, o.teacher_temp_cls, o.teacher_temp_patch, o.student_temp,
            o.centre_momentum, o.out_dim, o.hidden_dim, o.bottleneck_dim) == (0.5, 0.996, 0.04, 0.07, 0.1, 0.9,
                                                                              8192, 2048, 256)
    assert method.decoder.blocks[0].attn.num_heads == 16 and len(method.decoder.blocks) == 1
    assert method.sample_spec().views == 2 and method.sample_spec().augment == "detailclip"
    assert [r.prefix for r in method.param_rules()] == ["model.clip.visual.conv1"]
    assert make_method(freeze_patch_embed=False)[1].param_rules() == []
    state = method.state_dict()
    assert state["cls_loss.centre.value"].shape == (1, 16) and state["patch_loss.centre.value"].shape == (1, 1, 16)
    assert "teacher.copies.visual.conv1.weight" in state and "teacher.copies.head.last_layer.weight" in state
    # weight decay as released: the mask token and prototypes decayed; norms and biases not; open_clip's
    # 1-D class embedding is not decayed (documented difference)
    exempt = no_decay_names(TrainModule(model, method))
    assert {"method.decoder.mask_token", "method.ibot_head.last_layer.weight", "method.decoder.embed.weight",
            "model.clip.visual.positional_embedding"}.isdisjoint(exempt)
    assert {"method.decoder.norm.weight", "method.ibot_head.mlp.0.bias",
            "model.clip.visual.class_embedding"} <= exempt


@pytest.mark.parametrize("override,key", [("method.keep_ratio=1.0", "method.keep_ratio"),
                                          ("method.student_temp=0", "method.student_temp"),
                                          ("method.rec_weight=-1", "method.rec_weight")])
def test_bad_options_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        complete_method_options(load_config(None, ["method.name=detailclip", override]))
    with pytest.raises(ConfigError, match="method.decoder_heads"):
        make_method(decoder_heads=3)


def test_teacher_model_for_evaluation_with_and_without_an_ema_text_tower():
    model, method = make_method()
    teacher = method.extra_eval_models(model)["teacher"]
    assert teacher.clip.visual is method.teacher["visual"] and model.clip.visual is not teacher.clip.visual
    assert teacher.clip.transformer is model.clip.transformer
    model, method = make_method(ema_text_tower=True)
    teacher = method.teacher_model(model)
    assert teacher.clip.transformer is not model.clip.transformer and teacher.clip.visual is method.teacher["visual"]
    text = torch.randint(1, 49000, (2, 16))
    torch.testing.assert_close(teacher.encode_text(text), model.encode_text(text))  # a copy at the start
    with torch.no_grad():
        model.clip.text_projection.add_(1.0)
    method.after_step(model, Progress(0, 2, 0.0))  # momentum cos(pi/2): 0.998
    m = cosine_momentum(1, 2)
    expected = m * (model.clip.text_projection - 1.0) + (1 - m) * model.clip.text_projection
    torch.testing.assert_close(method.teacher_model(model).clip.text_projection, expected)
    assert method.teacher_model(model).encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 32)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_step_gives_finite_loss_and_gradients_everywhere(tiny_config, precision):
    trainer = Trainer(tiny_config("method.name=detailclip", *SMALL_OVERRIDES, f"train.precision={precision}"))
    values = trainer.accumulate_gradients(iter([two_view_batch(4)]), Progress(0, 6, 0.0))
    assert math.isfinite(values["loss"].item()) and values["loss"].item() > 0
    params = dict(trainer.module.named_parameters())
    for name in ("method.decoder.mask_token", "method.decoder.blocks.0.attn.in_proj_weight",
                 "method.decoder.pixel_head.weight", "method.ibot_head.mlp.0.weight",
                 "method.ibot_head.last_layer.weight", "model.clip.visual.transformer.resblocks.0.attn.in_proj_weight",
                 "model.clip.visual.proj", "model.clip.text_projection", "model.clip.logit_scale"):
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    frozen = params["model.clip.visual.conv1.weight"]
    assert not frozen.requires_grad and frozen.grad is None
    assert all(p.grad is None for n, p in params.items() if n.startswith("method.teacher."))


def test_resume_is_exact_and_evaluation_reports_student_and_teacher(tiny_data, tiny_config,
                                                                   train_killed_after_checkpoint):
    def losses(result):
        return {r["step"]: r["loss"] for r in map(json.loads, (result.output_dir / "metrics.jsonl").open())
                if "loss" in r}

    options = ["method.name=detailclip", *SMALL_OVERRIDES, f"data.val.path={tiny_data / 'val.jsonl'}",
               "train.eval_tasks=[retrieval]"]
    full = train(tiny_config(*options, output="full"), progress_bar=False)
    assert {"retrieval/text_retrieval_recall@1", "teacher/retrieval/text_retrieval_recall@1"} <= set(full.eval_metrics)
    reference = losses(full)
    cfg = tiny_config(*options, output="killed")
    train_killed_after_checkpoint(cfg, 3)  # the process dies right after its step-3 checkpoint
    after = losses(train(cfg, resume="latest", progress_bar=False))
    assert [after[s] for s in (4, 5, 6)] == [reference[s] for s in (4, 5, 6)]


def test_short_demo_run_lowers_the_loss(tmp_path):
    cfg = load_config(None, ["model.name=finegrain-test", "method.name=detailclip", *SMALL_OVERRIDES,
                             "data.train.path=demo:train", "data.batch_size=16", "data.num_workers=0", "optim.lr=1e-3",
                             "optim.warmup_steps=5", "train.steps=40", "train.save_every=100",
                             f"train.output_dir={tmp_path / 'run'}"])
    result = train(cfg, progress_bar=False)
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert len(rows) == 40

    def mean(key, part):
        return statistics.mean(r[key] for r in part)

    assert mean("loss", rows[-5:]) < mean("loss", rows[:5]) - 0.2
    assert mean("rec_loss", rows[-5:]) < mean("rec_loss", rows[:5]) - 0.2


def test_token_removal_picture(tmp_path):
    import matplotlib.image

    model, method = make_method(model_name="finegrain-tiny")
    images = (torch.rand(2, 3, 64, 64) * 255).to(torch.uint8)
    attention, removed = method.removal_maps(model, images.float() / 255)
    assert attention.shape == removed.shape == (2, 8, 8) and (removed.sum((1, 2)) == 28).all()
    path = plot_token_removal(images, attention, removed, tmp_path / "removal.png")
    assert matplotlib.image.imread(path).shape[:2] == (600, 900)
    with pytest.raises(ValueError, match="uint8"):
        plot_token_removal(images.float(), attention, removed, tmp_path / "bad.png")
