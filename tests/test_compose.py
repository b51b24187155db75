"""Methods as sets of terms: composing a method's own terms reproduces it bit for bit, ``fineclip+detailclip``
shares features and tower passes, conflicting needs are refused with one line, and the config, samples and
trainer carry a composed method."""

import dataclasses
import json

import pytest
import torch
from test_detailclip import SMALL, two_view_batch
from test_fineclip import fineclip_batch

from finegrain.config import ConfigError, load_config
from finegrain.data.images import load_image
from finegrain.data.records import parse_record
from finegrain.data.sample import SampleBuilder
from finegrain.models import create_model, get_tokenizer
from finegrain.models.clip import FinegrainCLIP
from finegrain.models.vit_tower import OpenCLIPViTTower
from finegrain.objectives import (
    Progress,
    Term,
    complete_method_options,
    create_method,
    get_method_class,
    method_options,
    term,
)
from finegrain.train.trainer import Trainer

PROGRESS = Progress(3, 10, 1.0)
CAPTIONED = torch.tensor([[True, False, True], [False, True, True]])


def losses_and_grads(name, options, batch):
    """A fresh model (seed 0) and method ``name``; its outputs on ``batch`` and every parameter's gradient."""
    torch.manual_seed(0)
    model = create_model("finegrain-test")
    cls = get_method_class(name)
    method = create_method(name, options if options is not None else cls.Options(), model)
    out = method(model, batch, PROGRESS)
    sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    params = [*model.named_parameters(), *method.named_parameters()]
    return out, {n: p.grad for n, p in params if p.grad is not None}


def assert_same_bits(composed, method, keys):
    """``keys``: {composed loss key: the method's loss key}; values and gradients equal bit for bit."""
    (c_out, c_grads), (m_out, m_grads) = composed, method
    for c_key, m_key in keys.items():
        assert torch.equal(c_out[c_key], m_out[m_key]), c_key
    model_grads = {n for n in m_grads if n.startswith("clip.")}
    assert model_grads and model_grads <= set(c_grads)
    for name in model_grads:
        assert torch.equal(c_grads[name], m_grads[name]), name


def test_composing_fineclips_terms_gives_fineclips_losses_and_gradients_bit_for_bit():
    batch = fineclip_batch(create_model("finegrain-test"), (2, 3), CAPTIONED)
    keys = {f"{t}_loss": f"{t}_loss" for t in ("global_contrastive", "self_distill", "region_contrastive")}
    assert_same_bits(losses_and_grads("global_contrastive+self_distill+region_contrastive", None, batch),
                     losses_and_grads("fineclip", None, batch), keys)


@pytest.mark.parametrize("region_source", ["proposals", "grid"])
def test_composing_clipselfs_term_gives_clipselfs_loss_and_gradients_bit_for_bit(region_source):
    batch = fineclip_batch(create_model("finegrain-test"), (2, 3))
    cls = get_method_class("clipself_distill")
    options = cls.Options()
    options.image.resize_mode = "squash" if region_source == "grid" else "longest_pad"
    options.regions.region_source = region_source
    clipself = get_method_class("clipself").Options(region_source=region_source, resize_mode=options.image.resize_mode)
    torch.manual_seed(7)  # the grid's random cells
    composed = losses_and_grads("clipself_distill", options, batch)
    torch.manual_seed(7)
    alone = losses_and_grads("clipself", clipself, batch)
    assert_same_bits(composed, alone, {"clipself_distill_loss": "self_distill_loss"})


def test_composing_detailclips_terms_gives_detailclips_losses_and_gradients_bit_for_bit():
    name = "two_view_clip+ibot_cls+ibot_patch+pixel_reconstruction"
    options = get_method_class(name).Options()
    options.token_removal = type(options.token_removal)(**SMALL)
    options.text.lock_text = False
    batch = two_view_batch()
    keys = {"two_view_clip_loss": "clip_loss", "ibot_cls_loss": "cls_loss", "ibot_patch_loss": "patch_loss",
            "pixel_reconstruction_loss": "rec_loss"}
    assert_same_bits(losses_and_grads(name, options, batch),
                     losses_and_grads("detailclip", get_method_class("detailclip").Options(**SMALL), batch), keys)


