"""CLIP_benchmark's zero-shot classification and retrieval evaluators, run in-process on a model exported
by ``finegrain export`` (loaded by open_clip alone) and on a FinegrainCLIP, give our numbers on the same
records, transform and prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from photos import PHOTOS
from test_zero_shot_data import FOLDER, write_image_folder

from finegrain.data.readers import read_caption_list, read_image_folder
from finegrain.eval import evaluate_retrieval, evaluate_zero_shot
from finegrain.eval.clip_benchmark import (
    _accuracy_breaks,
    evaluate_clip_benchmark_retrieval,
    evaluate_clip_benchmark_zero_shot,
    topk_accuracy,
)
from finegrain.models import create_model, export_local_dir, get_tokenizer

pytest.importorskip("clip_benchmark.metrics.zeroshot_classification",
                    reason="CLIP_benchmark is not installed (pip install 'finegrain[benchmark]')")

ZERO_SHOT = ("acc1", "acc5", "mean_per_class_recall")
RECALLS = tuple(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random finegrain-test model, its tokenizer, and its export loaded by open_clip (model, val
    transform, tokenizer)."""
    torch.manual_seed(0)
    model = create_model("finegrain-test")
    out = export_local_dir(model, tmp_path_factory.mktemp("exported"))
    exported, _, transform = open_clip.create_model_and_transforms(f"local-dir:{out}")
    return model, get_tokenizer("finegrain-test"), exported, transform, open_clip.get_tokenizer(f"local-dir:{out}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The 13 photos and crops of ``FOLDER`` in 8 classes plus an unreadable image, as an ImageFolder, and
    a caption list over the same files (plus an entry without captions)."""
    root = tmp_path_factory.mktemp("benchmark")
    write_image_folder(root)
    (root / "spoon" / "broken.png").write_bytes(b"not a png")
    entries = [{"image": rel, "caption": list(PHOTOS[name].captions) if box is None else
                [f"the {rel.split('/')[0]} in the {name} photo"]} for rel, name, box in FOLDER]
    entries += [{"image": "spoon/broken.png", "caption": "a broken file"}, {"image": "table/none.png", "caption": []}]
    (root / "list.json").write_text(json.dumps(entries))
    return root


def test_zero_shot_equals_ours_on_export_and_on_finegrain_model(models, data):
    model, tokenizer, exported, transform, exported_tokenizer = models
    records = read_image_folder(data)
    ours = evaluate_zero_shot(model, records, data, transform, tokenizer, templates="vild", batch_size=4,
                              progress=False)
    for m, tok in ((exported, exported_tokenizer), (model, tokenizer)):
        theirs = evaluate_clip_benchmark_zero_shot(m, records, data, transform, tok, templates="vild",
                                                   batch_size=4, progress=False)
        counts = (theirs["num_images"], theirs["skipped_images"])
        assert counts == (ours["num_images"], ours["skipped_images"]) == (13, 1)
        assert {k: theirs[k] for k in ZERO_SHOT} == {k: pytest.approx(ours[k], rel=1e-6) for k in ZERO_SHOT}
    assert 0 < ours["acc5"] < 100  # a random model, neither perfect nor hopeless on 8 classes


def test_zero_shot_with_fewer_than_5_classes_has_no_acc5(models, data):
    model, tokenizer, _, transform, _ = models
    records = [r for r in read_image_folder(data) if r.label in ("cat", "cup", "rocket")]
    ours = evaluate_zero_shot(model, records, data, transform, tokenizer, progress=False)
    theirs = evaluate_clip_benchmark_zero_shot(model, records, data, transform, tokenizer, progress=False)
    assert "acc5" not in theirs and ours["acc5"] == 100.0  # CLIP_benchmark: NaN, left out
    assert theirs["acc1"] == pytest.approx(ours["acc1"]) and theirs["num_images"] == 7


def test_retrieval_equals_ours_on_export_and_on_finegrain_model(models, data):
    model, tokenizer, exported, transform, exported_tokenizer = models
    records = read_caption_list(data / "list.json")
    ours = evaluate_retrieval(model, records, data, transform, tokenizer, batch_size=4, progress=False)
    counts = {"num_images": 13, "num_texts": 17, "skipped_images": 1, "uncaptioned_images": 1}
    assert {k: ours[k] for k in counts} == counts
    for m, tok in ((exported, exported_tokenizer), (model, tokenizer)):
        theirs = evaluate_clip_benchmark_retrieval(m, records, data, transform, tok, batch_size=4, progress=False)
        assert {k: theirs[k] for k in counts} == counts
        assert {k: theirs[k] for k in RECALLS} == {k: pytest.approx(ours[k], rel=1e-6) for k in RECALLS}
    assert 0 < ours["text_retrieval_recall@5"] < 100


def test_numpy_breakage_is_patched_only_while_running(models, data):
    from clip_benchmark.metrics import zeroshot_classification as module

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 1, 0])
    # top-1: row 0; top-2: rows 0 and 1 (0.15 second); top-3: all
    assert topk_accuracy(logits, targets, (1, 2, 3)) == [1 / 3, 2 / 3, 1.0]
    numpy_2_4 = tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4)
    assert _accuracy_breaks(module) == numpy_2_4
    if numpy_2_4:
        with pytest.raises(TypeError):
            module.accuracy(logits, targets)
    else:
        assert module.accuracy(logits, targets, (1, 2, 3)) == topk_accuracy(logits, targets, (1, 2, 3))
    original, bar = module.accuracy, module.tqdm
    model, tokenizer, _, transform, _ = models
    evaluate_clip_benchmark_zero_shot(model, read_image_folder(data), data, transform, tokenizer, progress=False)
    assert module.accuracy is original and module.tqdm is bar


def test_no_readable_image_raises(models, tmp_path):
    model, tokenizer, _, transform, _ = models
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    shutil.copy(tmp_path / "a" / "x.png", tmp_path / "a" / "y.png")
    with pytest.raises(ValueError, match="clip_benchmark_zero_shot: none of the 2 images could be used"):
        evaluate_clip_benchmark_zero_shot(model, read_image_folder(tmp_path), tmp_path, transform, tokenizer,
                                          progress=False)
