"""A method that trains on regions warns once when the training data has none, instead of logging zeros."""

import logging

import pytest

from finegrain.train.trainer import train


@pytest.fixture
def caption_only(tiny_records):
    return tiny_records("train", lambda record: {"captions": record["captions"]}, "captions.jsonl")


@pytest.mark.parametrize("method, setting", [("fineclip", "method.self_distill, method.region_contrastive"),
                                             ("clipself", "method.region_source=proposals")])
def test_region_method_on_caption_only_data_warns_once_naming_data_and_setting(
        tiny_config, caption_only, caplog, method, setting):
    with caplog.at_level(logging.WARNING, logger="finegrain.train.trainer"):
        train(tiny_config(f"method.name={method}", f"data.train.path={caption_only}", "train.steps=3",
                          "train.log_every=1"), progress_bar=False)
    warnings = [r.getMessage() for r in caplog.records if "gave no regions" in r.getMessage()]
    assert len(warnings) == 1
    assert f"data.train.path={str(caption_only)!r} gave no regions in its first 8 records" in warnings[0]
    assert f"method.name={method}" in warnings[0] and setting in warnings[0]


def test_region_method_on_data_with_regions_does_not_warn(tiny_config, caplog):
    with caplog.at_level(logging.WARNING, logger="finegrain.train.trainer"):
        train(tiny_config("method.name=fineclip", "train.steps=2", "train.log_every=1"), progress_bar=False)
    assert not [r for r in caplog.records if "gave no regions" in r.getMessage()]