def composed_options(**detailclip):
    options = get_method_class("fineclip+detailclip").Options()
    options.detailclip = type(options.detailclip)(**{**SMALL, "lock_text": True, **detailclip})
    return options


def test_fineclip_plus_detailclip_computes_each_parts_losses_on_its_own_view():
    """FineCLIP's terms on the exact image and regions, DetailCLIP's on the two augmented views: each loss equals
    the part's own on the same start."""
    batch = fineclip_batch(create_model("finegrain-test"), (2, 3), CAPTIONED)
    batch["views"] = two_view_batch(batch_size=2)["image"]
    composed, _ = losses_and_grads("fineclip+detailclip", composed_options(), batch)
    fineclip, _ = losses_and_grads("fineclip", None, batch)
    detailclip, _ = losses_and_grads("detailclip", composed_options().detailclip,
                                     {"image": batch["views"], "text": batch["text"]})
    assert {k for k in composed if k.endswith("_loss")} == {k for k in {**fineclip, **detailclip} if k.endswith("_loss")}
    for key, value in {**fineclip, **detailclip}.items():
        if key.endswith("_loss"):
            assert torch.equal(composed[key], value), key


@pytest.fixture
def tower_passes(monkeypatch):
    """Counts the vision tower passes (student and teacher) and text tower calls of every model."""
    counts = {"vision": 0, "text": 0}
    vision, encode_text = OpenCLIPViTTower.forward, FinegrainCLIP.encode_text

    def count_vision(self, *args, **kwargs):
        counts["vision"] += 1
        return vision(self, *args, **kwargs)

    monkeypatch.setattr(OpenCLIPViTTower, "forward", count_vision)

    def count_text(self, *args, **kwargs):
        counts["text"] += 1
        return encode_text(self, *args, **kwargs)

    monkeypatch.setattr(FinegrainCLIP, "encode_text", count_text)
    return counts


class KeptDenseProbe(Term):
    """A term on the dense map of DetailCLIP's kept-token views (what a region term on the views would read)."""

    needs = frozenset({"view_dense"})

    def loss(self, model, features, progress):
        return features["view_dense"].pow(2).mean()


