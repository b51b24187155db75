"""F-ViT open-vocabulary detection (finetune-ovd): base-only training data, the frozen backbone, the test-time
ensemble, AP50 through the task's own evaluation path, losses, resume and DDP."""

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_backbone import vit
from test_timm_tower import eva02_tiny

from finegrain.config import load_config
from finegrain.data.dense import DenseSampleBuilder
from finegrain.data.readers import read_coco_instances
from finegrain.data.records import Record, Region
from finegrain.eval.detection import lvis_metrics
from finegrain.eval.prompts import load_class_names
from finegrain.finetune.fvit import ensemble_scores
from finegrain.models import create_model
from finegrain.objectives import EvalContext, Progress, create_method
from finegrain.train.optim import apply_trainable_rules
from finegrain.train.trainer import Trainer, TrainModule, total_loss, train

BASE, NOVEL = load_class_names("demo-ovd-base"), load_class_names("demo-ovd-novel")
SMALL = ["method.name=finetune-ovd", "model.name=finegrain-tiny", "method.base_classes=demo-ovd-base",
         "method.novel_classes=demo-ovd-novel", "method.templates=simple", "method.image_size=64",
         "method.ratio_range=[0.75,1.5]", "method.max_instances=3", "method.norm=group", "method.fpn_channels=16",
         "method.head_convs=1", "method.fc_channels=64", "method.rpn_pre_nms=50", "method.rpn_post_nms=20",
         "method.rpn_batch_size=32", "method.roi_batch_size=32", "method.anchor_scale=4", "optim.schedule=constant",
         "optim.weight_decay=0.1"]


def ovd_config(tiny_config, *overrides, output="run"):
    return tiny_config(*SMALL, *overrides, output=output)


def task(**options):
    torch.manual_seed(0)
    model = create_model("finegrain-tiny")
    cfg = load_config(None, SMALL + [f"method.{k}={v}" for k, v in options.items()])
    return model, create_method("finetune-ovd", cfg.method.options, model)


def test_demo_split_sees_every_colour_and_shape_but_never_a_novel_pair():
    from finegrain.data.demo import COLOURS, DEMO_CLASSES, SHAPES
    assert sorted(BASE + NOVEL) == sorted(DEMO_CLASSES) and not set(BASE) & set(NOVEL)
    for part in (*COLOURS, *SHAPES):
        assert any(part in name.split() for name in BASE), part


def test_no_novel_class_annotation_reaches_training(tmp_path):
    """A record with base and novel shapes: through the real sample builder only the base boxes come out, with
    base-list indices, and the novel ones are counted as unlisted."""
    _, method = task()
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    regions = (Region((2, 2, 20, 20), label=NOVEL[0]), Region((30, 30, 50, 50), label=BASE[3]),
               Region((5, 40, 20, 60), label=NOVEL[1]))
    builder = DenseSampleBuilder(method.sample_spec())
    sample = builder(Image.open(tmp_path / "a.png").convert("RGB"), Record("a.png", regions=regions, width=64,
                                                                        height=64), seed=0)
    assert sample["instances_unlisted"] == 2
    assert sample["instance_valid"].sum() == 1 and sample["instance_labels"][0] == 3


