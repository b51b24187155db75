"""The precomputed text-embedding cache: `finegrain embed-text`, lookups, samples and the model check."""

import json
import pickle
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.cli import main
from finegrain.config import load_config
from finegrain.data.collate import collate
from finegrain.data.records import Record, Region
from finegrain.data.sample import SampleBuilder
from finegrain.data.text_cache import TextCacheError, TextEmbeddingCache, check_cache_matches, text_hash
from finegrain.models import create_model, get_tokenizer
from finegrain.objectives import register_method
from finegrain.objectives.clip import CLIP
from finegrain.sample_spec import SampleSpec
from finegrain.train.trainer import BatchToDevice, Trainer

CAPTIONS = ["a red square", "a blue circle on grey", "a red square"]  # one repeated
REGION_CAPTIONS = ["the square", "the circle", "the square"]


@register_method("text_cache_clip_test")
class CachedTextClip(CLIP):
    """CLIP on cached caption embeddings (``batch["text_embed"]``) instead of the text tower."""

    @dataclass
    class Options(CLIP.Options):
        text_cache: str = ""

    def sample_spec(self):
        return SampleSpec(text_cache=self.options.text_cache)

    def features(self, model, batch, progress):
        return {"image": model.encode_image(batch["image"], normalize=True), "text": batch["text_embed"].float()}


