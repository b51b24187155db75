"""finegrain.predict: every predictor gives what the held-out evaluation of its kind computes on the same images
and checkpoint, and the open-vocabulary detector takes any class names at call time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.config import DataSourceConfig, load_config
from finegrain.data.loader import resolve_source
from finegrain.eval import segmentation as eval_segmentation
from finegrain.eval.detection import encode_masks
from finegrain.eval.prompts import load_class_names
from finegrain.objectives import EvalContext
from finegrain.predict import (
    ClipPredictor,
    InstanceDetector,
    OpenVocabularyDetector,
    Segmenter,
    list_images,
    load_checkpoint,
    load_predictor,
)
from finegrain.train.trainer import train

BASE, NOVEL = load_class_names("demo-ovd-base"), load_class_names("demo-ovd-novel")
COMMON = ["data.num_workers=0", "data.batch_size=4", "optim.warmup_steps=0", "train.steps=2", "train.save_every=2",
          "train.eval_tasks=[]", "train.best_metric=null"]
DET = ["method.score_threshold=0.0"]
OVD = ["method.name=finetune-ovd", "model.name=finegrain-tiny", "method.base_classes=demo-ovd-base",
       "method.novel_classes=demo-ovd-novel", "method.templates=simple", "method.image_size=64",
       "method.ratio_range=[0.75,1.5]", "method.max_instances=3", "method.norm=group", "method.fpn_channels=16",
       "method.head_convs=1", "method.fc_channels=64", "method.rpn_pre_nms=50", "method.rpn_post_nms=20",
       "method.rpn_batch_size=32", "method.roi_batch_size=32", "method.anchor_scale=4"]
SEG = ["model.name=finegrain-tiny", "method.name=finetune-seg", "method.num_classes=28", "method.class_names=null",
       "method.reduce_zero_label=false", "method.scale=[128,64]", "method.crop=[64,64]", "method.channels=32",
       "method.aux_channels=16", "method.test_scale=[128,64]", "method.test_window=[64,64]",
       "method.test_stride=[43,43]"]


@pytest.fixture(scope="module")
def checkpoints(tiny_data, tmp_path_factory):
    """``{task: best checkpoint}`` of two-step fine-tuning runs on the tiny demo data (det, ovd, seg)."""
    root = tmp_path_factory.mktemp("predict_runs")
    data = [f"data.train.path={tiny_data / 'train.jsonl'}", f"data.val.path={tiny_data / 'val.jsonl'}"]
    configs = {"det": load_config("demo-finetune-det", [*data, *COMMON, *DET]),
               "ovd": load_config(None, [*data, *COMMON, *OVD]),
               "seg": load_config(None, [*data, *COMMON, *SEG])}
    found = {}
    for name, cfg in configs.items():
        cfg.train.output_dir = str(root / name)
        found[name] = train(cfg, progress_bar=False).output_dir / "step_00000002.pt"
    return found


def val_records(tiny_data, count=3):
    records, _ = resolve_source(DataSourceConfig(path=str(tiny_data / "val.jsonl")))
    return [records[i] for i in range(count)]


def test_load_predictor_picks_the_predictor_of_what_the_checkpoint_holds(checkpoints):
    kinds = {name: type(load_predictor(path, device="cpu")) for name, path in checkpoints.items()}
    assert kinds == {"det": InstanceDetector, "ovd": OpenVocabularyDetector, "seg": Segmenter}
    assert isinstance(load_predictor("finegrain-tiny", device="cpu"), ClipPredictor)


def test_mask_rcnn_predictions_are_the_evaluations_detections(checkpoints, tiny_data, tmp_path):
    """The boxes, scores, classes and RLE masks the held-out evaluation writes to detections.json."""
    loaded = load_checkpoint(checkpoints["det"])
    records = val_records(tiny_data)
    context = EvalContext(records, tiny_data, str(tiny_data / "val.jsonl"), torch.device("cpu"), 1,
                          output_dir=tmp_path)
    loaded.task.evaluate("detection", loaded.model, context)
    evaluated = json.loads((tmp_path / "detections.json").read_text())
    predictor = load_predictor(checkpoints["det"], device="cpu")
    predicted = []
    for image_id, detections in enumerate(predictor([tiny_data / r.image for r in records]), 1):
        masks = encode_masks(detections.masks.numpy())
        for (x0, y0, x1, y1), score, label, mask in zip(detections.boxes.tolist(), detections.scores.tolist(),
                                                        detections.labels.tolist(), masks):
            predicted.append({"image_id": image_id, "category_id": label + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                              "score": score, "segmentation": mask})
    assert len(evaluated) > 0
    assert predicted == evaluated


def test_mask_rcnn_keeps_a_subset_of_its_classes_and_refuses_others(checkpoints, tiny_data):
    predictor = load_predictor(checkpoints["det"], device="cpu")
    image = tiny_data / val_records(tiny_data, 1)[0].image
    (every,) = predictor(image)
    names = every.class_names[3:5]
    (some,) = predictor(image, classes=names[::-1])
    kept = [(box, score) for box, score, name in zip(every.boxes.tolist(), every.scores.tolist(), every.names)
            if name in names]
    assert sorted(zip(some.boxes.tolist(), some.scores.tolist())) == sorted(kept) and len(kept) > 0
    assert set(some.names) <= set(names) and some.class_names == names[::-1]
    with pytest.raises(ValueError, match="not classes of this finetune-det checkpoint"):
        predictor(image, classes=["zebra"])


def capture_ovd_detections(monkeypatch):
    """The detections list the OVD evaluation scores (captured from its ``detection_metrics`` call)."""
    from finegrain.finetune import ovd

    seen = {}
    original = ovd.detection_metrics

    def spy(ground_truth, detections, *args, **kwargs):
        seen["detections"] = detections
        return original(ground_truth, detections, *args, **kwargs)

    monkeypatch.setattr(ovd, "detection_metrics", spy)
    return seen


def test_open_vocabulary_predictions_are_the_evaluations_detections(checkpoints, tiny_data, monkeypatch):
    loaded = load_checkpoint(checkpoints["ovd"])
    records = val_records(tiny_data)
    seen = capture_ovd_detections(monkeypatch)
    loaded.task.evaluate("ovd", loaded.model, EvalContext(records, tiny_data, "demo:val", torch.device("cpu"), 2))
    names = BASE + NOVEL
    predictor = load_predictor(checkpoints["ovd"], device="cpu", batch_size=2)
    predicted = [{"image_id": image_id, "category_id": label + 1, "score": score,
                  "bbox": [x0, y0, x1 - x0, y1 - y0]}
                 for image_id, detections in enumerate(predictor([tiny_data / r.image for r in records], names))
                 for (x0, y0, x1, y1), score, label in zip(detections.boxes.tolist(), detections.scores.tolist(),
                                                           detections.labels.tolist())]
    assert len(seen["detections"]) > 0
    assert predicted == seen["detections"]


def test_the_vocabulary_is_chosen_at_call_time(checkpoints, tiny_data):
    """Reordering the class names relabels the same detections; a novel class alone is detected by its name;
    the trained (base) classes are the default."""
    predictor = load_predictor(checkpoints["ovd"], device="cpu")
    image = tiny_data / val_records(tiny_data, 1)[0].image
    names = [NOVEL[0], BASE[0], NOVEL[1]]
    (forward,) = predictor(image, names)
    (backward,) = predictor(image, names[::-1])
    assert len(forward) > 0
    one, other = sorted(zip(forward.names, forward.scores.tolist())), sorted(zip(backward.names, backward.scores.tolist()))
    assert [n for n, _ in one] == [n for n, _ in other]
    assert [s for _, s in one] == pytest.approx([s for _, s in other], abs=1e-5)
    (alone,) = predictor(image, NOVEL[0])  # one name, given as a string
    assert len(alone) > 0 and set(alone.names) == {NOVEL[0]}
    vocabulary = predictor.vocabulary(names)
    assert vocabulary.base.tolist() == [False, True, False]
    (default,) = predictor(image)
    assert default.class_names == BASE
    unseen = predictor.vocabulary(["a purple hexagon"])  # a name outside the checkpoint's: embedded by its tower
    assert unseen.embeddings.shape == (1, vocabulary.embeddings.shape[1]) and not unseen.base.any()
    assert torch.linalg.vector_norm(unseen.embeddings, dim=-1).item() == pytest.approx(1.0, abs=1e-5)


def capture_label_maps(monkeypatch):
    """The predicted label maps the segmentation evaluations add to their confusion matrix, in order."""
    seen = []
    original = eval_segmentation.ConfusionMatrix.update

    def spy(self, prediction, label, name="labels"):
        seen.append(prediction.clone())
        return original(self, prediction, label, name)

    monkeypatch.setattr(eval_segmentation.ConfusionMatrix, "update", spy)
    return seen


def test_segmenter_label_maps_are_the_evaluations(checkpoints, tiny_data, monkeypatch):
    loaded = load_checkpoint(checkpoints["seg"])
    records = val_records(tiny_data)
    seen = capture_label_maps(monkeypatch)
    loaded.task.evaluate("segmentation", loaded.model,
                         EvalContext(records, tiny_data, "demo:val", torch.device("cpu"), 4))
    predictor = load_predictor(checkpoints["seg"], device="cpu", batch_size=4)
    results = predictor([tiny_data / r.image for r in records], probabilities=True)
    assert len(seen) == 3 and all(torch.equal(r.label_map, s) for r, s in zip(results, seen))
    probabilities = results[0].probabilities
    assert probabilities.shape == (28, *results[0].label_map.shape)
    assert torch.allclose(probabilities.sum(dim=0), torch.ones(()), atol=1e-5)
    assert torch.equal(probabilities.argmax(dim=0), results[0].label_map)


def test_training_free_segmentation_is_the_open_vocabulary_evaluations(tiny_data, monkeypatch):
    from finegrain.eval.benchmarks import BENCHMARKS
    from finegrain.eval.protocols import PROTOCOLS

    bench = BENCHMARKS["demo-segmentation"]
    (dataset,) = PROTOCOLS["segmentation"].inputs(tiny_data, bench.data, bench.images, dict(bench.options))
    dataset = FirstPairs(dataset, 2)
    predictor = load_predictor("finegrain-tiny", device="cpu")
    names = load_class_names(dataset.class_names)
    seen = capture_label_maps(monkeypatch)
    eval_segmentation.evaluate_segmentation(predictor.model, dataset, predictor.tokenizer, names, short_side=64,
                                            progress=False)
    results = predictor.segment([dataset[i].image for i in range(2)], names, short_side=64)
    assert len(seen) == 2 and all(torch.equal(r.label_map, s) for r, s in zip(results, seen))


class FirstPairs:
    """The first ``count`` pairs of a segmentation dataset."""

    def __init__(self, dataset, count):
        self.dataset, self.count = dataset, count
        self.ignore_index, self.class_names = dataset.ignore_index, dataset.class_names

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.dataset[index]


def test_clip_classifies_images_and_boxes_and_embeds(tiny_data):
    predictor = load_predictor("finegrain-tiny", device="cpu")
    record = val_records(tiny_data, 1)[0]
    image = tiny_data / record.image
    names = ["red circle", "blue square", "green star"]
    (result,) = predictor.classify(image, names)
    assert result.scores.shape == (3,) and result.scores.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert result.top(2)[0][0] == names[int(result.labels)]
    boxes = [region.box for region in record.regions]
    classified = predictor.classify_boxes(image, boxes, names)
    assert classified.scores.shape == (len(boxes), 3)
    embeddings = predictor.embed_boxes(image, boxes)
    assert embeddings.shape[0] == len(boxes)
    texts = predictor.embed_texts(names)
    images = predictor.embed_images([image, Image.open(image)])
    assert torch.allclose(images[0], images[1]) and texts.shape == (3, images.shape[1])
    assert predictor.dense_features(image).shape[:2] == (1, images.shape[1])


def test_list_images_reads_folders_patterns_files_lists_and_records(tmp_path, tiny_data):
    assert list_images(tiny_data / "val.jsonl")[:2] == [tiny_data / "images/val/000000.png",
                                                        tiny_data / "images/val/000001.png"]
    for name in ("b.png", "a.jpg", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("# photos\na.jpg\n\nsub/c.png\n")
    assert list_images(tmp_path) == [tmp_path / "a.jpg", tmp_path / "b.png", tmp_path / "sub/c.png"]
    assert list_images(str(tmp_path / "*.png")) == [tmp_path / "b.png"]
    assert list_images([tmp_path / "notes.txt", tmp_path / "a.jpg"]) == [tmp_path / "a.jpg", tmp_path / "sub/c.png"]
    with pytest.raises(ValueError, match="no such file or folder"):
        list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"notes.txt:2: 'a.gif' is not an image file name"):
        (tmp_path / "notes.txt").write_text("a.jpg\na.gif\n")
        list_images(tmp_path / "notes.txt")


# ----- finegrain predict ----------------------------------------------------------------------------------
def photos(tiny_data, tmp_path, count=3):
    """``count`` held-out demo images copied into a folder of their own (new images, no annotation)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for record in val_records(tiny_data, count):
        (folder / Path(record.image).name).write_bytes((tiny_data / record.image).read_bytes())
    return folder


