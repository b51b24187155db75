"""Semantic segmentation fine-tuning (finetune-seg): head shapes, slide inference, the metric, training, resume,
DDP, bad label maps and the layer-decay groups."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from finegrain.config import load_config
from finegrain.eval.prompts import load_class_names
from finegrain.eval.segmentation import ConfusionMatrix
from finegrain.models import create_model
from finegrain.objectives import Progress, create_method, method_options
from finegrain.train.trainer import Trainer, train

SEG = ("model.name=finegrain-tiny", "method.name=finetune-seg", "method.num_classes=28", "method.class_names=null",
       "method.reduce_zero_label=false", "method.scale=[128,64]", "method.crop=[64,64]", "method.channels=32",
       "method.aux_channels=16", "method.test_scale=[128,64]", "method.test_window=[64,64]",
       "method.test_stride=[43,43]", "data.batch_size=4", "optim.schedule=poly", "optim.warmup_ratio=1e-6",
       "optim.weight_decay=0.05")


def read_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_lines(run_dir) if "loss" in r}


def seg_task(*overrides: str, model: str = "finegrain-tiny"):
    from finegrain.config import load_config

    torch.manual_seed(0)
    cfg = load_config(None, [*SEG, f"model.name={model}", *overrides])
    clip = create_model(model)
    return create_method("finetune-seg", cfg.method.options, clip), clip


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_upernet_logits_at_the_finest_pyramid_level_and_auxiliary_at_its_level(size):
    task, _ = seg_task()
    task.eval()
    assert task.backbone.strides == [2, 4, 8, 16]  # patch 8: x4, x2, x1, x1/2
    main, auxiliary = task.logits(torch.randn(2, 3, *size))
    height, width = size
    assert main.shape == (2, 28, height // 2, width // 2)
    assert auxiliary.shape == (2, 28, height // 8, width // 8)  # aux_level 2: the patch stride
    task.head.auxiliary = None
    assert task.logits(torch.randn(1, 3, *size))[1] is None


def test_sliding_windows_equal_whole_image_inference_when_one_window_covers_the_image():
    task, _ = seg_task()
    task.eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    slide = dataclasses.replace(task.slide_inference(4), short_side=None, window=(64, 80), stride=(43, 43))
    whole = dataclasses.replace(slide, window=None)
    pixels = slide.pixels(image, "cpu")
    with torch.no_grad():
        windowed = slide.logits(lambda x: task.logits(x)[0], pixels)
        reference = whole.logits(lambda x: task.logits(x)[0], pixels)
    torch.testing.assert_close(windowed, reference)
    assert windowed.shape == (28, 48, 64)


def test_miou_macc_aacc_against_a_hand_computed_confusion():
    confusion = ConfusionMatrix(3, ignore_index=255)
    label = torch.tensor([[0, 0, 1], [1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1], [1, 1, 0]])
    confusion.update(prediction, label)
    # rows = label: class 0 -> [1, 1, 0], class 1 -> [0, 2, 0], class 2 -> [0, 1, 0]; the ignored pixel left out
    assert confusion.counts.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    # IoU: 1 / (2 + 1 - 1), 2 / (2 + 4 - 2), 0 / (1 + 0 - 0); accuracy: 1/2, 2/2, 0/1; overall 3 of 5
    metrics = confusion.metrics()
    assert metrics["miou"] == pytest.approx((50 + 50 + 0) / 3)
    assert metrics["macc"] == pytest.approx((50 + 100 + 0) / 3)
    assert metrics["aacc"] == pytest.approx(60)


def test_a_few_steps_on_demo_data_lower_the_loss(tiny_config):
    result = train(tiny_config(*SEG, "train.steps=12", "optim.lr=5e-3", "optim.schedule=constant",
                               "optim.warmup_steps=0", "train.save_every=12"), progress_bar=False)
    losses = [r["seg_loss"] for r in read_lines(result.output_dir) if "seg_loss" in r]
    assert len(losses) == 12 and all("aux_loss" in r for r in read_lines(result.output_dir) if "loss" in r)
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3])  # 3.26 -> 2.71 (seeded)


def test_resume_gives_the_same_next_losses(tiny_config, train_killed_after_checkpoint):
    """Dropout and drop path draw from torch's generator, which the checkpoint restores; starting the data loader
    on resume used to draw from it too (a worker seed), so the resumed run's step 3 differed."""
    options = (*SEG, "train.steps=4", "train.save_every=2", "optim.warmup_steps=1")
    reference = losses_by_step(train(tiny_config(*options, output="full"), progress_bar=False).output_dir)
    cfg = tiny_config(*options, output="killed")
    train_killed_after_checkpoint(cfg, 2)
    after = losses_by_step(train(cfg, resume="latest", progress_bar=False).output_dir)
    assert sorted(after) == [1, 2, 3, 4]
    assert after[3] == reference[3] and after[4] == reference[4]