@register_method("label_text_test")
class LabelText(CLIP):
    """CLIP whose samples take a region's label as its text when it has no caption."""

    def sample_spec(self):
        return SampleSpec(augment="none", regions=True, label_as_region_text=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A JSONL of 4 images (captions and region captions with repeats, a labelled region without caption)
    and the finegrain-test weights it is embedded with."""
    root = tmp_path_factory.mktemp("text_cache")
    lines = []
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 100, 20)).save(root / f"{i}.png")
        regions = [{"box": [2, 2, 20, 20], "caption": REGION_CAPTIONS[i % 3]},
                   {"box": [10, 10, 30, 35], "label": "a label"},  # no caption: its label is text only on demand
                   {"box": [0, 5, 40, 30], "caption": f"region {i}", "label": "another label"}]
        lines.append({"image": f"{i}.png", "width": 40, "height": 40, "captions": [CAPTIONS[i % 3], f"image {i}"],
                      "regions": regions})
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    torch.manual_seed(0)
    model = create_model("finegrain-test").eval()
    torch.save(model.clip.state_dict(), root / "weights.pt")
    cache = root / "cache"
    assert main(["embed-text", "model.name=finegrain-test", f"model.pretrained={root / 'weights.pt'}",
                 f"data.train.path={root / 'train.jsonl'}", "--output", str(cache), "--batch-size", "3",
                 "--device", "cpu", "--no-progress"]) == 0
    return {"root": root, "model": model, "cache": cache}


def texts_of_data():
    return {*CAPTIONS, *REGION_CAPTIONS, *(f"image {i}" for i in range(4)), *(f"region {i}" for i in range(4))}


def test_embed_text_writes_each_distinct_text_once_equal_to_encode_text(data):
    meta = json.loads((data["cache"] / "meta.json").read_text())
    texts = sorted(texts_of_data(), key=text_hash)
    assert meta["count"] == len(texts) == 12 and meta["embed_dim"] == 32 and meta["context_length"] == 16
    assert meta["model"] == "finegrain-test" and meta["pretrained"].endswith("weights.pt")
    hashes = np.load(data["cache"] / "hashes.npy")
    embeddings = np.load(data["cache"] / "embeddings.npy")
    assert hashes.dtype == np.uint64 and embeddings.dtype == np.float16 and embeddings.shape == (12, 32)
    assert hashes.tolist() == [text_hash(t) for t in texts]  # sorted, one row per distinct text
    with torch.no_grad():
        expected = data["model"].encode_text(get_tokenizer("finegrain-test")(texts), normalize=True)
    torch.testing.assert_close(torch.from_numpy(embeddings).float(), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(TextEmbeddingCache(data["cache"]).lookup(["the circle", "a red square"]).float(),
                               expected[[texts.index("the circle"), texts.index("a red square")]], atol=1e-3, rtol=0)
    assert not list(data["cache"].glob("*.tmp"))


def test_embed_text_includes_region_labels_only_when_the_method_uses_them(data, tmp_path):
    assert main(["embed-text", "model.name=finegrain-test", "method.name=label_text_test",
                 f"data.train.path={data['root'] / 'train.jsonl'}", "--output", str(tmp_path / "c"),
                 "--device", "cpu", "--no-progress"]) == 0
    cache = TextEmbeddingCache(tmp_path / "c")
    assert len(cache) == 13  # + "a label", the caption-less region's (a captioned region's label is unused)
    assert cache.lookup(["a label"]).shape == (1, 32)


def test_embed_text_reads_webdataset_shards_like_the_jsonl(data, tmp_path):
    from finegrain.data.readers import read_jsonl
    from finegrain.data.webdataset import write_shards

    records = read_jsonl(data["root"] / "train.jsonl")
    write_shards(((r, (data["root"] / r.image).read_bytes()) for r in records), str(tmp_path / "s-%02d.tar"), 3)
    assert main(["embed-text", "model.name=finegrain-test", f"model.pretrained={data['root'] / 'weights.pt'}",
                 f"data.train.path={tmp_path / 's-{00..01}.tar'}", "--output", str(tmp_path / "c"),
                 "--device", "cpu", "--no-progress"]) == 0
    assert np.array_equal(np.load(tmp_path / "c" / "hashes.npy"), np.load(data["cache"] / "hashes.npy"))
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "c" / "embeddings.npy")).float(),  # other batch size
                               torch.from_numpy(np.load(data["cache"] / "embeddings.npy")).float(), atol=1e-3, rtol=0)


def test_sample_with_text_cache_carries_embeddings_with_zero_rows_for_regions_without_text(data):
    spec = SampleSpec(augment="none", regions=True, max_regions=4, text_cache=str(data["cache"]))
    builder = SampleBuilder(spec, (32, 32), get_tokenizer("finegrain-test"))
    cache = TextEmbeddingCache(data["cache"])
    record = Record("0.png", ("a red square", "image 0"),
                    (Region((2, 2, 20, 20), "the square"), Region((10, 10, 30, 35)), Region((0, 5, 40, 30), "region 0")),
                    40, 40)
    image = Image.open(data["root"] / "0.png").convert("RGB")
    samples = [builder(image, record, seed) for seed in range(6)]
    sample = samples[0]
    assert "text" not in sample and "region_text" not in sample
    assert sample["text_embed"].dtype == torch.float16 and sample["text_embed"].shape == (32,)
    captions = cache.lookup(["a red square", "image 0"])
    assert all(any(torch.equal(s["text_embed"], c) for c in captions) for s in samples)
    assert sample["region_text_valid"].tolist() == [True, False, True, False]
    expected = torch.zeros(4, 32, dtype=torch.float16)
    expected[[0, 2]] = cache.lookup(["the square", "region 0"])
    assert torch.equal(sample["region_text_embed"], expected)

    batch = BatchToDevice(torch.device("cpu"), (0.5,) * 3, (0.5,) * 3)(collate(samples[:2]))
    assert batch["text_embed"].shape == (2, 32) and batch["text_embed"].dtype == torch.float16
    assert batch["region_text_embed"].shape == (2, 4, 32) and batch["region_text_embed"].dtype == torch.float16


def test_missing_caption_is_an_error_naming_it_and_the_cache(data):
    builder = SampleBuilder(SampleSpec(augment="none", text_cache=str(data["cache"])), (32, 32),
                            get_tokenizer("finegrain-test"))
    record = Record("0.png", ("a caption nobody embedded",), width=40, height=40)
    with pytest.raises(TextCacheError, match=f"text cache {data['cache']} has no embedding for the caption "
                                             "'a caption nobody embedded'"):
        builder(Image.open(data["root"] / "0.png").convert("RGB"), record, 0)


def test_check_passes_for_the_same_model_and_fails_clearly_for_another(data):
    tokenizer = get_tokenizer("finegrain-test")
    with torch.no_grad():
        assert check_cache_matches(data["cache"], data["model"].encode_text, tokenizer) > 0.999
    torch.manual_seed(1)
    other = create_model("finegrain-test").eval()
    with pytest.raises(TextCacheError, match=r"was made by finegrain-test \(pretrained .*weights.pt\), not by "
                                             r"the other model: its probe embedding differs \(cosine"):
        check_cache_matches(data["cache"], other.encode_text, tokenizer, "the other model")


def test_trainer_trains_on_a_matching_cache_and_refuses_another_models(data, tmp_path):
    overrides = ["model.name=finegrain-test", "method.name=text_cache_clip_test",
                 f"method.text_cache={data['cache']}", f"data.train.path={data['root'] / 'train.jsonl'}",
                 "data.batch_size=2", "data.num_workers=0", "train.steps=2"]
    cfg = load_config(None, [*overrides, f"model.pretrained={data['root'] / 'weights.pt'}",
                             f"train.output_dir={tmp_path / 'ok'}"])
    result = Trainer(cfg, progress_bar=False).fit()
    assert result.step == 2 and np.isfinite(result.last_losses["loss"])
    cfg = load_config(None, [*overrides, "train.seed=5", f"train.output_dir={tmp_path / 'bad'}"])  # random init
    with pytest.raises(TextCacheError, match=r"not by finegrain-test \(pretrained None\)"):
        Trainer(cfg, progress_bar=False)


def test_cache_pickles_without_its_arrays(data):
    cache = TextEmbeddingCache(data["cache"])
    before = cache.lookup(["the square"])
    payload = pickle.dumps(cache)
    assert len(payload) < 2000  # meta.json's fields; the arrays stay in their files
    copy = pickle.loads(payload)
    assert copy._hashes is None and copy._embeddings is None
    assert torch.equal(copy.lookup(["the square"]), before)


def test_fineclip_on_the_cache_gives_the_losses_of_the_text_tower(data, tmp_path):
    """FineCLIP's frozen text tower replaced by the cache: captions and region captions, same first-step
    losses (to the cache's float16 precision)."""
    losses = {}
    for name, extra in (("tower", []), ("cache", [f"method.text_cache={data['cache']}"])):
        cfg = load_config(None, ["model.name=finegrain-test", f"model.pretrained={data['root'] / 'weights.pt'}",
                                 "method.name=fineclip", "method.min_box_size=0", *extra,
                                 f"data.train.path={data['root'] / 'train.jsonl'}", "data.batch_size=4",
                                 "data.num_workers=0", "train.steps=1", f"train.output_dir={tmp_path / name}"])
        losses[name] = Trainer(cfg, progress_bar=False).fit().last_losses
    for key in ("global_contrastive_loss", "self_distill_loss", "region_contrastive_loss"):
        assert losses["cache"][key] == pytest.approx(losses["tower"][key], rel=2e-3), key
    assert losses["cache"]["region_contrastive_loss"] > 0
