"""The releases' protocol details the fine-tuning recipes rely on: normed block maps (iBOT's out_with_norm), the RPN's
proposals per image and low-quality matches, anchors at the configured strides, CLIM's 80 + 1 class set, mmseg's
photometric distortion, crop and loss, SETR's multi-scale resize, mmdet's initialisation and empty-image filter,
whole-model weight decay, the learning-rate auto-scaling, the input normalisation override, one-image evaluation."""

import colorsys
import json
import math

import pytest
import torch
from PIL import Image
from test_backbone import vit
from test_finetune_detection import demo_task, det_config
from test_finetune_segmentation import seg_task
from test_ovd import BASE, NOVEL, task
from test_timm_tower import eva02_tiny, vit_tiny
from torch import nn
from torchvision.models.detection.image_list import ImageList

from finegrain.config import ConfigError, load_config
from finegrain.data.dense import DenseSample, hsv_to_rgb, photometric_distortion, random_crop, rgb_to_hsv
from finegrain.data.readers import read_records
from finegrain.eval.prompts import load_class_names
from finegrain.eval.segmentation import SlideInference
from finegrain.finetune.detection import predict_records
from finegrain.finetune.fvit import BoxHead, LowQualityFloorMatcher, StrideAnchorGenerator
from finegrain.finetune.segmentation import pixel_cross_entropy
from finegrain.models.backbone import ViTBackbone, default_block_indices
from finegrain.models.factory import model_from_checkpoint
from finegrain.objectives import EvalContext, Progress
from finegrain.sample_spec import DenseTargets
from finegrain.train.optim import create_optimizer
from finegrain.train.trainer import Trainer, lr_factor, train


# ----- iBOT's out_with_norm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [vit, eva02_tiny, vit_tiny], ids=["open_clip-vit", "timm-eva02", "timm-vit"])
def test_final_norm_maps_are_the_towers_final_norm_of_each_block_map_and_it_trains(tmp_path, build):
    model = build(tmp_path).eval()
    tower = model.tower
    blocks = default_block_indices(tower.num_layers)
    backbone = ViTBackbone(model, blocks, pyramid=False, final_norm=True).eval()
    norm = model.visual.get_submodule(tower.post_prefixes[0])  # ln_post / trunk.norm
    size = 4 * model.patch_size[0]
    images = torch.randn(2, 3, size, 2 * size)
    with torch.no_grad():
        raw = tower.forward_intermediates(images, blocks)
        expected = [norm(m.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(m.shape) for m in raw]
        for ours, ref in zip(backbone.block_maps(images), expected):
            torch.testing.assert_close(ours, ref)
    assert tower.post_prefixes[0] not in backbone.post_prefixes  # not frozen
    sum(m.sum() for m in backbone.block_maps(images)).backward()
    assert all(p.requires_grad and p.grad is not None for p in norm.parameters())


# ----- iBOT's detection RPN and anchors -----------------------------------------------------------------------
def test_the_rpn_keeps_rpn_post_nms_train_proposals_per_image_in_training_and_the_test_number_at_test():
    torch.manual_seed(0)
    _, method = demo_task(rpn_pre_nms_train=100, rpn_post_nms_train=37, rpn_post_nms_test=11)
    images = torch.randn(2, 3, 64, 64)
    image_list = ImageList(images, [(64, 64), (64, 64)])
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    method.train()
    proposals, _ = method.rpn(image_list, method.feature_maps(images), targets)
    assert [len(p) for p in proposals] == [37, 37]
    method.eval()
    with torch.no_grad():
        proposals, _ = method.rpn(image_list, method.feature_maps(images))
    assert [len(p) for p in proposals] == [11, 11]
    recipe = load_config("det-maskrcnn-coco-vitb16", data_root="/data")
    assert recipe.method.options["rpn_post_nms_train"] == 2000


def test_low_quality_matches_need_min_pos_iou_and_go_to_the_ground_truth_they_are_best_for():
    """mmdet's MaxIoUAssigner(min_pos_iou=0.3): gt 0's best prediction (IoU 0.25) stays negative; prediction 2 is
    the best of gts 1 and 2 and goes to the later one, gt 2, though its own best is gt 1 (torchvision's rule)."""
    iou = torch.tensor([[0.25, 0.10, 0.00],
                        [0.20, 0.30, 0.45],
                        [0.05, 0.10, 0.40]])
    assert LowQualityFloorMatcher(0.7, 0.3, 0.3)(iou).tolist() == [-1, -2, 2]
    from torchvision.models.detection._utils import Matcher
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, -2, 1]


