"""FineCLIP and CLIPSelf: each loss term by hand, the method against a direct computation, the switches,
the frozen text tower, CLIPSelf's grid regions, crops and ensembling, and short runs that learn."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from finegrain.models import create_model
from finegrain.models.roi import crop_boxes
from finegrain.objectives import MaskedContrastiveLoss, Progress, create_method
from finegrain.objectives.clipself import ensemble_visual, grid_choices, sample_grid_boxes
from finegrain.objectives.fineclip import scatter_rows
from finegrain.objectives.self_distill import self_distillation_loss
from finegrain.train.trainer import Trainer

PROGRESS = Progress(0, 1, 0.0)


def test_self_distillation_loss_by_hand_ignores_padding():
    student = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]], [[1.0, 1.0], [5.0, -5.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [6.0, 8.0], [-9.0, 1.0]], [[1.0, 0.0], [7.0, 7.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [True, False, False]])
    # cos: 0 (orthogonal), 1 (parallel), 1/sqrt(2); padding rows (incl. an all-zero one) never count
    expected = ((1 - 0) + (1 - 1) + (1 - 1 / math.sqrt(2))) / 3
    assert self_distillation_loss(student, teacher, valid).item() == pytest.approx(expected, rel=1e-6)
    assert self_distillation_loss(student[valid], teacher[valid]).item() == pytest.approx(expected, rel=1e-6)


def test_self_distillation_without_regions_is_zero_with_a_graph():
    student = torch.randn(2, 3, 4, requires_grad=True)
    loss = self_distillation_loss(student, torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_self_distillation_gradient_reaches_student_and_teacher():
    """FineCLIP's teacher is the trainable model itself: no stop-gradient."""
    student, teacher = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    self_distillation_loss(student, teacher).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0


