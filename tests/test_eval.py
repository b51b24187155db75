"""finegrain.eval: metrics against hand-computed values, and the evaluators' plumbing end to end."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from torchvision import transforms

from finegrain.data.readers import read_records
from finegrain.data.records import Record, Region
from finegrain.eval import (
    class_text_embeddings,
    classification_metrics,
    crop_box,
    evaluate,
    evaluate_box_classification,
    evaluate_retrieval,
    evaluate_zero_shot,
    evaluating,
    predict_boxes,
    retrieval_metrics,
)
from finegrain.models import create_model, get_tokenizer

TASKS = ["retrieval", "box_classification", "zero_shot"]  # the record protocols with no extra to install

# ----- retrieval_metrics --------------------------------------------------------------------------------


def test_retrieval_metrics_hand_computed_with_multi_caption_image():
    images = torch.eye(3)  # score(text, image i) = text[i]
    texts = torch.tensor([[0.1, 0.9, 0.0],   # image 0, rank 1 (image 1 higher)
                          [1.0, 0.0, 0.0],   # image 0, rank 0
                          [0.0, 0.2, 0.8],   # image 1, rank 1 (image 2 higher)
                          [0.5, 0.4, 0.3]])  # image 2, rank 2
    text_to_image = torch.tensor([0, 0, 1, 2])
    # i2t: image 0's best caption (text 1, 1.0) beats all -> rank 0; image 1's caption (0.2) is beaten by
    # texts 0 (0.9) and 3 (0.4) -> rank 2; image 2's caption (0.3) by text 2 (0.8) -> rank 1.
    m = retrieval_metrics(images, texts, text_to_image)
    assert m["image_retrieval_recall@1"] == pytest.approx(25.0)
    assert m["text_retrieval_recall@1"] == pytest.approx(100 / 3)
    assert m["image_retrieval_recall@5"] == m["image_retrieval_recall@10"] == m["text_retrieval_recall@5"] == m["text_retrieval_recall@10"] == pytest.approx(100.0)
    assert (m["num_images"], m["num_texts"]) == (3, 4)


def test_retrieval_metrics_recall_at_5_and_10():
    n = 12
    ranks = [0, 4, 5, 10] + [0] * (n - 4)  # wanted rank of text j's image (image j)
    texts = torch.zeros(n, n)
    for j, r in enumerate(ranks):
        texts[j, j] = 0.5
        others = [i for i in range(n) if i != j][:r]
        texts[j, others] = 1.0
    m = retrieval_metrics(torch.eye(n), texts, torch.arange(n))
    assert m["image_retrieval_recall@1"] == pytest.approx(100 * 9 / 12)
    assert m["image_retrieval_recall@5"] == pytest.approx(100 * 10 / 12)
    assert m["image_retrieval_recall@10"] == pytest.approx(100 * 11 / 12)


def test_retrieval_metrics_matches_sorting_reference():
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(20, 8, generator=gen), dim=-1)
    text_to_image = torch.cat([torch.arange(20), torch.randint(0, 20, (30,), generator=gen)])
    texts = F.normalize(images[text_to_image] + 0.8 * torch.randn(50, 8, generator=gen), dim=-1)
    sim = images @ texts.T
    m = retrieval_metrics(images, texts, text_to_image)
    for k in (1, 5, 10):
        i2t = [bool(set(sim[i].argsort(descending=True)[:k].tolist()) & set((text_to_image == i).nonzero()
                                                                             .flatten().tolist()))
               for i in range(20)]
        t2i = [int(text_to_image[j]) in sim[:, j].argsort(descending=True)[:k].tolist() for j in range(50)]
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(100 * sum(i2t) / 20)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(100 * sum(t2i) / 50)


def test_retrieval_metrics_with_identical_captions_hand_computed():
    """Identical captions tie exactly; here every tie lies wholly inside or outside the top K."""
    dog, cat = [1.0, 0.0], [0.0, 1.0]
    texts = torch.tensor([dog, dog, cat, dog])  # image 0: two identical captions; image 2's caption is the same
    text_to_image = torch.tensor([0, 0, 1, 2])
    images = torch.tensor([[2.0, 3.0], [0.0, 4.0], [1.0, 2.0]])
    # image->text: image 0 scores cat 3 (not its own) above the three dogs (2) -> missed at 1, found at 5;
    # image 1's cat (4) is first; image 2 scores cat 2 above the dogs (1) -> missed at 1.
    # text->image: dog scores images 0, 2, 1 as 2, 1, 0 -> texts 0 and 1 found at 1, text 3 (image 2) at 5;
    # cat scores image 1 highest (4).
    m = retrieval_metrics(images, texts, text_to_image)
    assert m["text_retrieval_recall@1"] == pytest.approx(100 / 3)
    assert m["image_retrieval_recall@1"] == pytest.approx(75.0)
    assert m["text_retrieval_recall@5"] == m["image_retrieval_recall@5"] == pytest.approx(100.0)


def test_retrieval_ties_between_identical_captions_broken_as_clip_benchmark():
    """Captions shared by several images tie exactly with the query's own; the recalls are CLIP_benchmark's
    (``recall_at_k`` over its score matrix ``texts @ images.T`` and its transpose), where counting ties
    against the query gave i2t R@5 0 instead of about 42."""
    zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 3, (12, 3), generator=gen).float()  # small integers: exact scores, exact ties
    texts = torch.randint(0, 3, (4, 3), generator=gen).float()[torch.randint(0, 4, (24,), generator=gen)]
    text_to_image = torch.arange(12).repeat_interleave(2)  # 2 captions per image, drawn from 4 distinct ones
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(24), text_to_image] = True
    m = retrieval_metrics(images, texts, text_to_image, chunk_size=5)
    for k in (1, 5, 10):
        theirs = {"image_retrieval": zeroshot_retrieval.recall_at_k(scores, positive, k),
                  "text_retrieval": zeroshot_retrieval.recall_at_k(scores.T, positive.T, k)}
        for direction, recall in theirs.items():
            assert m[f"{direction}_recall@{k}"] == pytest.approx(100 * (recall > 0).float().mean().item())


def test_retrieval_metrics_bad_input_raises():
    with pytest.raises(ValueError, match=r"images \[2\] have no text"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must index"):
        retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 3]))


# ----- classification_metrics ---------------------------------------------------------------------------


def test_classification_metrics_hand_computed():
    logits = torch.tensor([[9., 1., 2., 3., 4., 5.],   # target 0: rank 0
                           [5., 3., 4., 9., 0., 0.],   # target 1: 3 classes higher -> rank 3 (top-5 only)
                           [1., 2., 0., 3., 4., 5.],   # target 2: 5 classes higher -> rank 5 (neither)
                           [0., 0., 7., 1., 1., 1.],   # target 2: rank 0
                           [0., 0., 7., 7., 1., 1.]])  # target 2: tie with class 3 -> rank 1
    targets = torch.tensor([0, 1, 2, 2, 2])
    m = classification_metrics(logits, targets)
    assert m["acc1"] == pytest.approx(100 * 2 / 5)
    assert m["acc5"] == pytest.approx(100 * 4 / 5)
    # per class top-1: class 0 1/1, class 1 0/1, class 2 1/3 (absent classes 3-5 are not averaged)
    assert m["mean_per_class_recall"] == pytest.approx(100 * (1 + 0 + 1 / 3) / 3)
    with pytest.raises(ValueError):
        classification_metrics(logits, targets[:3])


# ----- fixtures: images, records and an oracle model ----------------------------------------------------

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 40), "magenta": (210, 40, 210), "cyan": (40, 210, 210)}
NAMES = list(PALETTE)
ORIG_W, ORIG_H = 80, 48  # not square, not the model size: boxes must be scaled differently in x and y
BOX_SCENES = [
    [("red", (4, 4, 36, 28)), ("blue", (44, 16, 76, 44))],
    [("green", (8, 20, 40, 46)), ("yellow", (48, 2, 78, 26)), ("red", (46, 30, 78, 46))],
    [("cyan", (2, 6, 26, 42)), ("magenta", (34, 8, 74, 40))],
]


def write_dataset(root: Path) -> list[Record]:
    """Box scenes (labelled regions, no captions) and plain-colour images (image label + captions)."""
    records = []
    for i, scene in enumerate(BOX_SCENES):
        image = Image.new("RGB", (ORIG_W, ORIG_H), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for colour, box in scene:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=PALETTE[colour])
        image.save(root / f"boxes{i}.png")
        regions = tuple(Region(box, caption=f"a {colour} box", label=colour) for colour, box in scene)
        records.append(Record(f"boxes{i}.png", regions=regions, width=ORIG_W, height=ORIG_H, key=f"boxes{i}"))
    for colour in NAMES[::-1]:
        Image.new("RGB", (40, 30), PALETTE[colour]).save(root / f"{colour}.png")
        captions = (f"a {colour} picture", f"all {colour}") if colour in ("red", "cyan") else (f"{colour}",)
        records.append(Record(f"{colour}.png", captions=captions, label=colour, key=colour))
    return records


def colour_tokenizer(texts: list[str]) -> torch.Tensor:
    """``(N, 1)``: the index of the one palette colour named in each text."""
    found = [[NAMES.index(w) for w in re.findall(r"[a-z]+", t) if w in PALETTE] for t in texts]
    assert all(len(f) == 1 for f in found), texts
    return torch.tensor(found)


class OracleModel(nn.Module):
    """Perfect by construction: pixels embed as the one-hot of the nearest palette colour (an image by the
    mean of its central half; the dense map pixel by pixel, so a box's RoI embedding is its colour
    histogram), text as the one-hot of the colour it names. It also checks that it is called in eval mode
    without gradients."""

    image_size = (32, 32)
    patch_size = (1, 1)

    def __init__(self):
        super().__init__()
        self.child = nn.Linear(1, 1)
        self.palette = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255

    def _one_hot(self, colours: torch.Tensor) -> torch.Tensor:  # (N, 3) -> (N, C)
        assert not self.training and not self.child.training and not torch.is_grad_enabled()
        return F.one_hot(torch.cdist(colours, self.palette).argmin(dim=1), len(PALETTE)).float()

    @staticmethod
    def _centre_mean(pixels: torch.Tensor, x0: float, y0: float, x1: float, y1: float) -> torch.Tensor:
        w, h = x1 - x0, y1 - y0
        xs = slice(round(x0 + w / 4), round(x1 - w / 4))
        ys = slice(round(y0 + h / 4), round(y1 - h / 4))
        patch = pixels[:, ys, xs]
        assert patch.numel() > 0, (x0, y0, x1, y1)
        return patch.mean(dim=(1, 2))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        h, w = images.shape[-2:]
        return self._one_hot(torch.stack([self._centre_mean(im, 0, 0, w, h) for im in images]))

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        assert not self.training and not torch.is_grad_enabled()
        return F.one_hot(tokens[:, 0], len(PALETTE)).float()

    def encode_dense(self, images: torch.Tensor, mode: str = "v_only") -> torch.Tensor:
        assert mode == "v_only" and images.shape[-2:] == self.image_size
        b, _, h, w = images.shape
        return self._one_hot(images.permute(0, 2, 3, 1).reshape(-1, 3)).view(b, h, w, -1).permute(0, 3, 1, 2)


ORACLE_TRANSFORM = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32),
                                       transforms.ToTensor()])


# ----- evaluators with the oracle: 100% iff labels, boxes and ordering are wired right ------------------


def test_oracle_scores_perfectly_on_every_task(tmp_path):
    records = write_dataset(tmp_path)
    model = OracleModel()
    model.train()
    model.child.eval()  # a frozen submodule: its own mode must survive evaluation too
    metrics = evaluate(model, list(TASKS), records, tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                       batch_size=2, progress=False)
    counts = {"retrieval/num_images": 6, "retrieval/num_texts": 8, "retrieval/uncaptioned_images": 3, "box_classification/num_boxes": 7,
              "zero_shot/num_images": 6, "retrieval/skipped_images": 0, "zero_shot/skipped_images": 0,
              "box_classification/skipped_images": 0, "box_classification/boxes_clipped": 0,
              "box_classification/boxes_dropped": 0}
    assert {k: metrics.pop(k) for k in counts} == counts
    assert all(k.split("/")[0] in TASKS for k in metrics) and len(metrics) == 6 + 8 + 4
    assert metrics == {k: pytest.approx(100.0) for k in metrics}
    assert model.training and not model.child.training


def test_oracle_box_classification_fails_when_labels_do_not_match(tmp_path):
    """The oracle run above cannot pass by accident: with the region labels rotated it scores 0."""
    records = write_dataset(tmp_path)[:len(BOX_SCENES)]
    rotated = [Record(r.image, regions=tuple(Region(g.box, label=NAMES[(NAMES.index(g.label) + 1) % 6])
                                             for g in r.regions), width=r.width, height=r.height)
               for r in records]
    m = evaluate_box_classification(OracleModel(), rotated, tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                                    class_names=NAMES, progress=False)
    assert m["roi_acc1"] == m["crop_acc1"] == 0.0


def test_box_classification_errors(tmp_path):
    records = write_dataset(tmp_path)
    with pytest.raises(ValueError, match="boxes1: field 'label' 'yellow' is not one of the 3 class names"):
        evaluate_box_classification(OracleModel(), records, tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                                    class_names=["red", "green", "blue"], progress=False)
    cropping = transforms.Compose([transforms.CenterCrop(24), transforms.ToTensor()])
    with pytest.raises(ValueError, match="needs a transform that keeps the size"):
        evaluate_box_classification(OracleModel(), records, tmp_path, cropping, colour_tokenizer,
                                    progress=False)
    with pytest.raises(ValueError, match="needs records with a 'label'"):
        evaluate_zero_shot(OracleModel(), records[:3], tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                           progress=False)
    with pytest.raises(ValueError, match="unknown evaluation task"):
        evaluate(OracleModel(), ["segmentation"], records, tmp_path, ORACLE_TRANSFORM, colour_tokenizer)


def test_crop_box_enlarges_and_clips():
    image = Image.new("RGB", (100, 50))
    assert crop_box(image, (10, 10, 30, 20)).size == (20, 10)
    assert crop_box(image, (10, 10, 30, 20), scale=2.0).size == (40, 20)  # [0, 5, 40, 25]
    assert crop_box(image, (90, 40, 100, 50), scale=3.0).size == (20, 20)  # [80, 30, 110, 60] clipped
    assert crop_box(image, (10.2, 10.2, 10.4, 10.4)).size == (1, 1)


# the releases' thing crop (CLIPSelf / FineCLIP COCOPanopticDataset): a COCO [x, y, w, h] box enlarged 1.5x,
# clipped to the image, float corners passed to PIL's crop
RELEASE_CROP_BOXES = [(100, 50, 70, 1), (10, 10, 21, 9), (0.5, 3.25, 33.3, 17.7), (150.62, 40.1, 49.38, 19.9),
                      (2, 97, 6, 3), (61, 33, 42, 14)]


@pytest.mark.parametrize("xywh", RELEASE_CROP_BOXES)
def test_nearest_rounded_crop_is_pils_crop_of_the_releases_float_box(xywh):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8))
    x, y, w, h = xywh
    cx, cy = x + w * 0.5, y + h * 0.5
    released = image.crop((max(cx - w * 0.75, 0), max(cy - h * 0.75, 0), min(cx + w * 0.75, 200),
                           min(cy + h * 0.75, 100)))
    ours = crop_box(image, (x, y, x + w, y + h), 1.5, rounding="nearest")
    assert ours.size == released.size
    assert np.array_equal(np.asarray(ours), np.asarray(released))


def test_thin_box_crop_rounds_to_106x1_as_pil_not_outwards_to_106x3():
    image = Image.new("RGB", (200, 100))
    assert crop_box(image, (100, 50, 170, 51), 1.5, rounding="nearest").size == (106, 1)  # [82.5, 49.75, 187.5, 51.25]
    assert crop_box(image, (100, 50, 170, 51), 1.5).size == (106, 3)  # training crops cover the box


# ----- a real (tiny, random) model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_model("finegrain-test")
    return model, open_clip.image_transform(model.image_size, is_train=False), get_tokenizer("finegrain-test")


def test_box_classification_roi_and_crop_run_on_tiny_model(tmp_path, tiny):
    model, transform, tokenizer = tiny
    model.train()
    records = write_dataset(tmp_path)
    m = evaluate_box_classification(model, records, tmp_path, transform, tokenizer, crop_scale=1.5,
                                    batch_size=2, progress=False)
    keys = {f"{way}_{k}" for way in ("roi", "crop") for k in ("acc1", "acc5", "macc1", "macc5")}
    assert set(m) == keys | {"num_boxes", "boxes_clipped", "boxes_dropped", "skipped_images"}
    assert m["num_boxes"] == 7
    assert all(0.0 <= m[k] <= 100.0 for k in keys)


def test_box_classification_crops_round_float_corners_as_the_release(tiny, monkeypatch):
    """The 1.5x crop of a 70x1 box (corners 82.5, 49.75, 187.5, 51.25) feeds the model exactly the pixels of the
    whole-pixel box PIL cuts from those corners, [82, 50, 188, 51] (106x1), not 106x3."""
    model, _, tokenizer = tiny
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 200, 3), dtype=np.uint8))
    seen, encode = [], model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda images, **kw: seen.append(images) or encode(images, **kw))
    classifier = F.normalize(model.encode_text(tokenizer(["a red box", "a blue box"])), dim=-1).detach()
    predict_boxes(model, image, [[100, 50, 170, 51]], classifier, way="crop", crop_scale=1.5)
    predict_boxes(model, image, [[82, 50, 188, 51]], classifier, way="crop")
    torch.testing.assert_close(seen[0], seen[1], atol=0, rtol=0)
    assert model.training


def test_class_text_embeddings_is_normalised_template_mean(tiny):
    model, _, tokenizer = tiny
    templates = ["a photo of a {}.", "a {} in the scene."]
    emb = class_text_embeddings(model, tokenizer, ["red", "blue"], templates, progress=False)
    with torch.no_grad():
        prompts = tokenizer(["a photo of a blue.", "a blue in the scene."])
        per_prompt = model.encode_text(prompts, normalize=True)
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb[1], F.normalize(per_prompt.mean(dim=0), dim=-1))


def test_evaluate_all_tasks_on_demo_records(tmp_path, tiny):
    from finegrain.data.demo import make_demo_dataset

    model, transform, tokenizer = tiny
    root = make_demo_dataset(tmp_path, num_train=0, num_val=8)
    records = read_records(root / "val.jsonl")
    labelled = [Record(r.image, r.captions, r.regions, r.width, r.height, label=r.regions[0].label)
                for r in records]
    metrics = evaluate(model, ["retrieval", "box_classification", "zero_shot"], labelled, root, transform,
                       tokenizer, batch_size=4, progress=False)
    assert metrics["retrieval/num_images"] == 8 and metrics["zero_shot/num_images"] == 8
    assert metrics["box_classification/num_boxes"] == sum(len(r.regions) for r in records)
    assert all(0.0 <= v <= 100.0 for k, v in metrics.items() if "/num_" not in k)


def test_evaluating_restores_modes_and_disables_grad():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    model[1].eval()
    with evaluating(model):
        assert not model.training and not model[0].training and not torch.is_grad_enabled()
    assert model.training and model[0].training and not model[1].training and torch.is_grad_enabled()


def test_retrieval_skips_uncaptioned_records_with_a_warning(tmp_path, caplog):
    records = write_dataset(tmp_path)
    m = evaluate_retrieval(OracleModel(), records, tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                           progress=False)
    assert m["text_retrieval_recall@1"] == m["image_retrieval_recall@1"] == 100.0 and (m["num_images"], m["num_texts"]) == (6, 8)
    assert "skipped 3 of 9 records without captions" in caplog.text


def test_unreadable_images_and_wrong_sizes_are_skipped_and_reported(tmp_path, caplog):
    records = write_dataset(tmp_path)
    (tmp_path / "boxes1.png").write_bytes(b"not a png")  # 3 boxes
    (tmp_path / "red.png").write_bytes(b"")  # 2 captions, label red
    swapped = records[2]  # 2 boxes; its record says 48x80 for the 80x48 image
    records[2] = Record(swapped.image, regions=swapped.regions, width=ORIG_H, height=ORIG_W, key=swapped.key)
    metrics = evaluate(OracleModel(), list(TASKS), records, tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                       batch_size=2, progress=False)
    counts = {"retrieval/num_images": 5, "retrieval/num_texts": 6, "retrieval/skipped_images": 1,
              "zero_shot/num_images": 5, "zero_shot/skipped_images": 1,
              "box_classification/num_boxes": 2, "box_classification/skipped_images": 2}
    assert {k: metrics[k] for k in counts} == counts
    assert all(v == pytest.approx(100.0) for k, v in metrics.items() if k.endswith("acc1"))
    assert "retrieval: skipped 1 of 6 images" in caplog.text and "red.png" in caplog.text
    assert "box_classification: skipped 2 of 3 images" in caplog.text and "boxes1.png" in caplog.text
    assert "boxes2: fields 'width'/'height' say 48x80" in caplog.text
    for name in ["boxes0.png", *(f"{c}.png" for c in NAMES)]:
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"retrieval: none of the 6 images could be used; first errors: .*png"):
        evaluate_retrieval(OracleModel(), records, tmp_path, ORACLE_TRANSFORM, colour_tokenizer, progress=False)


def test_box_classification_fits_boxes_to_the_image(tmp_path):
    records = write_dataset(tmp_path)[:len(BOX_SCENES)]
    first = records[0]  # 80 x 48: red (4, 4, 36, 28) widened past the left edge, a box wholly outside
    regions = (Region((-30.0, 4.0, 36.0, 28.0), label="red"), first.regions[1],
               Region((90.0, 0.0, 100.0, 10.0), label="green"))
    records[0] = Record(first.image, regions=regions, width=ORIG_W, height=ORIG_H, key=first.key)
    m = evaluate_box_classification(OracleModel(), records, tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                                    class_names=NAMES, progress=False)
    # clipped to (0, 4, 36, 28): its centre half is red again; the outside box is not scored
    assert (m["num_boxes"], m["boxes_clipped"], m["boxes_dropped"]) == (7, 1, 1)
    assert m["roi_acc1"] == m["crop_acc1"] == 100.0


def test_malformed_jsonl_lines_are_left_out_of_evaluation(tmp_path, caplog):
    from finegrain.data.records import write_jsonl

    records = write_dataset(tmp_path)
    path = tmp_path / "val.jsonl"
    write_jsonl(records, path)
    path.write_text(path.read_text() + '{"image": "x.png", "regions": 3}\n'
                    + '{"image": "y.png", "regions": [{"box": [5, 5, 1, 1]}]}\n')
    m = evaluate_retrieval(OracleModel(), read_records(path), tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                           progress=False)
    assert (m["num_images"], m["skipped_images"], m["text_retrieval_recall@1"]) == (6, 0, 100.0)
    assert f"retrieval: skipped 1 malformed record(s); first: {path}:10: field 'regions' must be a list" in caplog.text
    assert f"retrieval: left out 1 malformed region(s); first: {path}:11: field 'regions[0].box'" in caplog.text


def test_a_protocol_registered_once_serves_training_evaluation_and_finegrain_eval(tmp_path, monkeypatch):
    from finegrain.data.records import write_jsonl
    from finegrain.eval.benchmarks import run_benchmark
    from finegrain.eval.protocols import PROTOCOLS, Protocol, record_inputs
    from finegrain.eval.tasks import check_task_data

    def count_images(model, records, root, transform, tokenizer, scale: float = 1.0, batch_size: int = 64,
                     device="cpu", progress=True):
        return {"images": scale * len(records)}

    def needs_labels(records):
        if not any(record.label for record in records):
            raise ValueError("count needs labelled records")

    monkeypatch.setitem(PROTOCOLS, "count", Protocol(count_images, record_inputs, needs_labels))
    records = write_dataset(tmp_path)
    write_jsonl(records, tmp_path / "val.jsonl")
    check_task_data(["retrieval", "count"], records)  # train.eval_tasks may name it
    with pytest.raises(ValueError, match="count needs labelled records"):
        check_task_data(["count"], records[:3])
    assert evaluate(OracleModel(), ["count"], records, tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                    options={"count": {"scale": 2.0}}) == {"count/images": 2.0 * len(records)}
    assert run_benchmark(OracleModel(), "count", "val.jsonl", tmp_path, "", colour_tokenizer, ORACLE_TRANSFORM,
                         {"scale": 2.0}) == {"images": 2.0 * len(records)}  # finegrain eval --task count
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['scal'\]; the protocol takes \['scale'\]"):
        evaluate(OracleModel(), ["count"], records, tmp_path, ORACLE_TRANSFORM, colour_tokenizer,
                 options={"count": {"scal": 2.0}})
    with pytest.raises(ValueError, match=r"unknown evaluation task\(s\) \['segmentation'\]; known: \[.*'count'"):
        check_task_data(["segmentation"], records)  # not a protocol on records