def run_predict(*args):
    from finegrain.cli import main

    return main(["predict", "--no-progress", "--device", "cpu", *map(str, args)])


def test_open_vocabulary_files_load_in_pycocotools_and_hold_the_api_predictions(checkpoints, tiny_data, tmp_path):
    from pycocotools.coco import COCO

    folder, out = photos(tiny_data, tmp_path), tmp_path / "out"
    names = [NOVEL[0], BASE[0], "a purple hexagon"]
    assert run_predict("--checkpoint", checkpoints["ovd"], "--images", folder, "--classes", ",".join(names),
                       "--out", out, "--draw", "--draw-threshold", "0") == 0
    gt = COCO(str(out / "images.json"))
    results = gt.loadRes(str(out / "detections.json"))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == names and len(results.getAnnIds()) > 0
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    files = sorted(folder.iterdir())
    assert [line["image"] for line in lines] == [str(p) for p in files]
    expected = load_predictor(checkpoints["ovd"], device="cpu")(files, names)
    for line, detections in zip(lines, expected):
        assert [row["box"] for row in line["detections"]] == detections.boxes.tolist()
        assert [row["score"] for row in line["detections"]] == detections.scores.tolist()
        assert [row["label"] for row in line["detections"]] == detections.names
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [p.stem + ".png" for p in files]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["predicted"], summary["skipped"]) == (3, 3, 0)