def test_region_contrastive_by_hand_uses_only_regions_with_captions():
    """Symmetric InfoNCE over the valid regions only: padding and caption-less regions are neither
    positives nor negatives (the released single-GPU code would add all-zero rows as negatives)."""
    roi = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.0, 0.0]]])
    text = torch.tensor([[[1.0, 0.0], [0.8, 0.6]], [[0.0, 1.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, False], [True, False]])  # region (0,1) has no caption; (1,1) is padding
    s = 10.0
    a, b = roi[valid], text[valid]  # rows [1,0] & [0.6,0.8] vs texts [1,0] & [0,1]
    logits = s * a @ b.T  # [[10, 0], [6, 8]]
    ce_rows = [-math.log(math.exp(10) / (math.exp(10) + 1)), -math.log(math.exp(8) / (math.exp(6) + math.exp(8)))]
    logits_t = logits.T  # [[10, 6], [0, 8]]
    ce_cols = [-math.log(math.exp(10) / (math.exp(10) + math.exp(6))), -math.log(math.exp(8) / (1 + math.exp(8)))]
    expected = (sum(ce_rows) / 2 + sum(ce_cols) / 2) / 2
    assert torch.allclose(logits_t, s * b @ a.T)
    got = MaskedContrastiveLoss()(roi, text, torch.tensor(s), valid)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # equals open_clip's ClipLoss on the valid rows alone
    assert got.item() == pytest.approx(ClipLoss()(a, b, torch.tensor(s)).item(), rel=1e-6)


def test_scatter_rows_puts_rows_at_valid_slots_in_nonzero_order():
    valid = torch.tensor([[False, True, True], [True, False, False]])
    out = scatter_rows(torch.tensor([[1.0], [2.0], [3.0]]), valid)
    assert out.squeeze(-1).tolist() == [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]


def fineclip_batch(model, counts, captioned=None, max_regions=3, seed=0):
    """A batch of ``len(counts)`` images with ``counts[i]`` valid boxes each (crops for valid boxes only)."""
    g = torch.Generator().manual_seed(seed)
    b = len(counts)
    boxes = torch.zeros(b, max_regions, 4)
    valid = torch.zeros(b, max_regions, dtype=torch.bool)
    for i, k in enumerate(counts):
        for j in range(k):
            x0, y0 = torch.randint(0, 16, (2,), generator=g).tolist()
            boxes[i, j] = torch.tensor([x0, y0, x0 + 8 + 2 * j, y0 + 10.0])
            valid[i, j] = True
    region_text_valid = valid.clone() if captioned is None else captioned & valid
    return {"image": torch.randn(b, 3, 32, 32, generator=g),
            "text": torch.randint(1, 49000, (b, 16), generator=g),
            "boxes": boxes, "box_valid": valid,
            "region_text": torch.randint(1, 49000, (b, max_regions, 16), generator=g) * region_text_valid[..., None],
            "region_text_valid": region_text_valid,
            "crops": torch.randn(int(valid.sum()), 3, 32, 32, generator=g)}


@pytest.fixture(scope="module")
def test_model():
    torch.manual_seed(0)
    return create_model("finegrain-test")


@pytest.mark.parametrize("counts,captioned", [
    ((0, 0), None),  # no regions: only the global loss has rows
    ((1, 0), None),  # one region
    ((3, 3), None),  # all slots full
    ((2, 3), torch.tensor([[True, False, True], [False, False, True]])),  # regions without captions
])
def test_fineclip_terms_equal_a_direct_computation(test_model, counts, captioned):
    model = test_model
    method = create_method("fineclip", None, model)
    batch = fineclip_batch(model, counts, captioned)
    losses = method(model, batch, PROGRESS)
    scale = model.logit_scale.exp()
    with torch.no_grad():
        image = model.encode_image(batch["image"], normalize=True)
        text = model.encode_text(batch["text"], normalize=True)
        valid = batch["box_valid"]
        roi = model.encode_boxes(batch["image"], batch["boxes"], valid=valid)[valid]
        crop = model.encode_image(batch["crops"], normalize=True)
        region_valid = (valid & batch["region_text_valid"])
        region_roi = model.encode_boxes(batch["image"], batch["boxes"], valid=valid)[region_valid]
        region_text = model.encode_text(batch["region_text"][region_valid], normalize=True)
    assert losses["global_contrastive_loss"].item() == pytest.approx(ClipLoss()(image, text, scale).item(), rel=1e-5)
    expected_sd = (1 - (roi * crop).sum(-1)).mean().item() if len(roi) else 0.0
    assert losses["self_distill_loss"].item() == pytest.approx(expected_sd, rel=1e-5, abs=1e-7)
    expected_rc = ClipLoss()(region_roi, region_text, scale).item() if len(region_roi) else 0.0
    assert losses["region_contrastive_loss"].item() == pytest.approx(expected_rc, rel=1e-5, abs=1e-7)
    assert losses["regions_per_image"].item() == pytest.approx(sum(counts) / len(counts))
    total = sum(v for k, v in losses.items() if k.endswith("_loss"))
    total.backward()  # every term back-propagates, whatever the number of regions


def test_fineclip_text_tower_is_frozen_in_eval_mode_and_runs_without_graph():
    torch.manual_seed(0)
    model = create_model("finegrain-test")
    method = create_method("fineclip", None, model)
    model.train()
    visual = {id(p) for p in model.clip.visual.parameters()}
    for name, p in model.clip.named_parameters():
        assert p.requires_grad == (id(p) in visual or name == "logit_scale"), name
    assert not model.clip.transformer.training and model.clip.visual.training
    features = method.features(model, fineclip_batch(model, (2, 1)), PROGRESS)
    assert not features["text"].requires_grad and not features["region_text"].requires_grad
    assert features["roi"].requires_grad and features["crop"].requires_grad and features["image"].requires_grad


@pytest.mark.parametrize("terms,keys,regions,crops", [
    ("gc", {"global_contrastive_loss"}, False, False),
    ("gc,sd", {"global_contrastive_loss", "self_distill_loss"}, True, True),
    ("gc,rc", {"global_contrastive_loss", "region_contrastive_loss"}, True, False),
    ("sd", {"self_distill_loss"}, True, True),
])
def test_fineclip_term_switches_select_losses_and_sample_contents(test_model, terms, keys, regions, crops):
    """The paper's Table 1 ablation is a config change: each switch removes its term and what it needs."""
    on = terms.split(",")
    options = create_method("fineclip", None, create_model("finegrain-test")).Options(
        global_contrastive="gc" in on, self_distill="sd" in on, region_contrastive="rc" in on,
        self_distill_weight=2.0)
    model = create_model("finegrain-test")
    method = create_method("fineclip", options, model)
    spec = method.sample_spec()
    assert (spec.regions, spec.region_crops, spec.caption) == (regions, crops, "required" if "gc" in on else "none")
    batch = fineclip_batch(model, (2, 1))
    losses = method(model, batch, PROGRESS)
    assert {k for k in losses if k.endswith("_loss")} == keys
    if "sd" in on:  # the weight scales the term
        unweighted = create_method("fineclip", None, model)(model, batch, PROGRESS)["self_distill_loss"]
        assert losses["self_distill_loss"].item() == pytest.approx(2 * unweighted.item(), rel=1e-5)
    assert [r.prefix for r in method.param_rules()] == ([] if {"gc", "rc"} & set(on) else ["model.clip.logit_scale"])


def test_fineclip_needs_one_term():
    options = create_method("fineclip", None, create_model("finegrain-test")).Options(
        global_contrastive=False, self_distill=False, region_contrastive=False)
    with pytest.raises(ValueError, match="at least one"):
        create_method("fineclip", options, create_model("finegrain-test"))


def term_curves(run_dir):
    curves = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key.endswith("_loss") and "step" in record and "eval" not in line:
                curves.setdefault(key, []).append(value)
    return curves


@pytest.mark.parametrize("method", ["fineclip", "clipself"])
def test_short_run_on_demo_data_each_enabled_term_decreases(tiny_config, tmp_path, method):
    cfg = tiny_config(f"method.name={method}", "train.steps=40", "train.save_every=40", "optim.lr=2e-3",
                      "optim.warmup_steps=5", output=method)
    Trainer(cfg, progress_bar=False).fit()
    curves = term_curves(tmp_path / method)
    expected = {"fineclip": {"global_contrastive_loss", "self_distill_loss", "region_contrastive_loss"},
                "clipself": {"self_distill_loss"}}[method]
    assert set(curves) == expected
    for key, values in curves.items():
        first, last = sum(values[:8]) / 8, sum(values[-8:]) / 8
        assert last < 0.9 * first, f"{key}: {first:.3f} -> {last:.3f}"


# ----- CLIPSelf ---------------------------------------------------------------------------------------

def test_grid_choices_follow_clipself_rule():
    # rows m in 1..3, cols n in [ceil(m/2), min(2m, 3)]
    assert grid_choices(3) == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3)]