@pytest.mark.parametrize("name,vision,text", [
    ("global_contrastive+region_contrastive", 1, 2),  # global embedding and dense map in one pass
    ("fineclip", 2, 2),  # + the crops
    ("detailclip", 2, 1),  # teacher, kept-token student
    ("fineclip+detailclip", 4, 2),  # both, the captions embedded once
    ("detailclip+kept_dense_probe", 2, 1),  # the views' dense map comes with the kept-token pass
])
def test_features_are_computed_once_with_the_fewest_tower_passes(name, vision, text, tower_passes, monkeypatch):
    monkeypatch.setitem(term._TERMS, "kept_dense_probe", KeptDenseProbe)
    batch = fineclip_batch(create_model("finegrain-test"), (2, 3), CAPTIONED)
    batch["views"] = two_view_batch(batch_size=2)["image"]
    cls = get_method_class(name)
    options = cls.Options()
    for part in ("detailclip", "token_removal"):
        if hasattr(options, part):
            setattr(options, part, type(getattr(options, part))(**SMALL))
    if hasattr(options, "fineclip"):
        options.fineclip.lock_text = False
    if name == "detailclip":
        options, batch = type(options)(**SMALL), {"image": batch["views"], "text": batch["text"]}
    model = create_model("finegrain-test")
    method = create_method(name, options, model)
    tower_passes.update(vision=0, text=0)
    out = method(model, batch, PROGRESS)
    assert (tower_passes["vision"], tower_passes["text"]) == (vision, text)
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("name,message", [
    ("clipself+detailclip", ("method.name=clipself+detailclip: the frozen_teacher and token_removal features "
                             "each need their own 'teacher' (e.g. a frozen and an EMA teacher); a method holds one")),
    ("fineclip+clipself", ("method.name=fineclip+clipself: fineclip and clipself set the 'image' features "
                           "differently (resize_mode: 'squash' vs 'longest_pad'); set them alike with "
                           "method.fineclip.resize_mode or method.clipself.resize_mode")),
    ("fineclip+detailclip", ("method.name=fineclip+detailclip: fineclip and detailclip set the 'text' features "
                             "differently (lock_text: True vs False); set them alike with "
                             "method.fineclip.lock_text or method.detailclip.lock_text")),
    ("fineclip+self_distill", ("method.name=fineclip+self_distill: two parts compute self_distill_loss; compose "
                               "different terms")),
    ("fineclip+fineclip", "method.name=fineclip+fineclip: 'fineclip' is named twice"),
    ("fineclip+clip", "method.name=fineclip+clip: 'clip' is a method not made of terms; it cannot be composed"),
    ("fineclip+nope", "method.name: unknown method or term 'nope'"),
])
def test_conflicting_needs_are_refused_with_one_line(name, message):
    with pytest.raises(ConfigError) as error:
        create_method(name, None, create_model("finegrain-test"))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_composed_recipe_loads_with_options_per_part_and_names_a_bad_key():
    cfg = load_config("demo-fineclip-detailclip", ["method.detailclip.keep_ratio=0.25"])
    assert cfg.method.name == "fineclip+detailclip"
    options = method_options(cfg.method.name, cfg.method.options)
    assert (options.fineclip.max_regions, options.detailclip.keep_ratio) == (3, 0.25)
    with pytest.raises(ConfigError, match="unknown config key 'method.fineclip.keep_ratio'"):
        complete_method_options(load_config("demo-fineclip-detailclip", ["method.fineclip.keep_ratio=0.25"]))


def test_composed_sample_holds_the_exact_image_with_regions_and_two_augmented_views(tiny_data):
    method = create_method("fineclip+detailclip", composed_options(), create_model("finegrain-test"))
    spec = method.sample_spec()
    assert (spec.augment, spec.views, spec.augmented_views, spec.view_augment) == ("none", 1, 2, "detailclip")
    build = SampleBuilder(spec, (32, 32), get_tokenizer("finegrain-test"))
    record = parse_record(json.loads((tiny_data / "train.jsonl").read_text().splitlines()[0]), "train.jsonl:1")
    image = load_image(tiny_data / record.image)
    sample = build(image, record, seed=5)
    assert sample["image"].shape == (3, 32, 32) and sample["views"].shape == (2, 3, 32, 32)
    assert sample["box_valid"].any() and len(sample["crops"]) == int(sample["box_valid"].sum())
    unaugmented = SampleBuilder(dataclasses.replace(spec, augmented_views=0), (32, 32), get_tokenizer("finegrain-test"))
    assert torch.equal(unaugmented(image, record, seed=5)["image"], sample["image"])  # the views leave it exact
    assert not torch.equal(sample["views"][0], sample["views"][1])


def test_composed_method_trains_and_resumes_its_state(tiny_config):
    small = [f"method.detailclip.{k}={v}" for k, v in SMALL.items()]
    cfg = tiny_config("method.name=fineclip+detailclip", "method.detailclip.lock_text=true", "train.steps=2",
                      "train.save_every=2", *small)
    result = Trainer(cfg, progress_bar=False).fit()
    record = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("global_contrastive_loss", "self_distill_loss", "region_contrastive_loss", "clip_loss", "cls_loss",
                "patch_loss", "rec_loss"):
        assert key in record and record[key] == record[key], key
    state = torch.load(result.output_dir / "step_00000002.pt", weights_only=False)["method"]
    assert {"cls_loss.centre.value", "patch_loss.centre.value", "teacher.copies.visual.conv1.weight"} <= set(state)