def test_anchors_sit_at_the_configured_strides_unrounded_on_a_canvas_that_is_an_odd_multiple_of_32():
    """An 800 x 1088 canvas: the max-pooled level has 13 rows, at stride 64 (torchvision's 800 // 13 = 61); a
    32-px anchor of ratio 0.5 is 45.25 x 22.63, as mmdet's (torchvision rounds to 46 x 22)."""
    generator = StrideAnchorGenerator([(32.0,), (512.0,)], [(0.5, 1.0, 2.0)] * 2, [4, 64])
    image_list = ImageList(torch.zeros(1, 3, 800, 1088), [(800, 1088)])
    anchors = generator(image_list, [torch.zeros(1, 1, 200, 272), torch.zeros(1, 1, 13, 17)])[0]
    coarse = anchors[-13 * 17 * 3:]
    centres_y = sorted({round(v, 3) for v in ((coarse[:, 1] + coarse[:, 3]) / 2).tolist()})
    assert centres_y == [64.0 * k for k in range(13)]
    first = anchors[0]
    assert (first[2] - first[0]).item() == pytest.approx(32 / math.sqrt(0.5), abs=1e-4)
    assert (first[3] - first[1]).item() == pytest.approx(32 * math.sqrt(0.5), abs=1e-4)


# ----- CLIM's class set ---------------------------------------------------------------------------------------
def test_clim_extra_classes_take_part_in_both_test_softmaxes_as_novel_ones_but_not_in_training(monkeypatch, tmp_path):
    model, method = task(extra_classes="ov-coco-extra")
    extra = load_class_names("ov-coco-extra")
    assert len(extra) == 15 and not set(extra) & set(BASE + NOVEL)
    method.ensure_class_embeddings(model)
    total = len(BASE) + len(NOVEL) + len(extra)
    assert method.head.embeddings(novel=True).shape[0] == total + 1
    assert method.base_mask.tolist() == [True] * len(BASE) + [False] * (len(NOVEL) + len(extra)) + [True]
    embed_dim = method.head.class_embeddings.shape[1]
    assert method.head.logits(torch.randn(5, embed_dim), method.head.embeddings(novel=False)).shape == (5, len(BASE) + 1)
    seen = {}
    detect = method.head.detect

    def spy(images, sizes, maps, clip_scores, vocabulary, base, *args):
        seen["clip"] = clip_scores([torch.tensor([[0.0, 0.0, 20.0, 20.0]])]).shape
        out = detect(images, sizes, maps, clip_scores, vocabulary, base, *args)
        seen["learned"] = method.head.logits(torch.randn(3, embed_dim), vocabulary).shape
        return out

    monkeypatch.setattr(method.head, "detect", spy)
    method.eval()
    Image.new("RGB", (64, 64), (120, 40, 40)).save(tmp_path / "a.png")
    method.detect(model, [tmp_path / "a.png"])
    assert seen == {"clip": (1, total + 1), "learned": (3, total + 1)}


def test_detections_of_extra_classes_are_left_out_of_the_scores(monkeypatch, tmp_path):
    """The same detections with an extra-class one added (taking a place among them) score the same AP50."""
    from finegrain.data.records import Record, Region

    model, method = task(extra_classes="ov-coco-extra")
    records = [Record("0.png", regions=(Region((0, 0, 20, 20), label=BASE[0]),
                                        Region((30, 30, 60, 60), label=NOVEL[0])), width=64, height=64)]
    rows = [((0, 0, 20, 20), 0.9, 0), ((30, 30, 60, 60), 0.8, len(BASE))]
    extra_row = [((30, 30, 60, 60), 0.95, len(BASE) + len(NOVEL) + 3)]

    def metrics(found):
        def detect(model, files, expected=None):
            return [(torch.tensor([r[0] for r in found], dtype=torch.float), torch.tensor([r[1] for r in found]),
                     torch.tensor([r[2] for r in found]))]
        monkeypatch.setattr(method, "detect", detect)
        return method.evaluate("ovd", model, EvalContext(records, tmp_path, "demo:val", torch.device("cpu"), 2))

    assert metrics(rows + extra_row) == metrics(rows)


def test_clim_head_has_a_class_fc_before_an_unactivated_projection():
    torch.manual_seed(0)
    head = BoxHead(8, 7, convs=1, fcs=2, fc_channels=64, embed_dim=16, class_relu=False, class_fcs=1)
    layers = list(head.cls)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear, nn.Identity]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (64, 64, 16)
    assert layers[2].weight.std().item() == pytest.approx(0.01, rel=0.2) and not layers[2].bias.any()
    assert head.reg[-1].weight.std().item() == pytest.approx(0.001, rel=0.2)
    fvit = BoxHead(8, 7, convs=1, fcs=2, fc_channels=16, embed_dim=16)
    assert [type(m) for m in fvit.cls] == [nn.Linear, nn.ReLU]