def test_bad_label_maps_are_skipped_and_counted_in_training_and_evaluation(tiny_data, tiny_records, tmp_path):
    """A label map of another size than its image, and one with a value beyond the 28 classes, in every
    fourth record each: training skips them (bad_records.jsonl names the field), evaluation skips and counts."""
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(small)
    beyond = tmp_path / "beyond.png"
    Image.fromarray(np.full((64, 64), 200, dtype=np.uint8)).save(beyond)
    counter = iter(range(10**6))

    def edit(record):
        i = next(counter)
        label = {0: small, 1: beyond}.get(i % 4, tiny_data / record["label_map"])
        return {**record, "label_map": str(label)}

    train_path = tiny_records("train", edit, "train.jsonl")
    counter = iter(range(10**6))
    val_path = tiny_records("val", edit, "val.jsonl")
    from finegrain.config import load_config

    cfg = load_config(None, [*SEG, f"data.train.path={train_path}", f"data.val.path={val_path}",
                             "data.num_workers=0", "data.max_bad_fraction=0.9", "train.steps=3",
                             "train.save_every=3", "train.eval_tasks=[segmentation]",
                             f"train.output_dir={tmp_path / 'run'}"])
    result = train(cfg, progress_bar=False)
    assert result.last_losses["data/bad_records"] >= 2
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "run" / "bad_records.jsonl").read_text().splitlines()]
    assert any("small.png: field 'label_map' is 32x32 (WxH) but its image is 64x64" in r for r in reasons)
    assert any("beyond.png: field 'label_map' has value 200" in r for r in reasons)
    assert result.eval_metrics["segmentation/skipped_images"] == 12
    assert result.eval_metrics["segmentation/num_images"] == 12


@pytest.mark.parametrize("final_norm", [False, True])
def test_layer_decay_groups_by_parameter_name(tiny_config, final_norm):
    """finegrain-tiny has 4 blocks: block i trains at 0.65 ** (4 - i), the embeddings at 0.65 ** 5, the pyramid
    and the heads at 1; norms, biases and the (1-D) class embedding without weight decay, the position
    embedding decayed (iBOT's release); the text tower and what follows the last block frozen, but with
    ``final_norm`` the final LayerNorm, which then trains at the heads' rate (iBOT's out_with_norm)."""
    trainer = Trainer(tiny_config(*SEG, "optim.lr=1e-3", f"method.backbone.final_norm={str(final_norm).lower()}"))
    groups = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    params = dict(trainer.module.named_parameters())
    table = {  # name: (lr scale, weight decay)
        "model.clip.visual.conv1.weight": (0.65 ** 5, 0.05),
        "model.clip.visual.class_embedding": (0.65 ** 5, 0.0),
        "model.clip.visual.positional_embedding": (0.65 ** 5, 0.05),
        "model.clip.visual.ln_pre.weight": (0.65 ** 5, 0.0),
        "model.clip.visual.transformer.resblocks.0.attn.in_proj_weight": (0.65 ** 4, 0.05),
        "model.clip.visual.transformer.resblocks.0.attn.in_proj_bias": (0.65 ** 4, 0.0),
        "model.clip.visual.transformer.resblocks.2.mlp.c_fc.weight": (0.65 ** 2, 0.05),
        "model.clip.visual.transformer.resblocks.3.ln_2.weight": (0.65, 0.0),
        "method.backbone.pyramid.up4.0.weight": (1.0, 0.05),
        "method.backbone.pyramid.up4.1.weight": (1.0, 0.0),
        "method.head.decode.psp_modules.0.1.conv.weight": (1.0, 0.05),
        "method.head.decode.classifier.1.weight": (1.0, 0.05),
        "method.head.decode.classifier.1.bias": (1.0, 0.0),
        "method.head.auxiliary.convs.0.conv.weight": (1.0, 0.05),
    }
    frozen = ["model.clip.visual.proj", "model.clip.token_embedding.weight", "model.clip.logit_scale"]
    if final_norm:
        table.update({"model.clip.visual.ln_post.weight": (1.0, 0.0), "model.clip.visual.ln_post.bias": (1.0, 0.0)})
    else:
        frozen.append("model.clip.visual.ln_post.weight")
    for name, (scale, decay) in table.items():
        group = groups[id(params[name])]
        assert (group["lr_scale"], group["weight_decay"]) == (pytest.approx(scale), decay), name
    for name in frozen:
        assert not params[name].requires_grad and id(params[name]) not in groups, name


