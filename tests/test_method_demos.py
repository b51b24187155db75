"""`finegrain demo --method M`: the method and plain CLIP train from one start for the same steps and are
printed side by side (shrunk here to the test model, tiny data and 2 steps)."""

import pytest
import yaml

from finegrain import demo

SMALL_HEADS = {"out_dim": 16, "hidden_dim": 32, "bottleneck_dim": 8}


@pytest.fixture
def small_configs(tiny_data, monkeypatch):
    """Every config the demo loads, on the test model and tiny data, 2 steps."""
    real = demo.load_config

    def small(name, overrides=()):
        return real(name, [*overrides, "model.name=finegrain-test", f"data.train.path={tiny_data / 'train.jsonl'}",
                           f"data.val.path={tiny_data / 'val.jsonl'}", "data.batch_size=8", "data.num_workers=0",
                           "train.steps=2", "train.save_every=2"])

    monkeypatch.setattr(demo, "load_config", small)


def test_fineclip_demo_fine_tunes_one_start_with_clip_and_fineclip(small_configs, tmp_path, capsys):
    columns = demo.run_method_demo("fineclip", tmp_path / "out", progress_bar=False)
    assert list(columns) == ["start", "CLIP ft", "FineCLIP"]
    start = tmp_path / "out" / "start" / "step_00000002.pt"
    for run in ("clip", "fineclip"):
        cfg = yaml.safe_load((tmp_path / "out" / run / "config.yaml").read_text())
        assert cfg["model"]["pretrained"] == str(tmp_path / "out" / "start" / "best.pt") and cfg["train"]["steps"] == 2
    assert start.exists()
    assert cfg["method"]["name"] == "fineclip"
    out = capsys.readouterr().out
    assert "start  CLIP ft FineCLIP" in out and "box classification top-1 (RoI, dense)" in out
    assert columns["CLIP ft"] != columns["FineCLIP"]


def test_detailclip_demo_trains_from_one_random_start_and_draws_the_kept_blocks(small_configs, tmp_path, capsys):
    columns = demo.run_method_demo("detailclip", tmp_path / "out", progress_bar=False)
    assert list(columns) == ["start", "CLIP", "DetailCLIP"]
    assert (tmp_path / "out" / "detailclip" / "token_removal.png").stat().st_size > 1000
    assert not (tmp_path / "out" / "start").exists()
    assert "teacher attention and kept blocks" in capsys.readouterr().out


def test_method_demo_refuses_an_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="no demo for method 'nope'"):
        demo.run_method_demo("nope", tmp_path)


def test_composed_demo_shows_fineclip_plus_detailclip_next_to_each_alone_with_segmentation(small_configs, tmp_path,
                                                                                          capsys, monkeypatch):
    scores = iter(range(4))
    monkeypatch.setattr(demo, "demo_segmentation", lambda trainer: {"segmentation/miou": 10.0 + next(scores)})
    columns = demo.run_method_demo("fineclip+detailclip", tmp_path / "out", progress_bar=False,
                                   overrides=[f"method.detailclip.{k}={v}" for k, v in SMALL_HEADS.items()])
    assert list(columns) == ["start", "FineCLIP", "DetailCLIP", "FineCLIP+DetailCLIP"]
    start = str(tmp_path / "out" / "start" / "best.pt")
    for run, method in (("fineclip", "fineclip"), ("detailclip", "detailclip"),
                        ("fineclip+detailclip", "fineclip+detailclip")):
        cfg = yaml.safe_load((tmp_path / "out" / run / "config.yaml").read_text())
        assert (cfg["method"]["name"], cfg["model"]["pretrained"], cfg["train"]["steps"]) == (method, start, 2)
    out = capsys.readouterr().out
    assert "start FineCLIP DetailCLIP FineCLIP+DetailCLIP" in " ".join(out.split())
    row = next(line for line in out.splitlines() if line.startswith("segmentation mIoU (dense)"))
    assert row.split()[-5:] == ["10.0", "11.0", "12.0", "13.0", "-"]


def test_final_weights_are_best_pt_when_kept_else_the_last_step_checkpoint(tmp_path):
    for step in (50, 150, 100):
        (tmp_path / f"step_{step:08d}.pt").write_bytes(b"x")
    assert demo.final_weights(tmp_path) == tmp_path / "step_00000150.pt"  # FineCLIP's demo keeps no best.pt
    (tmp_path / "best.pt").write_bytes(b"x")
    assert demo.final_weights(tmp_path) == tmp_path / "best.pt"
    with pytest.raises(FileNotFoundError, match="wrote no checkpoint"):
        demo.final_weights(tmp_path / "empty")
