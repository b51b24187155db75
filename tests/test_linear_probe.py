"""Linear-probe segmentation: block choice, the head against a hand-written reference, the schedule, and
training on a synthetic task whose labels the frozen features determine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finegrain.data.segmentation import SegmentationFolder
from finegrain.eval.linear_probe import (
    LinearSegmentationHead,
    evaluate_linear_probe,
    learning_rate,
    linear_probe,
    probe_blocks,
)
from finegrain.models import create_model

PALETTE = np.array([(220, 30, 30), (30, 200, 30), (30, 30, 220), (255, 255, 255)], dtype=np.uint8)


def test_default_blocks_are_ibots_4_6_8_12_scaled_to_the_depth():
    assert probe_blocks(12) == [3, 5, 7, 11]
    assert probe_blocks(24) == [7, 11, 15, 23]
    assert probe_blocks(2) == [0, 1]
    assert probe_blocks(12, [7, 3, 3]) == [3, 7]
    with pytest.raises(ValueError, match=r"blocks \[3, 5, 7, 11\]: the model has 2 blocks"):
        probe_blocks(2, [3, 5, 7, 11])


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
    assert torch.allclose(head(maps), expected, atol=1e-5)
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.5)
    assert torch.all(head.classifier.bias == 0)


def test_learning_rate_warms_up_linearly_then_decays_poly():
    assert learning_rate(0, 1.0, 10, 2, 1.0) == pytest.approx(1e-6)
    assert learning_rate(1, 1.0, 10, 2, 1.0) == pytest.approx(0.9 * (1e-6 + (1 - 1e-6) * 0.5))
    assert learning_rate(2, 1.0, 10, 2, 1.0) == pytest.approx(0.8)
    assert learning_rate(5, 2.0, 10, 0, 0.9) == pytest.approx(2.0 * 0.5 ** 0.9)


def write_blocks(root, split, num_images, seed):
    """64x64 images of 16x16 blocks in red / green / blue (classes 0-2) or white (ignored, 255)."""
    (root / split / "images").mkdir(parents=True)
    (root / split / "labels").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        blocks = rng.integers(0, 4, size=(4, 4))
        pixels = PALETTE[blocks].repeat(16, 0).repeat(16, 1)
        Image.fromarray(pixels).save(root / split / "images" / f"{i}.png")
        Image.fromarray(np.where(blocks == 3, 255, blocks).astype(np.uint8).repeat(16, 0).repeat(16, 1)).save(
            root / split / "labels" / f"{i}.png")
    return SegmentationFolder(root / split, "images", "labels", ["red", "green", "blue"])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_model("finegrain-test")  # 2 blocks, 32 px, patch 8


def test_probe_learns_colour_regions_from_frozen_features(tmp_path, tiny_model):
    train, val = write_blocks(tmp_path, "train", 8, seed=1), write_blocks(tmp_path, "val", 3, seed=2)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    result = linear_probe(tiny_model, train, val, iterations=60, batch_size=8, short_side=64,
                          progress=False)
    assert result.blocks == [0, 1]
    losses = result.losses
    assert len(losses) == 60 and np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    metrics = result.metrics()
    assert metrics["miou"] > 90 and metrics["macc"] > 90 and metrics["aacc"] > 90
    assert (metrics["num_images"], metrics["skipped_images"], metrics["skipped_train_images"]) == (3, 0, 0)
    assert metrics["train_loss"] == pytest.approx(np.mean(losses[-6:]))
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())  # frozen
    assert not any(p.grad is not None for p in tiny_model.parameters())


def test_probe_is_deterministic_given_the_seed(tmp_path, tiny_model):
    train, val = write_blocks(tmp_path, "train", 4, seed=1), write_blocks(tmp_path, "val", 1, seed=2)
    options = {"iterations": 4, "batch_size": 2, "short_side": 64, "progress": False}
    first = linear_probe(tiny_model, train, val, seed=3, **options)
    again = linear_probe(tiny_model, train, val, seed=3, **options)
    other = linear_probe(tiny_model, train, val, seed=4, optimizer="sgd", **options)
    assert first.losses == again.losses and first.metrics() == again.metrics()
    assert torch.equal(first.head.classifier.weight, again.head.classifier.weight)
    assert other.losses != first.losses


def test_unreadable_training_pairs_are_skipped_and_counted(tmp_path, tiny_model):
    train, val = write_blocks(tmp_path, "train", 3, seed=1), write_blocks(tmp_path, "val", 1, seed=2)
    (tmp_path / "train" / "images" / "1.png").write_bytes(b"broken")
    metrics = evaluate_linear_probe(tiny_model, train, val, iterations=3, batch_size=2, short_side=64,
                                    progress=False)
    assert metrics["skipped_train_images"] == 1 and metrics["num_images"] == 1
    with pytest.raises(ValueError, match="model has 2 blocks"):
        evaluate_linear_probe(tiny_model, train, val, blocks=[3, 5, 7, 11], progress=False)
    for name in ("0.png", "2.png"):
        (tmp_path / "train" / "labels" / name).write_bytes(b"broken")
    with pytest.raises(ValueError, match="none of the 3 images"):
        evaluate_linear_probe(tiny_model, train, val, iterations=2, batch_size=2, progress=False)