def test_released_split_json_with_absent_category_ids_crowds_and_empty_images_trains(tmp_path):
    """A COCO split json as released (categories listing the split's classes only): an annotation whose category
    id is not in ``categories`` is a counted bad region, crowd boxes are skipped, an image without annotations
    is a sample without boxes; one training forward over all of them gives finite losses."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 48), (90, 90, 90)).save(tmp_path / name)
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                       {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
            "categories": [{"id": 7, "name": BASE[0]}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 20, 20], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 99, "bbox": [30, 4, 20, 20], "iscrowd": 0},
                            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [30, 20, 20, 20], "iscrowd": 1}]}
    (tmp_path / "split.json").write_text(json.dumps(data))
    records = list(read_coco_instances(tmp_path / "split.json"))
    assert [len(r.regions) for r in records] == [1, 0]
    assert "category_id' 99" in records[0].bad_regions[0]
    model, method = task()
    builder = DenseSampleBuilder(method.sample_spec())
    samples = [builder(Image.open(tmp_path / r.image).convert("RGB"), r, seed=i) for i, r in enumerate(records)]
    assert [int(s["instance_valid"].sum()) for s in samples] == [1, 0]
    assert len(samples[0]["bad_regions"]) == 1
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if isinstance(samples[0][k], torch.Tensor)}
    batch["image"] = batch["image"].float() / 255
    losses = method(model, batch, Progress(0, 1, 0.0))
    assert all(torch.isfinite(v) for v in losses.values())


def test_lvis_images_named_by_coco_url_are_read_relative_to_the_root(tmp_path):
    data = {"images": [{"id": 3, "coco_url": "http://images.cocodataset.org/val2017/000000000003.jpg", "width": 64,
                        "height": 48, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
            "categories": [{"id": 1, "name": "aerosol_can", "frequency": "c"}],
            "annotations": [{"id": 1, "image_id": 3, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400}]}
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    (record,) = read_coco_instances(tmp_path / "lvis.json")
    assert record.image == "val2017/000000000003.jpg" and record.regions[0].label == "aerosol_can"


def test_ensemble_is_the_release_geometric_mean_with_base_and_novel_exponents():
    learned = torch.tensor([[0.5, 0.2, 0.3]])  # base class, novel class, background
    clip = torch.tensor([[0.1, 0.6, 0.3]])
    base = torch.tensor([True, False, True])
    out = ensemble_scores(learned, clip, base, alpha=0.1, beta=0.8)
    expected = [0.5 ** 0.9 * 0.1 ** 0.1, 0.2 ** 0.2 * 0.6 ** 0.8, 0.3 ** 0.9 * 0.3 ** 0.1]
    torch.testing.assert_close(out[0], torch.tensor(expected))


def test_ap50_through_the_task_evaluation_equals_pycocotools(tmp_path, monkeypatch):
    """Hand-made detections through the task's evaluation (ground truth built from the records, class indices
    mapped to categories, xyxy -> xywh): AP50 novel / base / all are the per-class means of pycocotools' AP50."""
    model, method = task()
    records = [Record(f"{i}.png", regions=(Region((0, 0, 20, 20), label=BASE[0]), Region((30, 30, 60, 60), label=NOVEL[0])),
                      width=64, height=64) for i in range(2)]
    hand = {0: [((0, 0, 20, 20), 0.9, 0), ((30, 30, 60, 60), 0.8, len(BASE)), ((2, 2, 30, 30), 0.95, len(BASE))],
            1: [((40, 40, 60, 60), 0.7, 0), ((30, 30, 58, 60), 0.6, len(BASE))]}

    def detect(model, files, expected=None):
        out = []
        for f in files:
            rows = hand[int(f.stem)]
            out.append((torch.tensor([r[0] for r in rows], dtype=torch.float), torch.tensor([r[1] for r in rows]),
                        torch.tensor([r[2] for r in rows])))
        return out

    monkeypatch.setattr(method, "detect", detect)
    metrics = method.evaluate("ovd", model, EvalContext(records, tmp_path, "demo:val", torch.device("cpu"), 2))

    names = BASE + NOVEL
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": 64, "height": 64} for i in range(2)], "categories": [
        {"id": i + 1, "name": n} for i, n in enumerate(names)], "annotations": [
        {"id": 2 * i + j + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for i in range(2) for j, (c, b) in enumerate([(1, [0, 0, 20, 20]), (len(BASE) + 1, [30, 30, 30, 30])])]}
    gt.createIndex()
    dets = [{"image_id": i, "category_id": c + 1, "score": s, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            for i, rows in hand.items() for b, s, c in rows]
    evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
    evaluator.params.maxDets = [100, 300, 1000]
    evaluator.evaluate(), evaluator.accumulate()
    ap50 = {}
    for k, cid in enumerate(evaluator.params.catIds):
        p = evaluator.eval["precision"][0, :, k, 0, -1]
        ap50[cid] = 100 * p[p > -1].mean() if (p > -1).any() else math.nan
    assert metrics["ap50_base"] == pytest.approx(ap50[1]) and metrics["ap50_novel"] == pytest.approx(ap50[len(BASE) + 1])
    assert metrics["ap50_all"] == pytest.approx((ap50[1] + ap50[len(BASE) + 1]) / 2)
    assert 0 < metrics["ap50_novel"] < 100 and 0 < metrics["ap50_base"] < 100  # neither trivially 0 nor 100


def test_detection_runs_the_tower_once_for_the_pyramid_and_the_clip_region_scores(tmp_path):
    """The release reads its fourth map and the CLIP region features from the same v-only last block: one pass."""
    model, method = task()
    method.eval()
    for i in range(2):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    passes = []
    model.clip.visual.conv1.register_forward_hook(lambda *_: passes.append(1))
    detections = method.detect(model, [tmp_path / "0.png", tmp_path / "1.png"])
    assert len(passes) == 1 and len(detections) == 2


def test_blocks_not_ending_with_the_last_one_are_refused(tmp_path):
    deeper = vit(tmp_path, layers=6)
    cfg = load_config(None, SMALL + ["method.backbone.blocks=[0,1,2,3]"])
    with pytest.raises(ValueError, match="must end with the last block"):
        create_method("finetune-ovd", cfg.method.options, deeper)


@pytest.mark.parametrize("frozen", [True, False])
def test_rules_of_a_timm_eva02_tower_without_fc_norm_apply(tmp_path, frozen):
    """EVA02 towers (the F-ViT recipes') have no ``fc_norm`` parameters: the task's rules still apply, the blocks
    trainable only when not frozen, the final norm and head never."""
    model = eva02_tiny(tmp_path)
    cfg = load_config(None, SMALL + ["method.image_size=56", f"method.backbone.frozen={str(frozen).lower()}"])
    method = create_method("finetune-ovd", cfg.method.options, model)
    module = TrainModule(model, method)
    apply_trainable_rules(module, method.param_rules())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert ("model.clip.visual.trunk.blocks.0.attn.qkv.weight" in trainable) == (not frozen)
    assert not any(n.startswith(("model.clip.visual.trunk.norm.", "model.clip.visual.head")) for n in trainable)
    assert any(n.startswith("method.head.") for n in trainable)


def tower_state(module):
    return {n: p.detach().clone() for n, p in module.model.clip.visual.named_parameters()}


def test_frozen_backbone_gets_no_gradient_and_stays_unchanged_while_the_heads_learn(tiny_config):
    trainer = Trainer(ovd_config(tiny_config, "train.steps=3", "train.save_every=100"), progress_bar=False)
    tower, head = tower_state(trainer.module), {n: p.detach().clone() for n, p in trainer.method.named_parameters()}
    assert not any(p.requires_grad for p in trainer.model.clip.visual.parameters())
    trainer.fit()
    assert all(torch.equal(v, tower_state(trainer.module)[n]) for n, v in tower.items())
    assert all(p.grad is None for p in trainer.model.clip.visual.parameters())
    changed = [n for n, p in trainer.method.named_parameters() if not torch.equal(p, head[n])]
    assert any(n.startswith("backbone.pyramid") for n in changed) and any(n.startswith("head.box_head") for n in changed)
    assert any(n.startswith("head.rpn") for n in changed) and "head.temperature" in changed


def test_one_training_step_lowers_the_loss_on_the_same_batch():
    model, method = task()
    batch = _batch()
    method.ensure_class_embeddings(model)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)

    def loss():
        torch.manual_seed(1)  # the same RPN / RoI samples both times
        return total_loss(method(model, batch, Progress(0, 1, 0.0)))

    before = loss()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


