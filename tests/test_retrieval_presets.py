"""Retrieval data: Karpathy split json (COCO 5k / Flickr30k 1k layouts), the ``{"image", "caption"}`` list
format, their sources, and retrieval with five captions per image on real photos against an oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from photos import PHOTOS, photo
from PIL import Image
from torch import nn
from torchvision import transforms

from finegrain.config import DataSourceConfig
from finegrain.data.loader import resolve_source
from finegrain.data.readers import read_caption_list, read_karpathy, read_records
from finegrain.data.records import RecordError
from finegrain.eval import evaluate_retrieval


def _sentences(*texts: str) -> list[dict]:
    return [{"raw": text, "tokens": text.lower().split()} for text in texts]


KARPATHY = {"dataset": "coco", "images": [
    {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": _sentences("A cat. ", "A dog.")},
    {"filepath": "val2014", "filename": "b.jpg", "split": "val", "sentences": _sentences("B.")},
    {"filepath": "train2014", "filename": "c.jpg", "split": "train", "sentences": _sentences("C.")},
    {"filepath": "val2014", "filename": "d.jpg", "split": "restval", "sentences": _sentences("D.")},
    {"filepath": "val2014", "filename": "e.jpg", "split": "test", "sentences": [{"tokens": ["e"]}]},
    {"filepath": "val2014", "filename": "f.jpg", "split": "test", "sentences": []},
    {"filename": "g.jpg", "sentences": _sentences("G.")},
]}


def test_read_karpathy_test_split_exact_records(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(KARPATHY))
    records = read_karpathy(path)
    assert [(r.image, r.captions, r.key) for r in records] == [
        ("val2014/a.jpg", ("A cat.", "A dog."), f"{path}: images[0]"),
        ("val2014/f.jpg", (), f"{path}: images[5]")]  # no sentences: kept, retrieval counts it
    assert records.failures == [
        (f"{path}: images[4]", f"{path}: images[4]: field 'sentences[0].raw' must be a string"),
        (f"{path}: images[6]", f"{path}: images[6]: field 'split' must be a string (train, val, test or restval)")]
    assert [r.image for r in read_karpathy(path, "train+restval")] == ["train2014/c.jpg", "val2014/d.jpg"]
    with pytest.raises(RecordError, match=r"images\[4\]: field 'sentences\[0\].raw'"):
        read_karpathy(path, strict=True)
    with pytest.raises(RecordError, match=r"no image of split \['tset'\]; the splits found are \['restval', "
                                          r"'test', 'train', 'val'\]"):
        read_karpathy(path, "tset")


def test_karpathy_file_needs_its_split_and_flickr_has_no_filepath(tmp_path):
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": [{"filename": "1000092795.jpg", "split": "test",
                                            "sentences": _sentences("Two young guys.")}]}))
    with pytest.raises(RecordError, match=rf"a Karpathy split file; choose its split: karpathy:{path}@test"):
        read_records(path)
    records, root = resolve_source(DataSourceConfig(path=f"karpathy:{path}"))
    assert [(r.image, r.captions) for r in records] == [("1000092795.jpg", ("Two young guys.",))]
    assert root == tmp_path
    with pytest.raises(RecordError, match=r"no image of split \['val'\]"):
        resolve_source(DataSourceConfig(path=f"karpathy:{path}@val", root="/images"))
    folder = tmp_path / "a@b"  # an @ in a folder name is not a split
    folder.mkdir()
    (folder / "d.json").write_text(path.read_text())
    assert len(resolve_source(DataSourceConfig(path=f"karpathy:{folder / 'd.json'}"))[0]) == 1
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        resolve_source(DataSourceConfig(path=f"karpathy:{tmp_path / 'missing.json'}@test"))


def test_read_caption_list_strings_lists_merged_entries_and_bad_ones(tmp_path):
    path = tmp_path / "coco_test.json"
    path.write_text(json.dumps([
        {"image": "val2017/1.jpg", "caption": ["One. ", "Uno."]},  # FineCLIP / BLIP test files: a list
        {"image": "val2017/2.jpg", "caption": "Two.", "image_id": 2},  # BLIP training files: one per entry
        "not an entry",
        {"image": "val2017/2.jpg", "caption": "Deux."},
        {"image": "val2017/3.jpg", "caption": ["Three.", 3]},
        {"caption": "no image"},
        {"image": "val2017/4.jpg", "caption": []},
    ]))
    records = read_caption_list(path)
    assert [(r.image, r.captions, r.key) for r in records] == [
        ("val2017/1.jpg", ("One.", "Uno."), f"{path}: [0]"), ("val2017/2.jpg", ("Two.", "Deux."), f"{path}: [1]"),
        ("val2017/4.jpg", (), f"{path}: [6]")]
    assert [message for _, message in records.failures] == [
        f"{path}: [2]: must be an object with 'image' and 'caption', got str",
        f"{path}: [4]: field 'caption' must be a string or a list of strings",
        f"{path}: [5]: field 'image' must be a non-empty path string"]
    assert [r.captions for r in read_records(path)] == [r.captions for r in records]  # a list: detected
    with pytest.raises(RecordError, match=r"coco_test.json: \[2\]: must be an object"):
        read_caption_list(path, strict=True)
    path.write_text(json.dumps({"image": "x.jpg"}))
    with pytest.raises(RecordError, match="expected a JSON list of {'image', 'caption'} entries, got dict"):
        read_caption_list(path)


# ----- retrieval with five captions per image, three layouts, one oracle ---------------------------------

NAMES = list(PHOTOS)  # astronaut, coffee, chelsea, rocket
CAPTIONS = {name: [*PHOTOS[name].captions, *(f"{PHOTOS[name].captions[0]}, view {k}" for k in range(3))]
            for name in NAMES}
STRAY = CAPTIONS["rocket"][4]  # the oracle embeds this rocket caption next to the astronaut, twice as strong
TRANSFORM = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])


class RetrievalOracle(nn.Module):
    """Images: the one-hot of the photo (told apart by mean colour); captions: the one-hot of their photo,
    except ``STRAY``, which is 2x the astronaut's. Texts reach it through ``tokenizer`` as indices."""

    def __init__(self):
        super().__init__()
        self.signatures = torch.stack([TRANSFORM(photo(name)).mean(dim=(1, 2)) for name in NAMES])
        assert torch.pdist(self.signatures).min() > 1e-3
        self.texts = [text for name in NAMES for text in CAPTIONS[name]]
        self.text_emb = torch.stack([2 * F.one_hot(torch.tensor(0), 4).float() if text == STRAY else
                                     F.one_hot(torch.tensor(i // 5), 4).float() for i, text in enumerate(self.texts)])

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.one_hot(torch.cdist(images.mean(dim=(2, 3)), self.signatures).argmin(dim=1), 4).float()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.text_emb[tokens[:, 0]]

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.texts.index(text)] for text in texts])


def write_retrieval_set(root: Path, layout: str) -> str:
    """The four photos with five captions each, an image without captions and an unreadable one with
    captions, in ``layout``; returns the data source."""
    folder = "" if layout == "flickr" else "val2014" if layout == "coco" else "val2017"
    (root / folder).mkdir(exist_ok=True)
    for name in NAMES:
        photo(name).save(root / folder / f"{name}.jpg")
    Image.new("RGB", (8, 8)).save(root / folder / "blank.jpg")
    (root / folder / "broken.jpg").write_bytes(b"not a jpeg")
    items = [(name, CAPTIONS[name]) for name in NAMES] + [("blank", []), ("broken", ["a broken file"])]
    if layout == "list":
        entries = [{"image": f"val2017/{name}.jpg", "caption": captions} for name, captions in items]
        (root / "coco_test.json").write_text(json.dumps(entries))
        return str(root / "coco_test.json")
    images = [{"filename": f"{name}.jpg", "split": "test", "sentences": _sentences(*captions)}
              | ({"filepath": folder} if folder else {}) for name, captions in items]
    images.append({"filename": "other.jpg", "split": "train", "sentences": _sentences("other")})
    (root / "dataset.json").write_text(json.dumps({"images": images}))
    return f"karpathy:{root / 'dataset.json'}@test"


@pytest.mark.parametrize("layout", ["coco", "flickr", "list"])
def test_retrieval_with_five_captions_per_image_gives_the_oracle_recalls(tmp_path, layout, caplog):
    records, root = resolve_source(DataSourceConfig(path=write_retrieval_set(tmp_path, layout)))
    assert len(records) == 6 and [len(r.captions) for r in records] == [5, 5, 5, 5, 0, 1]
    oracle = RetrievalOracle()
    m = evaluate_retrieval(oracle, records, root, TRANSFORM, oracle.tokenizer, batch_size=3, progress=False)
    assert {k: m[k] for k in ("num_images", "num_texts", "skipped_images", "uncaptioned_images")} == {
        "num_images": 4, "num_texts": 20, "skipped_images": 1, "uncaptioned_images": 1}
    # text -> image: all 20 captions find their photo first but STRAY, which ranks the rocket 4th (after the
    # astronaut at 2 and two photos tied with it at 0); image -> text: the astronaut's own captions (1) lose
    # to STRAY (2), so it ranks 2nd; the other photos rank 1st
    assert m["image_retrieval_recall@1"] == pytest.approx(100 * 19 / 20)
    assert m["text_retrieval_recall@1"] == pytest.approx(100 * 3 / 4)
    assert all(m[f"{d}_retrieval_recall@{k}"] == 100.0 for d in ("image", "text") for k in (5, 10))
    assert "skipped 1 of 6 records without captions" in caplog.text and "skipped 1 of 5 images" in caplog.text