# ----- mmseg's training pipeline and loss --------------------------------------------------------------------
def test_hsv_is_opencvs_uint8_hsv_and_round_trips_within_rounding():
    torch.manual_seed(0)
    rgb = torch.randint(0, 256, (3, 6, 6)).float()
    hsv = rgb_to_hsv(rgb)
    for y, x in [(0, 0), (2, 3), (5, 5)]:
        h, s, v = colorsys.rgb_to_hsv(*(rgb[:, y, x] / 255).tolist())
        assert hsv[:, y, x].tolist() == [round(h * 180) % 180, round(s * 255), round(v * 255)]
    assert (hsv_to_rgb(hsv) - rgb).abs().max() <= 5  # hue held in 2-degree steps


def test_hue_shifts_in_two_degree_steps_up_to_36_degrees(monkeypatch):
    """Only the hue step drawn (the coin flips fixed): a saturated red comes out at an integer of OpenCV's 2-degree
    units in [-18, 18), up to 36 degrees (mmseg's ``randint(-18, 18)`` on uint8 HSV), not 18."""
    red = torch.zeros(3, 4, 4, dtype=torch.uint8)
    red[0] = 255
    real_rand = torch.rand
    shifts = set()
    for seed in range(100):
        coins = iter([0.9, 0.9, 0.9, 0.1, 0.9])  # brightness no, contrast last, saturation no, hue yes, contrast no
        monkeypatch.setattr(torch, "rand", lambda *a, coins=coins, **k: torch.tensor(next(coins)))
        torch.manual_seed(seed)
        out = photometric_distortion(red)
        monkeypatch.setattr(torch, "rand", real_rand)
        hue = int(rgb_to_hsv(out.float())[0, 0, 0])
        shifts.add(hue - 180 if hue >= 90 else hue)
    assert shifts <= set(range(-18, 18)) and max(abs(s) for s in shifts) > 9 and len(shifts) > 20


def test_a_crop_failing_cat_max_ratio_ten_times_is_the_eleventh_draw():
    image = torch.arange(100 * 100, dtype=torch.int64).reshape(1, 100, 100).expand(3, -1, -1)
    sample = DenseSample(image, torch.zeros(100, 100, dtype=torch.long), torch.zeros(0, 4),
                         torch.zeros(0, dtype=torch.long), None)
    dense = DenseTargets("segmentation", 2, crop=(50, 50), cat_max_ratio=0.75)
    torch.manual_seed(7)
    crop = random_crop(sample, dense)
    torch.manual_seed(7)
    draws = [(int(torch.randint(51, ())), int(torch.randint(51, ()))) for _ in range(11)]
    top, left = draws[10]
    assert int(crop.image[0, 0, 0]) == top * 100 + left


def test_the_pixel_loss_divides_by_all_pixels_ignored_ones_included():
    logits = torch.zeros(1, 4, 2, 2)  # uniform over 4 classes: cross entropy log 4 per labelled pixel
    label = torch.tensor([[[0, 1], [2, 255]]])
    assert pixel_cross_entropy(logits, label, 255).item() == pytest.approx(3 * math.log(4) / 4)


def test_padded_pixels_are_zero_after_normalisation_whatever_the_loader_put_there():
    method, model = seg_task()
    method.eval(), model.eval()
    image = torch.randn(2, 3, 64, 64)
    other = image.clone()
    other[..., 40:, :] = 5.0  # the padding rows of images 40 pixels high
    batch = {"label": torch.randint(0, 28, (2, 64, 64)), "image_size": torch.tensor([[40, 64], [40, 64]])}
    with torch.no_grad():
        first = method(model, {**batch, "image": image}, Progress(0, 1, 0.0))
        second = method(model, {**batch, "image": other}, Progress(0, 1, 0.0))
    assert first["seg_loss"].item() == pytest.approx(second["seg_loss"].item(), rel=1e-6)


def test_setr_resize_keeps_the_short_side_at_least_the_floor_and_has_no_long_limit():
    image = Image.new("RGB", (100, 20))  # 5:1
    mmseg = SlideInference((0, 0, 0), (1, 1, 1), (4, 4), short_side=16, window=None, stride=None, max_long_side=32)
    setr = SlideInference((0, 0, 0), (1, 1, 1), (4, 4), short_side=16, window=None, stride=None, max_long_side=32,
                          short_side_floor=16)
    assert tuple(mmseg.pixels(image, "cpu").shape[-2:]) == (6, 32)  # the long side capped at 32
    assert tuple(setr.pixels(image, "cpu").shape[-2:]) == (16, 80)
    assert tuple(setr.pixels(image, "cpu", ratio=0.5).shape[-2:]) == (16, 80)  # never below the floor
    assert tuple(setr.pixels(image, "cpu", ratio=1.5).shape[-2:]) == (24, 120)