def test_mask_rcnn_masks_round_trip_through_the_rle_files(checkpoints, tiny_data, tmp_path):
    from pycocotools import mask as mask_utils

    folder, out = photos(tiny_data, tmp_path, 1), tmp_path / "out"
    assert run_predict("--checkpoint", checkpoints["det"], "--images", folder, "--out", out) == 0
    (detections,) = load_predictor(checkpoints["det"], device="cpu")(sorted(folder.iterdir()))
    results = json.loads((out / "detections.json").read_text())
    assert len(results) == len(detections) > 0
    decoded = mask_utils.decode([r["segmentation"] for r in results]).transpose(2, 0, 1)
    assert (decoded == detections.masks.numpy()).all()


def test_segmenter_label_maps_are_palette_pngs_with_a_classes_file(checkpoints, tiny_data, tmp_path):
    folder, out = photos(tiny_data, tmp_path, 2), tmp_path / "out"
    assert run_predict("--checkpoint", checkpoints["seg"], "--images", folder, "--out", out, "--draw") == 0
    files = sorted(folder.iterdir())
    expected = load_predictor(checkpoints["seg"], device="cpu")(files)
    classes = (out / "classes.txt").read_text().splitlines()
    assert classes == expected[0].class_names
    for path, result in zip(files, expected):
        with Image.open(out / "labels" / f"{path.stem}.png") as png:
            assert png.mode == "P"
            assert torch.equal(torch.from_numpy(np.array(png)).long(), result.label_map)
    assert (out / "overlays" / f"{files[0].stem}.png").is_file()