GLOBAL_BATCH = 8
LINEAR = ("model.name=finegrain-test", "method.head=linear", "method.linear_batch_norm=false",
          "method.backbone.drop_path_rate=0", "method.crop=[32,32]", "method.scale=[64,32]",
          "method.test_window=[32,32]", "method.test_stride=[21,21]")


def seg_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g),
            "label": torch.randint(0, 28, (GLOBAL_BATCH, 32, 32), generator=g),
            "image_size": torch.tensor([[32, 32]] * GLOBAL_BATCH)}


def _ddp_worker(rank, world_size, init_file, out_file, cfg):
    import os

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)  # different initial heads: DDP must broadcast rank 0's
        trainer = Trainer(cfg)
        per_rank = GLOBAL_BATCH // world_size
        batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in seg_batch().items()}
        trainer.accumulate_gradients(iter([batch]), Progress(0, 1, 0.0))
        torch.save({n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None},
                   f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_gradients(tiny_config, tmp_path):
    """2 gloo ranks x 4 crops = one process on 8 (the loss is divided by each rank's pixels, all alike);
    the backbone trains (layer decay) under the linear head without BatchNorm, whose batch statistics are per
    device (see docs/finetune.md)."""
    cfg = tiny_config(*SEG, *LINEAR, output="ddp")
    out = tmp_path / "grads"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), cfg), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.manual_seed(0)
    single = Trainer(tiny_config(*SEG, *LINEAR, output="single"))
    single.accumulate_gradients(iter([seg_batch()]), Progress(0, 1, 0.0))
    reference = {n: p.grad for n, p in single.module.named_parameters() if p.grad is not None}
    assert set(ranks[0]) == set(reference)
    assert "method.head.classifier.weight" in reference
    assert "model.clip.visual.transformer.resblocks.0.attn.in_proj_weight" in reference
    for name, grad in reference.items():
        for rank in ranks:
            torch.testing.assert_close(rank[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_segmentation_recipes_fill_the_data_root_and_carry_the_readme_commands_values():
    """iBOT's README commands override the config files: lr 8e-5 (UperNet) / 8e-4 (linear), out_with_norm."""
    from finegrain.config import load_config

    cfg = load_config("seg-upernet-ade20k-vitb16", data_root="/data/ade")
    assert (cfg.data.train.path, cfg.data.val.path) == ("ade20k-150:/data/ade@training", "ade20k-150:/data/ade@validation")
    opts = method_options(cfg.method.name, cfg.method.options)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay, cfg.optim.schedule, cfg.optim.warmup_steps,
            cfg.optim.warmup_ratio, cfg.train.steps, cfg.data.batch_size) == (
        8e-5, (0.9, 0.999), 0.05, "poly", 1500, 1e-6, 160_000, 16)
    assert (opts.backbone.layer_decay, opts.backbone.drop_path_rate, opts.backbone.final_norm, opts.norm, opts.crop,
            opts.ratio_range, opts.cat_max_ratio, opts.channels, opts.aux_weight, opts.test_window,
            opts.test_stride) == (0.65, 0.1, True, "sync_batch", (512, 512), (0.5, 2.0), 0.75, 768, 0.4, (512, 512),
                                  (341, 341))
    linear = load_config("seg-linear-ade20k-vitb16", data_root="/data/ade")
    assert (linear.optim.lr, linear.optim.decay_all) == (8e-4, True)
    linear = method_options(linear.method.name, linear.method.options)
    assert linear.head == "linear" and linear.backbone.frozen and linear.backbone.final_norm
    assert not linear.linear_batch_norm
    large = load_config("seg-upernet-ade20k-vitl14", data_root="/data/ade")
    large_opts = method_options(large.method.name, large.method.options)
    assert (large.optim.lr, large_opts.backbone.layer_decay, large_opts.channels) == (2e-5, 0.95, 1024)


def test_viz_draws_a_finetuned_segmenters_predictions_next_to_the_ground_truth(tiny_config, tiny_data, tmp_path,
                                                                                capsys):
    from finegrain.cli import main

    result = train(tiny_config(*SEG, "train.steps=1", "train.save_every=1"), progress_bar=False)
    out = tmp_path / "pictures"
    assert main(["viz", "segmentation", "--checkpoint", str(result.output_dir / "step_00000001.pt"), "--data",
                 str(tiny_data / "val.jsonl"), "--max-images", "2", "--out-dir", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and all(name.endswith(".png") for name in written)
    assert Image.open(out / written[0]).size[0] > 64  # image | prediction | ground truth, with a legend
    assert capsys.readouterr().out.count("wrote ") == 2


def test_the_demo_recipe_names_the_demo_classes_in_label_order():
    from finegrain.data.demo import SEGMENTATION_CLASSES

    options = load_config("demo-finetune-seg").method.options
    assert load_class_names(options["class_names"]) == SEGMENTATION_CLASSES