# ----- mmdet's initialisation, empty images, one-image evaluation --------------------------------------------
def test_detection_heads_start_as_mmdets():
    torch.manual_seed(0)
    _, method = demo_task(box_head="4conv1fc", fc_channels=1024)
    predictor = method.roi_heads.box_predictor
    assert predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
    fc = next(m for m in method.roi_heads.box_head.modules() if isinstance(m, nn.Linear))
    assert fc.weight.abs().max().item() <= math.sqrt(6 / (fc.in_features + fc.out_features))  # Xavier-uniform
    biases = [predictor.cls_score.bias, predictor.bbox_pred.bias, fc.bias,
              *(m.bias for m in method.fpn.modules() if isinstance(m, nn.Conv2d))]
    assert not any(b.any() for b in biases)


def test_images_without_an_instance_of_the_classes_are_left_out_and_counted(tiny_data, tiny_records, tmp_path,
                                                                            capsys):
    kept = []

    def edit(record):
        if len(kept) % 2:
            record["regions"] = []
        kept.append(bool(record["regions"]))
        return record

    path = tiny_records("train", edit, "half.jsonl")
    trainer = Trainer(det_config(tiny_data, tmp_path, f"data.train.path={path}", "method.drop_empty=true"))
    assert len(trainer.loader.dataset) == sum(kept) < len(kept)
    assert f"{len(kept) - sum(kept)} of {len(kept)} records have no instance" in capsys.readouterr().out
    trainer.release_run_folder()
    empty = tiny_records("train", lambda r: {**r, "regions": []}, "none.jsonl")
    with pytest.raises(ValueError, match="none of its .* records has a region labelled with one of the task.s 24"):
        Trainer(det_config(tiny_data, tmp_path, f"data.train.path={empty}", "method.drop_empty=true",
                           output="none"))


def test_an_images_detections_do_not_depend_on_the_images_evaluated_with_it(tiny_data, tmp_path):
    torch.manual_seed(0)
    _, method = demo_task()
    method.eval()
    records = read_records(tiny_data / "val.jsonl")
    pp = {"mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28)}

    def detections(chosen):
        context = EvalContext(chosen, tiny_data, "demo:val", torch.device("cpu"), 2)
        with torch.no_grad():
            return predict_records(method, context, pp["mean"], pp["std"])[0]

    alone = detections([records[1]])[0]
    paired = detections([records[0], records[1]])[1]
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(alone[key], paired[key])


# ----- optimiser and normalisation options ------------------------------------------------------------------
def test_decay_all_decays_norms_biases_and_scalars_too():
    module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    module.register_parameter("temperature", nn.Parameter(torch.tensor(50.0)))
    cfg = load_config(None, ["optim.weight_decay=0.1", "optim.decay_all=true"]).optim
    assert {g["weight_decay"] for g in create_optimizer(module, cfg).param_groups} == {0.1}
    default = load_config(None, ["optim.weight_decay=0.1"]).optim
    assert {g["weight_decay"] for g in create_optimizer(module, default).param_groups} == {0.0, 0.1}


def test_lr_base_batch_scales_the_scheduled_lr_by_the_global_batch(tiny_config):
    cfg = tiny_config("optim.lr_base_batch=4", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-3")
    assert lr_factor(cfg, world_size=1) == 2.0 and lr_factor(cfg, world_size=8) == 16.0
    trainer = Trainer(cfg, progress_bar=False)
    trainer.train_step(iter(trainer.loader))
    assert all(g["lr"] / g["lr_scale"] == pytest.approx(2e-3) for g in trainer.optimizer.param_groups)


def test_image_mean_and_std_replace_the_models_and_stay_with_its_checkpoint(tiny_config):
    imagenet = ["model.image_mean=[0.485,0.456,0.406]", "model.image_std=[0.229,0.224,0.225]"]
    result = train(tiny_config(*imagenet, "train.steps=1", "train.save_every=1"), progress_bar=False)
    reloaded = model_from_checkpoint(result.output_dir / "step_00000001.pt")
    import open_clip
    pp = open_clip.get_model_preprocess_cfg(reloaded.clip)
    assert list(pp["mean"]) == [0.485, 0.456, 0.406] and list(pp["std"]) == [0.229, 0.224, 0.225]


def test_eval_precision_is_checked_like_precision():
    with pytest.raises(ConfigError, match="train.eval_precision must be fp32, bf16 or fp16"):
        load_config(None, ["train.eval_precision=fp64"])
    assert load_config(None, ["train.eval_precision=fp32"]).train.eval_precision == "fp32"
    assert json.loads(json.dumps(load_config("ovd-fvit-ovcoco-openai-b16", data_root="/d").train.eval_precision)) == "fp32"