def test_training_free_segmentation_and_classification_from_a_clip_checkpoint(tiny_data, tmp_path):
    folder = photos(tiny_data, tmp_path, 2)
    assert run_predict("--checkpoint", "finegrain-tiny", "--images", folder, "--classes", "red circle,blue star",
                       "--out", tmp_path / "seg") == 0
    assert len(list((tmp_path / "seg" / "labels").iterdir())) == 2
    assert run_predict("--checkpoint", "finegrain-tiny", "--task", "classify", "--images", folder,
                       "--classes", "red circle,blue star", "--out", tmp_path / "cls") == 0
    line = json.loads((tmp_path / "cls" / "predictions.jsonl").read_text().splitlines()[0])
    assert [name for name, _ in line["top"]] in (["red circle", "blue star"], ["blue star", "red circle"])


def test_resume_predicts_only_the_images_not_done_and_gives_the_files_of_one_run(checkpoints, tiny_data, tmp_path):
    folder = photos(tiny_data, tmp_path, 3)
    files = sorted(folder.iterdir())
    once, twice = tmp_path / "once", tmp_path / "twice"
    # one image per forward: the batch a split or a resume gives an image changes batched kernels' float rounding
    common = ["--checkpoint", checkpoints["ovd"], "--classes", ",".join(BASE + NOVEL), "--batch-size", "1"]
    assert run_predict(*common, "--images", folder, "--out", once) == 0
    assert run_predict(*common, "--images", *files[:2], "--out", twice) == 0
    assert run_predict(*common, "--images", folder, "--out", twice) == 2  # an earlier run: refused without --resume
    assert run_predict(*common, "--images", folder, "--out", twice, "--resume") == 0
    parts = (twice / "parts" / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(line)["image"] for line in parts] == [str(p) for p in files]  # the third was added, once
    for name in ("predictions.jsonl", "detections.json"):
        assert (twice / name).read_text() == (once / name).read_text()
    assert run_predict("--checkpoint", checkpoints["ovd"], "--images", folder, "--out", twice, "--resume") == 2


