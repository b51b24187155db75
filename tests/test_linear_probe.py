"""Linear-probe segmentation (finegrain eval's ``linear_probe``, a finetune-seg run with the linear head): the head
against a hand-written reference, and probes on a synthetic task whose labels the frozen features determine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.eval.jobs import EvalJob
from finegrain.finetune.segmentation import LinearSegmentationHead
from finegrain.linear_probe import run_linear_probe

PALETTE = np.array([(220, 30, 30), (30, 200, 30), (30, 30, 220), (255, 255, 255)], dtype=np.uint8)


def test_head_resizes_concatenates_normalises_and_projects():
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 4, 6), torch.randn(2, 5, 2, 3)]
    head = LinearSegmentationHead(8, 4)
    with torch.no_grad():
        head.norm.running_mean.copy_(torch.randn(8))
        head.norm.running_var.copy_(torch.rand(8) + 0.5)
        head.norm.weight.copy_(torch.randn(8))
        head.norm.bias.copy_(torch.randn(8))
    head.eval()
    features = torch.cat([maps[0], F.interpolate(maps[1], size=(4, 6), mode="bilinear", align_corners=False)], 1)
    norm = head.norm
    normed = ((features - norm.running_mean[:, None, None]) / (norm.running_var[:, None, None] + norm.eps).sqrt()
              * norm.weight[:, None, None] + norm.bias[:, None, None])
    expected = torch.einsum("bchw,kc->bkhw", normed, head.classifier.weight[:, :, 0, 0]) \
        + head.classifier.bias[:, None, None]
    logits, auxiliary = head(maps)
    assert torch.allclose(logits, expected, atol=1e-5) and auxiliary is None
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.5)
    assert torch.all(head.classifier.bias == 0)


def write_blocks(root, num_train, num_val, seed):
    """A segfolder layout: 64x64 images of 16x16 blocks in red / green / blue (classes 0-2) or white (ignored,
    255) under images/ and labels/, stems listed in train.txt and val.txt."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    stems = [str(i) for i in range(num_train + num_val)]
    for stem in stems:
        blocks = rng.integers(0, 4, size=(4, 4))
        Image.fromarray(PALETTE[blocks].repeat(16, 0).repeat(16, 1)).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.where(blocks == 3, 255, blocks).astype(np.uint8).repeat(16, 0).repeat(16, 1)).save(
            root / "labels" / f"{stem}.png")
    (root / "train.txt").write_text("\n".join(stems[:num_train]) + "\n")
    (root / "val.txt").write_text("\n".join(stems[num_train:]) + "\n")
    return root


def probe(tmp_path, name, **options):
    job = EvalJob(name, "linear_probe", f"segfolder:{tmp_path / 'blocks'}",
                  options={"class_names": ["red", "green", "blue"], "short_side": 64,
                           "overrides": ["data.num_workers=0", "method.photometric=false"], **options})
    return run_linear_probe(job, "finegrain-test", None, 32, tmp_path / "eval", batch_size=8, device="cpu",
                            progress=False)


def test_probe_learns_colour_regions_from_frozen_features_in_a_run_folder(tmp_path):
    write_blocks(tmp_path / "blocks", 8, 3, seed=1)
    metrics = probe(tmp_path, "probe", iterations=60)
    assert metrics["miou"] > 90 and metrics["macc"] > 90 and metrics["aacc"] > 90
    assert (metrics["num_images"], metrics["skipped_images"], metrics["skipped_train_images"]) == (3, 0, 0)
    (run,) = (tmp_path / "eval").iterdir()  # one finetune-seg run folder under the eval output folder
    assert run.name.startswith("probe-")
    config = (run / "config.yaml").read_text()
    assert "name: finetune-seg" in config and "head: linear" in config and "frozen: true" in config
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 60 and metrics["train_loss"] == pytest.approx(np.mean(losses[-6:]))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_unreadable_training_pairs_are_skipped_and_counted_and_unknown_options_refused(tmp_path):
    write_blocks(tmp_path / "blocks", 10, 1, seed=1)
    (tmp_path / "blocks" / "images" / "1.png").write_bytes(b"broken")
    metrics = probe(tmp_path, "probe", iterations=3, overrides=["data.num_workers=0", "data.max_bad_fraction=0.5"])
    assert metrics["skipped_train_images"] >= 1 and metrics["num_images"] == 1
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['optimizer'\]; linear_probe takes"):
        probe(tmp_path, "probe", optimizer="sgd")


def test_eval_demo_linear_probe_benchmark_runs_through_the_cli_with_the_same_result_keys(tmp_path, monkeypatch,
                                                                                           capsys):
    from finegrain.cli import main
    from finegrain.data.demo import make_demo_dataset

    make_demo_dataset(tmp_path / "cache" / "demo-v3", num_train=16, num_val=4)
    monkeypatch.setenv("FINEGRAIN_CACHE", str(tmp_path / "cache"))
    assert main(["eval", "--model", "finegrain-test", "--benchmark", "demo-linear-probe", "--option", "iterations=2",
                 "--option", "overrides=[data.num_workers=0]", "--batch-size", "4", "--output-dir",
                 str(tmp_path / "out"), "--json", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {f"demo-linear-probe/{key}" for key in ("miou", "macc", "aacc", "num_images", "skipped_images",
                                                   "train_loss", "skipped_train_images")} <= set(metrics)
    assert metrics["demo-linear-probe/num_images"] == 4
    runs = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert len(runs) == 1 and runs[0].name.startswith("demo-linear-probe-") and (runs[0] / "config.yaml").is_file()
    entry = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[-1])
    assert entry["benchmark"] == "demo-linear-probe" and entry["task"] == "linear_probe"