def test_grid_boxes_are_distinct_cells_of_one_grid_per_image():
    torch.manual_seed(0)
    boxes, valid = sample_grid_boxes(16, 30, 60, max_split=6, max_regions=5)
    for b in range(16):
        cells = boxes[b][valid[b]]
        assert 1 <= len(cells) <= 5 and valid[b, :len(cells)].all()
        widths, heights = cells[:, 2] - cells[:, 0], cells[:, 3] - cells[:, 1]
        cols, rows = round(60 / widths[0].item()), round(30 / heights[0].item())
        assert (rows, cols) in grid_choices(6) and len(cells) == min(5, rows * cols)
        assert torch.allclose(widths, widths[0]) and torch.allclose(heights, heights[0])
        assert len({tuple(c.tolist()) for c in cells}) == len(cells)  # no cell twice
        assert (cells[:, 0] >= 0).all() and (cells[:, 2] <= 60 + 1e-4).all() and (cells[:, 3] <= 30 + 1e-4).all()


def test_crop_boxes_keep_aspect_ratio_and_pad_right_and_bottom():
    image = torch.arange(8.0).repeat(8, 1).expand(1, 1, 8, 8)  # value = column index
    crop = crop_boxes(image, torch.tensor([[[0.0, 0.0, 8.0, 4.0]]]), (4, 4), fill=torch.tensor([-1.0]))
    assert crop.shape == (1, 1, 4, 4)
    torch.testing.assert_close(crop[0, 0, :2], torch.tensor([[0.5, 2.5, 4.5, 6.5]] * 2))  # 2x2 area means
    assert (crop[0, 0, 2:] == -1).all()  # the box is half as high as wide: bottom half is padding
    tall = crop_boxes(image, [torch.tensor([[2.0, 0.0, 4.0, 8.0]])], (4, 4))
    torch.testing.assert_close(tall[0, 0, :, :1], torch.full((4, 1), 2.5))  # columns 2-3 averaged
    assert (tall[0, 0, :, 1:] == 0).all()


