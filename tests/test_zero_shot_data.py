"""Zero-shot classification data: the ImageFolder reader (torchvision's order, relabelling by position,
ImageNet's class order) and zero-shot metrics on an ImageFolder of real photos with an oracle model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from photos import photo
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.datasets import ImageFolder

from finegrain.config import DataSourceConfig
from finegrain.data.loader import resolve_source
from finegrain.data.readers import read_image_folder
from finegrain.data.records import RecordError
from finegrain.eval import evaluate_zero_shot, load_class_names
from finegrain.eval.prompts import TEMPLATE_SETS

# (path under the root, photo, crop box or None for the whole photo), in torchvision's order: class folders
# sorted, then a sorted walk of each (rocket/launch/ after rocket/'s own files)
FOLDER = [
    ("cat/chelsea.png", "chelsea", None),
    ("cat/chelsea_cat.png", "chelsea", (60, 0, 451, 300)),
    ("cup/coffee.JPG", "coffee", None),
    ("cup/coffee_cup.png", "coffee", (170, 15, 415, 300)),
    ("ground/rocket_ground.png", "rocket", (0, 380, 640, 427)),
    ("person/astronaut.png", "astronaut", None),
    ("person/astronaut_person.png", "astronaut", (20, 15, 365, 512)),
    ("rocket/astronaut_rocket.png", "astronaut", (360, 0, 450, 280)),
    ("rocket/rocket.png", "rocket", None),
    ("rocket/launch/rocket_rocket.png", "rocket", (300, 125, 345, 420)),
    ("sky/rocket_sky.png", "rocket", (0, 0, 640, 260)),
    ("spoon/coffee_spoon.png", "coffee", (320, 200, 410, 325)),
    ("wall/chelsea_wall.png", "chelsea", (0, 0, 120, 300)),
]
FOLDERS = ["cat", "cup", "ground", "person", "rocket", "sky", "spoon", "table", "wall"]  # table: empty
TRANSFORM = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])


def write_image_folder(root: Path) -> None:
    """The files of ``FOLDER``, an empty class folder and a file that is not an image."""
    for rel, name, box in FOLDER:
        image = photo(name) if box is None else photo(name).crop(box)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel, format="JPEG" if rel.endswith(".JPG") else "PNG")
    (root / "table").mkdir()
    (root / "cat" / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder")
    write_image_folder(root)
    return root


def test_image_folder_records_in_torchvision_order(folder):
    records = read_image_folder(folder)
    expected = [(rel, rel.split("/")[0]) for rel, _, _ in FOLDER]
    assert [(r.image, r.label) for r in records] == expected
    assert records[0].key == f"{folder}/cat/chelsea.png" and records[0].captions == ()
    reference = ImageFolder(str(folder), allow_empty=True)
    assert reference.classes == FOLDERS
    samples = [(Path(p).relative_to(folder).as_posix(), reference.classes[c]) for p, c in reference.samples]
    assert samples == expected


def test_image_folder_relabels_class_folders_by_position(folder, tmp_path):
    names = [f"class {i}" for i in range(len(FOLDERS))]  # "class 7" is the empty "table" folder
    records = read_image_folder(folder, names)
    assert [r.label for r in records] == [names[FOLDERS.index(rel.split("/")[0])] for rel, _, _ in FOLDER]
    file = tmp_path / "names.txt"
    file.write_text("\n".join(names))
    records, root = resolve_source(DataSourceConfig(path=f"imagefolder:{folder}"),
                                   class_names=load_class_names(str(file)))
    assert root == folder and records[-1].label == "class 8" and len(records) == len(FOLDER)
    with pytest.raises(RecordError, match=r"9 class folders \(cat, cup, ground, \.\.\.\) but 8 class names"):
        read_image_folder(folder, names[:-1])


def test_image_folder_errors(folder, tmp_path):
    with pytest.raises(RecordError, match="not a folder"):
        read_image_folder(tmp_path / "missing")
    with pytest.raises(RecordError, match="no class folders"):
        read_image_folder(tmp_path)
    with pytest.raises(ValueError, match="root 'elsewhere' must be left unset"):
        resolve_source(DataSourceConfig(path=f"imagefolder:{folder}", root="elsewhere"))
    with pytest.raises(ValueError, match="relabel the folders of an imagefolder:DIR source only"):
        resolve_source(DataSourceConfig(path="demo:val"), class_names=["a"])


def test_imagenet_wnid_folders_map_to_open_clip_names_by_position(tmp_path):
    """torchvision sorts ImageNet's wnid folders; open_clip's 1000 names follow the class index, which is
    that sorted order (the ILSVRC index order timm also ships)."""
    timm = pytest.importorskip("timm", reason="timm ships the ImageNet wnid list used here")
    wnids = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert len(wnids) == 1000 and wnids == sorted(wnids)
    for wnid in wnids:
        (tmp_path / wnid).mkdir()
    for wnid in ("n01440764", "n02099601", "n02123045", "n03773504", "n04008634", "n04355933", "n04356056",
                 "n15075141"):
        photo("chelsea").resize((8, 8)).save(tmp_path / wnid / "x.png")
    records = read_image_folder(tmp_path, load_class_names("imagenet"))
    # open_clip names both n03773504 and n04008634 "missile", both n04355933 and n04356056 "sunglasses"
    assert [r.label for r in records] == ["tench", "Golden Retriever", "tabby cat", "missile", "projectile",
                                          "sunglass", "sunglasses", "toilet paper"]


# ----- zero-shot metrics with an oracle ------------------------------------------------------------------

# the rank of each image's true class among the 8 classes present (0: top-1), chosen by the oracle
RANKS = {"cat/chelsea_cat.png": 2, "ground/rocket_ground.png": 6, "person/astronaut_person.png": 1,
         "rocket/launch/rocket_rocket.png": 4, "spoon/coffee_spoon.png": 5}
CLASSES = [c for c in FOLDERS if c != "table"]


class RankOracle(nn.Module):
    """Image embeddings: scores over ``CLASSES`` that put the image's true class at its rank in ``RANKS``
    (the image recognised by the mean colour of its pixels); text embeddings: the one-hot of the class
    a prompt names, so the classifier is the identity and the logits are the chosen scores."""

    def __init__(self, root: Path):
        super().__init__()
        signatures, scores = [], []
        for rel, _, _ in FOLDER:
            with Image.open(root / rel) as image:
                signatures.append(TRANSFORM(image.convert("RGB")).mean(dim=(1, 2)))
            true = CLASSES.index(rel.split("/")[0])
            order = [c for c in range(len(CLASSES)) if c != true]
            order.insert(RANKS.get(rel, 0), true)  # classes from the highest score down
            score = torch.empty(len(CLASSES))
            score[order] = torch.arange(len(CLASSES), 0, -1.0)
            scores.append(score)
        self.signatures, self.scores = torch.stack(signatures), torch.stack(scores)
        assert torch.pdist(self.signatures).min() > 1e-3  # every image is told apart
        self.prompts: set[str] = set()

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        which = torch.cdist(images.mean(dim=(2, 3)), self.signatures).argmin(dim=1)
        return F.normalize(self.scores[which], dim=-1) if normalize else self.scores[which]

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], len(CLASSES)).float()

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        self.prompts.update(texts)
        found = [[i for i, c in enumerate(CLASSES) if re.search(rf"\b{c}\b", t)] for t in texts]
        assert all(len(f) == 1 for f in found), texts
        return torch.tensor(found)


def test_zero_shot_on_image_folder_gives_the_oracle_accuracies(folder):
    oracle = RankOracle(folder)
    records, root = resolve_source(DataSourceConfig(path=f"imagefolder:{folder}"))
    m = evaluate_zero_shot(oracle, records, root, TRANSFORM, oracle.tokenizer, templates="detailclip",
                           batch_size=4, progress=False)
    assert (m["num_images"], m["skipped_images"]) == (13, 0)
    assert m["acc1"] == pytest.approx(100 * 8 / 13)  # ranks 0 for all but the 5 images of RANKS
    assert m["acc5"] == pytest.approx(100 * 11 / 13)  # ranks 5 and 6 miss
    # per class top-1: cat 1/2, cup 2/2, ground 0/1, person 1/2, rocket 2/3, sky 1/1, spoon 0/1, wall 1/1
    assert m["mean_per_class_recall"] == pytest.approx(100 * (1 / 2 + 1 + 0 + 1 / 2 + 2 / 3 + 1 + 0 + 1) / 8)
    assert m["mean_per_class_acc5"] == pytest.approx(100 * 6 / 8)  # ground and spoon miss
    detailclip = TEMPLATE_SETS["detailclip"].templates
    assert len(detailclip) == 7 and oracle.prompts == {t.format(c) for t in detailclip for c in CLASSES}


def test_zero_shot_skips_an_unreadable_image_of_the_folder(folder, tmp_path, caplog):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    (root / "spoon" / "coffee_spoon.png").write_bytes(b"not a png")  # the rank-5 image
    oracle = RankOracle(folder)
    m = evaluate_zero_shot(oracle, read_image_folder(root), root, TRANSFORM, oracle.tokenizer,
                           class_names=CLASSES, progress=False)
    assert (m["num_images"], m["skipped_images"]) == (12, 1)
    assert m["acc5"] == pytest.approx(100 * 11 / 12)
    assert m["mean_per_class_acc5"] == pytest.approx(100 * 6 / 7)  # spoon has no image left
    assert "coffee_spoon.png" in caplog.text