def test_a_folder_holding_files_no_run_wrote_is_left_alone_and_unreadable_images_are_counted(checkpoints, tiny_data,
                                                                                             tmp_path, capsys):
    folder, out = photos(tiny_data, tmp_path, 2), tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text("mine\n")
    assert run_predict("--checkpoint", checkpoints["ovd"], "--images", folder, "--out", out) == 2
    assert "predictions.jsonl exists and no prediction run wrote it" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_text() == "mine\n" and sorted(p.name for p in out.iterdir()) == [
        "predictions.jsonl"]
    (folder / "broken.png").write_bytes(b"not a png")
    assert run_predict("--checkpoint", checkpoints["ovd"], "--images", folder, "--out", tmp_path / "new") == 0
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert (summary["images"], summary["predicted"], summary["skipped"]) == (3, 2, 1)
    assert "broken.png" in summary["skipped_first"][0]
    assert "1 skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_write_the_files_of_one(checkpoints, tiny_data, tmp_path):
    """torchrun with 2 CPU processes: each predicts its share, rank 0 merges; the files equal one process's."""
    folder = photos(tiny_data, tmp_path, 3)
    common = ["--checkpoint", str(checkpoints["ovd"]), "--images", str(folder), "--classes", ",".join(BASE + NOVEL),
              "--batch-size", "1", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads per process: kernels round alike
    for processes, out in (("1", "one"), ("2", "two")):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", processes,
                        "-m", "finegrain", "predict", *common, "--out", str(tmp_path / out)], check=True, env=env,
                       timeout=300, capture_output=True)
    assert sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) == ["rank0.jsonl", "rank1.jsonl"]
    for name in ("predictions.jsonl", "detections.json", "images.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


# ----- finegrain viz through the same layer -------------------------------------------------------------
def run_viz(*args):
    from finegrain.cli import main

    return main(["viz", *map(str, args), "--device", "cpu"])


def test_viz_detections_draws_an_open_vocabulary_checkpoint_on_its_records_and_on_new_images(checkpoints, tiny_data,
                                                                                              tmp_path):
    """F-ViT checkpoints used to fail (no test_scale); --images without --data used to be ignored."""
    assert run_viz("detections", "--checkpoint", checkpoints["ovd"], "--max-images", "2", "--score-threshold", "0",
                   "--out-dir", tmp_path / "records") == 0
    assert len(list((tmp_path / "records").iterdir())) == 2
    folder = photos(tiny_data, tmp_path, 2)
    assert run_viz("detections", "--checkpoint", checkpoints["ovd"], "--images", folder, "--classes",
                   f"{NOVEL[0]},a purple hexagon", "--out-dir", tmp_path / "new") == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(p.stem + ".png" for p in folder.iterdir())
    with Image.open(next((tmp_path / "new").iterdir())) as picture, Image.open(
            next((tmp_path / "records").iterdir())) as with_truth:
        assert picture.width < with_truth.width  # one panel, no ground truth beside it


def test_viz_segmentation_draws_a_segmenter_and_a_clip_on_new_images(checkpoints, tiny_data, tmp_path, capsys):
    folder = photos(tiny_data, tmp_path, 2)
    assert run_viz("segmentation", "--checkpoint", checkpoints["seg"], "--images", folder, "--out-dir",
                   tmp_path / "seg") == 0
    assert len(list((tmp_path / "seg").iterdir())) == 2
    assert run_viz("segmentation", "--model", "finegrain-tiny", "--images", folder, "--out-dir", tmp_path / "clip") == 2
    assert "give the class names" in capsys.readouterr().err
    assert run_viz("segmentation", "--model", "finegrain-tiny", "--images", folder, "--classes", "red circle,sky",
                   "--out-dir", tmp_path / "clip") == 0


def test_a_records_source_that_is_a_folder_says_so(tmp_path):
    from finegrain.config import DataSourceConfig

    with pytest.raises(FileNotFoundError, match="is a folder, not a records file"):
        resolve_source(DataSourceConfig(path=str(tmp_path)))
