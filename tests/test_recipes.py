"""Shipped configs (src/finegrain/configs) and the DetailCLIP model configs they use."""

import open_clip
import pytest

from finegrain.config import CONFIG_DIR, config_to_yaml, load_config
from finegrain.models import export_local_dir
from finegrain.models.factory import model_config
from finegrain.train.optim import derive_epoch_schedule
from finegrain.train.trainer import Trainer

CONFIGS = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_the_detailclip_configs_are_shipped():
    assert {"demo", "demo-detailclip", "detailclip-vitb16-yfcc15m-25ep", "detailclip-vitb16-yfcc15m-50ep"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name, data_root="/data")  # the fine-tuning recipes name their data under {data}
    path = tmp_path / "merged.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("name, steps", [("detailclip-vitb16-yfcc15m-25ep", 89_659),
                                         ("detailclip-vitb16-yfcc15m-50ep", 179_317)])
def test_detailclip_recipes_count_steps_of_a_4096_batch_over_yfcc15m(name, steps):
    cfg = load_config(name)
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (256, 5e-4, 0.5, (0.9, 0.98))
    derived = derive_epoch_schedule(cfg, 16 * 256 / 14_689_580)  # 4 nodes x 4 GPUs, one step
    assert (derived.train.steps, derived.optim.warmup_steps) == (steps, 3587)


def test_detailclip_vit_b_16_is_the_released_student_as_open_clip_settings():
    cfg = model_config("detailclip-vit-b-16")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    assert (vision["image_size"], vision["patch_size"], vision["width"], vision["layers"]) == (224, 16, 768, 12)
    assert vision["width"] // vision["head_width"] == 12 and vision["mlp_ratio"] == 4.0
    assert vision["no_ln_pre"] and vision["norm_kwargs"] == {"eps": 1e-6}
    assert (text["context_length"], text["width"], text["heads"], text["layers"]) == (77, 512, 8, 12)
    assert cfg["embed_dim"] == 512 and cfg["quick_gelu"]


def test_demo_detailclip_trains_and_exports_with_imagenet_normalisation(tiny_data, tmp_path):
    cfg = load_config("demo-detailclip", [f"data.train.path={tiny_data / 'train.jsonl'}", "data.val=null",
                                          "train.eval_every=0", "train.best_metric=null", "data.batch_size=4",
                                          "data.num_workers=0", "train.steps=2", f"train.output_dir={tmp_path}"])
    trainer = Trainer(cfg, progress_bar=False)
    assert (trainer.mean, trainer.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert type(trainer.model.clip.visual.ln_pre).__name__ == "Identity"
    assert trainer.model.clip.visual.ln_post.eps == 1e-6
    assert trainer.fit().step == 2
    export_local_dir(trainer.method.export_model(trainer.model), tmp_path / "exported")
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'exported'}")  # open_clip alone, no finegrain
    pp = open_clip.get_model_preprocess_cfg(reloaded)
    assert (list(pp["mean"]), list(pp["std"])) == (IMAGENET_MEAN, IMAGENET_STD)