def test_clipself_teacher_stays_frozen_only_blocks_train_and_export_ensembles(tiny_config):
    cfg = tiny_config("method.name=clipself", "method.ensemble_alpha=0.7", "train.steps=2")
    trainer = Trainer(cfg, progress_bar=False)
    teacher_before = {k: v.clone() for k, v in trainer.method.teacher.state_dict().items()}
    trainer.fit()
    visual = trainer.model.clip.visual
    for name, p in visual.named_parameters():
        assert p.requires_grad == name.startswith("transformer."), name
    for key, value in trainer.method.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert not trainer.model.clip.logit_scale.requires_grad
    exported = trainer.method.export_model(trainer.model).clip.visual.state_dict()
    student, teacher = visual.state_dict(), trainer.method.teacher["visual"].state_dict()
    for key in student:
        torch.testing.assert_close(exported[key], 0.7 * student[key] + 0.3 * teacher[key])
    assert not torch.equal(student["transformer.resblocks.0.attn.in_proj_weight"],
                           teacher["transformer.resblocks.0.attn.in_proj_weight"])


def test_clipself_grid_source_matches_a_direct_computation(test_model):
    model = test_model
    options = create_method("clipself", None, model).Options(region_source="grid", resize_mode="squash",
                                                              max_split=2, max_regions=3)
    method = create_method("clipself", options, model)
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    loss = method(model, {"image": images}, PROGRESS)["self_distill_loss"]
    torch.manual_seed(5)
    boxes, valid = sample_grid_boxes(2, 32, 32, 2, 3)
    with torch.no_grad():
        crops = crop_boxes(images, boxes, (32, 32), valid, fill=method.black)
        teacher = method.teacher["visual"](crops)
        student = model.encode_boxes(images, boxes, valid=valid)[valid]
    expected = (1 - (student * F.normalize(teacher, dim=-1)).sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_clipself_grid_needs_squash():
    model = create_model("finegrain-test")
    options = create_method("clipself", None, model).Options(region_source="grid")
    with pytest.raises(ValueError, match="resize_mode=squash"):
        create_method("clipself", options, model)


def test_ensemble_visual_interpolates_every_parameter():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    mixed = ensemble_visual(a, b, 0.25)
    torch.testing.assert_close(mixed.weight, 0.25 * a.weight + 0.75 * b.weight)
    torch.testing.assert_close(mixed.bias, 0.25 * a.bias + 0.75 * b.bias)


def test_fineclip_crops_at_image_borders_are_clipped_and_rois_are_the_original_boxes():
    """Crops: the box enlarged 1.5x about its centre, clipped to the image (never padded), squashed to the
    crop size; RoIs: the original box in the resized image's pixels."""
    from PIL import Image

    from finegrain.data.records import Record, Region
    from finegrain.data.sample import SampleBuilder
    from finegrain.models import get_tokenizer

    image = Image.new("RGB", (40, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # red top-left quarter
    record = Record("x.png", ("a caption",), (Region((0, 0, 10, 10), caption="corner"),  # enlarged to -2.5..12.5
                                              Region((30, 30, 40, 40), caption="opposite corner")), 40, 40)
    method = create_method("fineclip", None, create_model("finegrain-test"))
    sample = SampleBuilder(method.sample_spec(), (32, 32), get_tokenizer("finegrain-test"))(image, record, 0)
    crops = sample["crops"]
    assert crops.shape == (2, 3, 32, 32)
    assert (crops[0, 0] == 255).all() and (crops[0, 2] == 0).all()  # all red: clipped at 0, not padded
    assert (crops[1, 2] == 255).all() and (crops[1, 0] == 0).all()  # all blue: clipped at 40
    torch.testing.assert_close(sample["boxes"][:2], torch.tensor([[0.0, 0, 8, 8], [24.0, 24, 32, 32]]))
