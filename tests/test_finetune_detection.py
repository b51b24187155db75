"""Detection fine-tuning (finetune-det): targets, AP against pycocotools, training, resume, DDP, bad input."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from finegrain.config import load_config
from finegrain.data.collate import collate
from finegrain.data.dense import DenseSampleBuilder
from finegrain.data.images import load_image
from finegrain.data.readers import read_jsonl, read_records
from finegrain.finetune.detection import detection_targets
from finegrain.models import create_model
from finegrain.objectives import EvalContext, Progress, create_method, method_options
from finegrain.train.metrics_log import read_metrics
from finegrain.train.trainer import Trainer, train


def det_config(tiny_data, tmp_path, *overrides, output="run"):
    """The demo recipe on the tiny demo data, 4 images a step, no loader workers."""
    return load_config("demo-finetune-det", [
        f"data.train.path={tiny_data / 'train.jsonl'}", f"data.val.path={tiny_data / 'val.jsonl'}",
        "data.batch_size=4", "data.num_workers=0", "optim.warmup_steps=0", f"train.output_dir={tmp_path / output}",
        "train.steps=4", "train.save_every=2", "train.keep_last=5", "train.eval_tasks=[]", "train.best_metric=null",
        *overrides])


def demo_task(**options):
    model = create_model("finegrain-tiny")
    cfg = load_config("demo-finetune-det", [f"method.{k}={v}" for k, v in options.items()])
    return model, create_method("finetune-det", cfg.method.options, model)


def builder_batch(task, records, root, seeds):
    builder = DenseSampleBuilder(task.sample_spec()).for_root(root)
    return collate([builder(load_image(root / r.image), r, seed) for r, seed in zip(records, seeds)])


def test_targets_keep_the_valid_rows_only_and_shift_labels_past_the_background():
    batch = {"instance_valid": torch.tensor([[True, False, True], [False, False, False]]),
             "instance_boxes": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
             "instance_labels": torch.tensor([[0, 5, 2], [1, 1, 1]]),
             "instance_masks": torch.ones(2, 8, 8, dtype=torch.uint8)}  # the valid rows, concatenated
    first, second = detection_targets(batch, True, 6, 4)
    assert first["labels"].tolist() == [1, 3]
    assert first["boxes"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    assert first["masks"].shape == (2, 6, 4)
    assert second["boxes"].shape == (0, 4) and second["labels"].shape == (0,) and second["masks"].shape == (0, 6, 4)


def _coco_gt(tmp_path):
    """Two images (40x30, 50x20) on disk and a COCO json with non-contiguous category ids."""
    for name, size in (("a.png", (40, 30)), ("b.png", (50, 20))):
        Image.new("RGB", size, (120, 30, 200)).save(tmp_path / name)
    square = lambda x, y, s: [[x, y, x + s, y, x + s, y + s, x, y + s]]
    anns = [(1, 7, [2, 3, 10, 10]), (1, 3, [20, 5, 15, 20]), (2, 7, [5, 2, 12, 12]), (2, 7, [30, 4, 14, 14])]
    gt = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                     {"id": 2, "file_name": "b.png", "width": 50, "height": 20}],
          "categories": [{"id": 7, "name": "red circle"}, {"id": 3, "name": "blue square"}],
          "annotations": [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3],
                           "iscrowd": 0, "segmentation": square(b[0], b[1], min(b[2], b[3]))}
                          for i, (im, c, b) in enumerate(anns)]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def test_ap_of_hand_made_detections_equals_pycocotools_through_the_evaluation(tmp_path, monkeypatch):
    """The task's evaluation (resize for the test scale, boxes back to original pixels, category ids by name,
    detections json) gives pycocotools' AP of the same detections written by hand."""
    gt_path = _coco_gt(tmp_path)
    names = tmp_path / "names.txt"
    names.write_text("blue square\nred circle\n")  # the other order than the json's ids
    model, task = demo_task(class_names=str(names), masks="false", test_scale="[100,60]")
    hand = {  # image id -> (xyxy in original pixels, class index into names.txt, score)
        1: [([2, 3, 12, 13], 1, 0.9), ([21, 6, 35, 25], 0, 0.8), ([0, 0, 8, 8], 1, 0.7)],
        2: [([5, 2, 17, 14], 1, 0.6), ([30, 3, 44, 18], 0, 0.95)]}
    sizes = {(30, 40): 1, (20, 50): 2}  # original (h, w) -> image id

    def fake_detect(images, resized_sizes):
        out = []
        for h, w in resized_sizes:
            image_id = next(i for (oh, ow), i in sizes.items() if abs(ow / oh - w / h) < 0.05)
            oh, ow = next(s for s, i in sizes.items() if i == image_id)
            scale = torch.tensor([w / ow, h / oh, w / ow, h / oh])
            boxes = torch.tensor([b for b, _, _ in hand[image_id]], dtype=torch.float32) * scale
            out.append({"boxes": boxes, "labels": torch.tensor([c + 1 for _, c, _ in hand[image_id]]),
                        "scores": torch.tensor([s for _, _, s in hand[image_id]])})
        return out

    monkeypatch.setattr(task, "detect", fake_detect)
    records = list(read_records(gt_path))
    context = EvalContext(records, tmp_path, str(gt_path), torch.device("cpu"), 2, output_dir=tmp_path / "eval")
    metrics = task.evaluate("detection", model, context)

    category = {0: 3, 1: 7}
    dets = [{"image_id": i, "category_id": category[c], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            for i, rows in hand.items() for b, c, s in rows]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        evaluator = COCOeval(coco, coco.loadRes(dets), "bbox")
        evaluator.evaluate(), evaluator.accumulate(), evaluator.summarize()
    assert metrics["bbox_ap"] == pytest.approx(100 * evaluator.stats[0], abs=1e-6)
    assert metrics["bbox_ap50"] == pytest.approx(100 * evaluator.stats[1], abs=1e-6)
    assert metrics["bbox_ap75"] == pytest.approx(100 * evaluator.stats[2], abs=1e-6)
    assert 0 < metrics["bbox_ap"] < 100
    written = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert sorted(d["category_id"] for d in written) == sorted(d["category_id"] for d in dets)
    np.testing.assert_allclose(sorted(d["bbox"][0] for d in written), sorted(d["bbox"][0] for d in dets), atol=1e-4)


def test_the_demo_ground_truth_is_built_from_the_records_and_scored_with_masks(tiny_data, tmp_path):
    """demo records (no COCO json): a trained-from-scratch step evaluates boxes and masks by pycocotools."""
    cfg = det_config(tiny_data, tmp_path, "train.steps=1", "train.eval_tasks=[detection]",
                     "train.best_metric=detection/bbox_ap")
    result = train(cfg, progress_bar=False)
    entry = json.loads((result.output_dir / "eval" / "results.jsonl").read_text().splitlines()[-1])
    assert {"bbox_ap", "bbox_ap50", "segm_ap", "segm_ap75"} <= set(entry["metrics"])
    assert "cascade" in entry["options"]["head"]
    detections = json.loads((result.output_dir / "eval" / "detections.json").read_text())
    assert all("segmentation" in d for d in detections)


def test_a_few_steps_on_one_demo_batch_lower_the_loss(tiny_data, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(det_config(tiny_data, tmp_path, "optim.lr=1e-3"))
    batch = builder_batch(trainer.method, list(read_jsonl(tiny_data / "train.jsonl"))[:4], tiny_data, range(4))
    device_batch = trainer.to_device({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    losses = []
    for step in range(8):
        losses.append(float(trainer.accumulate_gradients(iter([device_batch]), Progress(step, 8, 0.0))["loss"]))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses


def test_resume_gives_the_same_next_losses(tiny_data, tmp_path, train_killed_after_checkpoint):
    losses = lambda run: {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    reference = losses(train(det_config(tiny_data, tmp_path, output="full"), progress_bar=False).output_dir)
    cfg = det_config(tiny_data, tmp_path, output="killed")
    train_killed_after_checkpoint(cfg, 2)
    after = losses(train(cfg, resume="latest", progress_bar=False).output_dir)
    assert sorted(after) == [1, 2, 3, 4]
    assert after[3] == reference[3] and after[4] == reference[4]


# every anchor and RoI candidate sampled (none left to chance): each rank's loss is that of its images
EXACT_SAMPLING = ("method.rpn_batch=100000", "method.roi_batch=100000")


def _ddp_worker(rank, world_size, init_file, out_file, cfg, root):
    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)  # different initial heads: DDP must broadcast rank 0's
        trainer = Trainer(cfg)
        records = list(read_jsonl(root / "train.jsonl"))[2 * rank:2 * rank + 2]
        batch = builder_batch(trainer.method, records, root, [2 * rank, 2 * rank + 1])
        torch.manual_seed(0)
        trainer.accumulate_gradients(iter([trainer.to_device(_tensors(batch))]), Progress(0, 1, 0.0))
        torch.save({n: p.grad.clone() for n, p in trainer.module.named_parameters() if p.grad is not None},
                   f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def _tensors(batch):
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def test_ddp_gradients_equal_the_single_process_mean_over_the_ranks_images(tiny_data, tmp_path):
    """2 gloo ranks of 2 images each: the synced gradient is the mean of the single-process gradients of each
    rank's 2 images (the losses are means over each process's sampled anchors and RoIs, as in torchvision)."""
    cfg = det_config(tiny_data, tmp_path, *EXACT_SAMPLING, "data.batch_size=2", output="ddp")
    out = tmp_path / "grads"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), cfg, tiny_data), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.manual_seed(0)
    single = Trainer(det_config(tiny_data, tmp_path, *EXACT_SAMPLING, "data.batch_size=2", output="single"))
    records = list(read_jsonl(tiny_data / "train.jsonl"))
    per_half = []
    for half in range(2):
        batch = builder_batch(single.method, records[2 * half:2 * half + 2], tiny_data, [2 * half, 2 * half + 1])
        single.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        single.accumulate_gradients(iter([single.to_device(_tensors(batch))]), Progress(0, 1, 0.0))
        per_half.append({n: p.grad.clone() for n, p in single.module.named_parameters() if p.grad is not None})
    assert set(ranks[0]) == set(per_half[0]) and any("roi_heads" in n for n in per_half[0])
    for name in per_half[0]:
        mean = (per_half[0][name] + per_half[1][name]) / 2
        for rank in ranks:
            torch.testing.assert_close(rank[name], mean, atol=1e-5, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_an_image_without_annotations_trains_with_empty_targets():
    torch.manual_seed(0)
    model, task = demo_task()
    batch = {"image": torch.randn(2, 3, 64, 64), "image_size": torch.tensor([[64, 64], [48, 64]]),
             "instance_boxes": torch.zeros(2, 4, 4), "instance_labels": torch.zeros(2, 4, dtype=torch.long),
             "instance_valid": torch.zeros(2, 4, dtype=torch.bool),
             "instance_masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    losses = task(model, batch, Progress(0, 1, 0.0))
    assert set(losses) == {"rpn_cls_loss", "rpn_box_loss", "cls_loss", "box_loss", "mask_loss"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert losses["rpn_box_loss"] == 0 and losses["mask_loss"] == 0


def test_bad_masks_and_boxes_drop_their_instance_only_and_are_counted(tiny_data, tiny_records, tmp_path):
    """A polygon that does not decode, an RLE of another size, a box outside the image and a zero-area box:
    each drops its own instance (counted), the image trains with its other instances."""
    def spoil(record):
        good = record["regions"][0]
        bad = [{**good, "mask": [[1, 2, 3]]}, {**good, "mask": {"size": [3, 3], "counts": "abc"}},
               {**good, "box": [70, 70, 90, 90]}, {**good, "box": [5, 5, 5, 20]}]
        return {**record, "regions": [good, *bad]}

    path = tiny_records("train", spoil, "spoiled.jsonl")
    cfg = det_config(tiny_data, tmp_path, f"data.train.path={path}", "train.steps=2", "data.batch_size=4")
    _model, task = demo_task()
    record = read_jsonl(path)[0]
    sample = DenseSampleBuilder(task.sample_spec())(load_image(record.image), record, 0)
    assert int(sample["instance_valid"].sum()) == 1 and sample["boxes_dropped"] == 2
    assert len(sample["bad_regions"]) == 2 and "does not decode" in sample["bad_regions"][0]
    result = train(cfg, progress_bar=False)
    logged = [r for r in read_metrics(result.output_dir / "metrics.jsonl") if "data/bad_regions" in r]
    assert logged and logged[-1]["data/bad_regions"] == 2 * 8  # 2 steps of 4 images
    assert all(np.isfinite(r["loss"]) for r in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in r)


def test_the_coco_recipes_load_with_a_data_root_and_carry_ibots_values():
    """1x: the README command (layer decay 0.75); 3x: the config file as written (0.65); both keep 2000 proposals
    per image after the RPN's NMS in training (iBOT's cascade config, max_per_img=2000)."""
    for name, epochs, milestones, decay in (("det-maskrcnn-coco-vitb16", 12, [8 / 12, 11 / 12], 0.75),
                                            ("det-maskrcnn-coco-vitb16-3x", 36, [27 / 36, 33 / 36], 0.65)):
        cfg = load_config(name, [], "/data/coco")
        assert cfg.data.train.path == "/data/coco/annotations/instances_train2017.json"
        assert cfg.train.epochs == epochs and cfg.optim.step_milestones == pytest.approx(milestones, abs=1e-3)
        opts = method_options(cfg.method.name, cfg.method.options)
        assert (cfg.optim.lr, cfg.optim.weight_decay, opts.backbone.layer_decay) == (1e-4, 0.05, decay)
        assert (opts.rpn_post_nms_train, opts.rpn_min_pos_iou, opts.drop_empty, opts.norm) == (
            2000, 0.3, True, "sync_batch")
    large = load_config("det-maskrcnn-coco-vitl14", [], "/data/coco")
    assert large.model.name == "ViT-L-14" and method_options(large.method.name, large.method.options).backbone.layer_decay == 0.8


def test_detections_picture_draws_novel_classes_dashed_and_base_classes_solid(tmp_path):
    from finegrain.viz.detections import Detections, plot_detections
    from finegrain.viz.panels import PanelGrid

    names = ["red circle", "blue square"]
    truth = Detections(torch.tensor([[10, 10, 90, 40], [10, 60, 90, 90]]), names)
    predicted = Detections(torch.tensor([[12, 10, 88, 40]]), ["red circle"], [0.9],
                           masks=torch.zeros(1, 100, 100, dtype=torch.bool))
    out = plot_detections(Image.new("RGB", (100, 100)), predicted, truth, names, tmp_path / "d.png",
                          novel={"blue square"})
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    x0, y0, _, _ = PanelGrid(1, 2, (100, 100), long_side=400).box(0, 1)  # the ground-truth panel, 4 px a pixel

    def coloured_share(y):  # along a bottom edge, away from the corners and the labels
        rows = picture[y0 + 4 * y - 2:y0 + 4 * y + 3, x0 + 4 * 30:x0 + 4 * 85]
        return float((rows.max(axis=2) > 60).any(axis=0).mean())

    assert coloured_share(40) > 0.95  # base class: solid
    assert coloured_share(90) < 0.8  # novel class: dashed
    with pytest.raises(ValueError, match="not among the class names"):
        plot_detections(Image.new("RGB", (10, 10)), predicted, Detections(torch.zeros(1, 4), ["cat"]), names,
                        tmp_path / "e.png")


def test_viz_detections_draws_a_checkpoints_predictions_next_to_the_truth(tiny_data, tmp_path):
    from finegrain.cli import main

    run = train(det_config(tiny_data, tmp_path, "train.steps=1", "train.save_every=1"), progress_bar=False).output_dir
    out = tmp_path / "pictures"
    assert main(["viz", "detections", "--checkpoint", str(run / "step_00000001.pt"), "--max-images", "2",
                 "--score-threshold", "0", "--novel", str(_names_file(tmp_path, ["red circle"])),
                 "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]


def _names_file(tmp_path, names):
    path = tmp_path / "novel.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def test_a_patch_14_tower_gives_power_of_two_levels_through_a_resized_input(tmp_path):
    """torchvision's anchors and RoI levels need strides 4..64: a patch-14 tower sees the canvas x 14/16."""
    config = tmp_path / "patch14.json"
    config.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 56, "layers": 4, "width": 64,
                                                                  "patch_size": 14},
                                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                               "layers": 1}}))
    model = create_model(str(config))
    cfg = load_config("demo-finetune-det", [f"model.name={config}", "method.size_divisor=32"])
    task = create_method("finetune-det", cfg.method.options, model)
    assert task.strides == [4, 8, 16, 32, 64] and task.tower_scale == 14 / 16
    maps = task.feature_maps(torch.randn(1, 3, 64, 96))
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
