"""The fine-tuning recipes say where every value comes from, and the docs' tables are generated from them."""

import dataclasses
import re
from pathlib import Path

import pytest

from finegrain.cli import main
from finegrain.config import CONFIG_DIR, OptimConfig
from finegrain.objectives import get_method_class
from finegrain.recipe_sources import legend, markdown_table, recipe_rows, rendered_doc

DOCS = Path(__file__).resolve().parents[1] / "docs"
FINETUNE_RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")
                          if p.stem.startswith(("seg-", "det-", "ovd-", "demo-finetune-")))
# optim values every fine-tuning recipe states (plus those of its schedule)
OPTIM_KEYS = {"lr", "weight_decay", "betas", "eps", "warmup_steps", "warmup_ratio", "schedule", "clip_grad_norm",
              "decay_all", "lr_base_batch"}
SCHEDULE_KEYS = {"poly": {"poly_power", "min_lr"}, "step": {"step_milestones", "step_gamma"}, "constant": set()}
# the words a source may start with besides a legend name
OWN_WORDS = ("finegrain:", "deviation:", "scaled:")


def test_recipe_rows_read_dotted_keys_loaded_values_and_continued_comments(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# source CFG: some/repo@abc configs/x.py\n"
                    "model:\n"
                    "  name: ViT-B-16   # CFG:3 the tower\n"
                    "method:\n"
                    "  name: finetune-seg\n"
                    "  backbone:\n"
                    "    blocks: [3, 5]   # CFG:7 out_indices\n"
                    "                     # (continued)\n"
                    "  class_names: 'a#b'  # CFG:9\n"
                    "optim:\n"
                    "  lr: 8.0e-5    # README:112\n")
    rows = {row.key: row for row in recipe_rows(str(path))}
    assert list(rows) == ["model.name", "method.name", "method.backbone.blocks", "method.class_names", "optim.lr"]
    assert rows["method.backbone.blocks"].value == "[3, 5]"
    assert rows["method.backbone.blocks"].source == "CFG:7 out_indices (continued)"
    assert rows["method.class_names"].value == "a#b" and rows["method.class_names"].source == "CFG:9"
    assert rows["method.name"].source == "" and rows["optim.lr"].value == "8.0e-05"
    assert legend(path) == {"CFG": "some/repo@abc configs/x.py"}


@pytest.mark.parametrize("doc", ["finetune.md", "ovd.md"])
def test_the_docs_recipe_tables_are_the_recipes(doc):
    """A doc table that disagrees with its recipe file fails: rewrite it with
    ``python -m finegrain.recipe_sources docs/finetune.md docs/ovd.md``."""
    text = (DOCS / doc).read_text()
    assert "<!-- recipe-table" in text
    assert rendered_doc(text) == text, f"docs/{doc} is out of date with the recipes"


def test_a_changed_recipe_value_makes_the_doc_table_stale(tmp_path, monkeypatch):
    recipe = (CONFIG_DIR / "det-maskrcnn-coco-vitb16.yaml").read_text()
    changed = tmp_path / "det.yaml"
    changed.write_text(recipe.replace("rpn_post_nms_train: 2000", "rpn_post_nms_train: 1000"))
    block = f"<!-- recipe-table {changed} -->\n{markdown_table(str(CONFIG_DIR / 'det-maskrcnn-coco-vitb16.yaml'))}"
    doc = block + "\n<!-- end recipe-table -->\n"
    assert "`method.rpn_post_nms_train` | `2000`" in doc
    assert rendered_doc(doc) != doc and "`method.rpn_post_nms_train` | `1000`" in rendered_doc(doc)


@pytest.mark.parametrize("name", FINETUNE_RECIPES)
def test_every_value_of_a_finetuning_recipe_is_stated_with_its_source(name):
    """Nothing comes from finegrain's defaults unseen: every method option and optim value is in the file, each
    with a source naming a file of the recipe's legend (NAME:line) or saying it is finegrain's own choice."""
    rows = {row.key: row for row in recipe_rows(name)}
    names = legend(CONFIG_DIR / f"{name}.yaml")
    method = get_method_class(rows["method.name"].value).Options
    expected = set()
    for field in dataclasses.fields(method):
        if dataclasses.is_dataclass(field.type) or field.name == "backbone":
            expected |= {f"method.backbone.{f.name}" for f in dataclasses.fields(method().backbone)}
        else:
            expected.add(f"method.{field.name}")
    schedule = rows["optim.schedule"].value
    expected |= {f"optim.{key}" for key in OPTIM_KEYS | SCHEDULE_KEYS[schedule]}
    assert {f.name for f in dataclasses.fields(OptimConfig)} >= OPTIM_KEYS
    missing = sorted(expected - set(rows))
    assert not missing, f"{name} does not state {missing}"
    for row in rows.values():
        assert row.source, f"{name}: {row.key} has no source"
        lines = set(re.findall(r"\b([A-Z][A-Z0-9]+):\d", row.source))  # NAME:line citations
        assert lines <= set(names), f"{name}: {row.key} cites {sorted(lines - set(names))}, not in its legend"
        cited = set(re.findall(r"\b[A-Z][A-Z0-9]+\b", row.source)) & set(names)
        assert cited or row.source.startswith(OWN_WORDS) or "/" in row.source, f"{name}: {row.key}: {row.source!r}"


def test_config_sources_prints_the_table_and_the_differences(capsys):
    assert main(["config", "--config", "det-maskrcnn-coco-vitb16-3x", "--sources",
                 "--base", "det-maskrcnn-coco-vitb16"]) == 0
    out = capsys.readouterr().out
    assert "| `method.backbone.layer_decay` | `0.65` | CFG:139" in out and "rpn_post_nms_train" not in out
    assert "- CFG: bytedance/ibot@da316d8 evaluation/object_detection/configs/cascade_rcnn/" in out
    assert main(["config", "--sources"]) == 2