def test_resume_gives_the_same_next_losses(tiny_config, train_killed_after_checkpoint):
    def losses(result):
        return {r["step"]: r["loss"] for r in map(json.loads, (result.output_dir / "metrics.jsonl").open())
                if "loss" in r}

    options = ["train.steps=4", "train.save_every=2", "data.batch_size=4"]
    reference = losses(train(ovd_config(tiny_config, *options, output="full"), progress_bar=False))
    cfg = ovd_config(tiny_config, *options, output="killed")
    train_killed_after_checkpoint(cfg, 2)
    after = losses(train(cfg, resume="latest", progress_bar=False))
    assert [after[s] for s in (3, 4)] == [reference[s] for s in (3, 4)]


def test_lvis_metrics_without_the_lvis_package_name_the_extra(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_lvis(name, *args, **kwargs):
        if name == "lvis" or name.startswith("lvis."):
            raise ImportError("No module named 'lvis'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lvis)
    with pytest.raises(ImportError, match=r"finegrain\[finetune\]"):
        lvis_metrics(str(tmp_path / "lvis_v1_val.json"), [])


def test_lvis_negative_and_not_exhaustive_categories_decide_false_positives(tmp_path):
    had_float = hasattr(np, "float")  # lvis 0.5.3 needs numpy.float while it runs, gone again after
    cats = [{"id": i, "name": n, "frequency": f, "synset": n, "image_count": 1, "instance_count": 1}
            for i, n, f in ((1, "apple", "r"), (2, "bread", "c"), (3, "cake", "f"))]
    images = [{"id": 1, "width": 100, "height": 100, "coco_url": "x/val2017/1.jpg", "neg_category_ids": [2],
               "not_exhaustive_category_ids": [3]},
              {"id": 2, "width": 100, "height": 100, "coco_url": "x/val2017/2.jpg", "neg_category_ids": [],
               "not_exhaustive_category_ids": []}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [50, 50, 30, 30], "area": 900},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [20, 20, 40, 40], "area": 1600}]
    (tmp_path / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    right = {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.5}
    bread = {"image_id": 2, "category_id": 2, "bbox": [20, 20, 40, 40], "score": 0.5}
    base = lvis_metrics(str(tmp_path / "gt.json"), [right, bread])
    # a confident box of a class marked absent (negative) is a false positive; of a not-exhaustively
    # labelled class, unmatched boxes are ignored
    negative = lvis_metrics(str(tmp_path / "gt.json"), [right, bread, {**right, "category_id": 2, "score": 0.9}])
    unmatched = lvis_metrics(str(tmp_path / "gt.json"), [right, {**right, "category_id": 3, "score": 0.9,
                                                                  "bbox": [0, 60, 20, 20]},
                                                         {"image_id": 1, "category_id": 3, "bbox": [50, 50, 30, 30],
                                                          "score": 0.8}])
    assert base["map_r"] == pytest.approx(100.0) and base["map_c"] == pytest.approx(100.0)
    assert negative["map_c"] < 60 and unmatched["map_f"] == pytest.approx(100.0)
    assert hasattr(np, "float") == had_float


GLOBAL = 4


def _batch():
    g = torch.Generator().manual_seed(5)
    boxes = torch.tensor([[4.0, 4, 28, 28], [30, 30, 60, 58], [0, 0, 0, 0]]).expand(GLOBAL, 3, 4).clone()
    boxes[:, :2] += torch.randint(0, 4, (GLOBAL, 1, 1), generator=g)
    return {"image": torch.randn(GLOBAL, 3, 64, 64, generator=g), "image_size": torch.tensor([[64, 64]] * GLOBAL),
            "instance_boxes": boxes, "instance_labels": torch.randint(0, len(BASE), (GLOBAL, 3), generator=g),
            "instance_valid": torch.tensor([[True, True, False]] * GLOBAL)}


def _module():
    model, method = task(rpn_batch_size=100000, roi_batch_size=100000)  # every candidate sampled: no draw
    model.requires_grad_(False)  # the method's rules: the whole CLIP frozen
    return TrainModule(model, method)


def _ddp_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        module = _module()
        module.method.ensure_class_embeddings(module.model)
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        per = GLOBAL // world
        batch = {k: v[rank * per:(rank + 1) * per] for k, v in _batch().items()}
        total_loss(ddp(batch, Progress(0, 1, 0.0))).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in module.named_parameters() if p.grad is not None}, out_file)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_gradients_equal_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    single = _module()
    total_loss(single(_batch(), Progress(0, 1, 0.0))).backward()
    ref = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
    assert set(ddp) == set(ref) and any(n.startswith("method.head.rpn") for n in ref)
    for name, g in ref.items():
        torch.testing.assert_close(ddp[name], g, atol=1e-5, rtol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_demo_recipe_trains_and_writes_novel_base_all_ap50_to_the_run_results(tiny_data, tmp_path):
    cfg = load_config("demo-finetune-ovd", [f"data.train.path={tiny_data / 'train.jsonl'}",
                                            f"data.val.path={tiny_data / 'val.jsonl'}", "data.batch_size=4",
                                            "data.num_workers=0", "train.steps=2", f"train.output_dir={tmp_path}"])
    result = train(cfg, progress_bar=False)
    assert {"ovd/ap50_novel", "ovd/ap50_base", "ovd/ap50_all"} <= set(result.eval_metrics)
    (row,) = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert row["task"] == "ovd" and set(row["metrics"]) == {"ap50_novel", "ap50_base", "ap50_all", "num_images",
                                                            "skipped_images"}
    counts = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("data/instances_unlisted", 0) for r in counts) > 0  # novel shapes were left out
