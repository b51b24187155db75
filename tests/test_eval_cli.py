"""`finegrain eval` (built-in benchmarks, --option, eval configs, results files and --table, --list) and
`finegrain viz`, run in-process on the finegrain-test model and a small demo dataset."""

from __future__ import annotations

import functools
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image

from finegrain.cli import main
from finegrain.config import DataSourceConfig
from finegrain.data.demo import ensure_demo_dataset, make_demo_dataset
from finegrain.data.loader import resolve_source
from finegrain.eval import benchmarks
from finegrain.eval.benchmarks import BENCHMARKS
from finegrain.eval.jobs import parse_options
from finegrain.eval.results import compare_runs, read_results
from finegrain.eval.zero_shot import evaluate_zero_shot
from finegrain.models import create_model, get_tokenizer
from finegrain.train.report import format_metrics

DEMO = ("demo-retrieval", "demo-boxes", "demo-segmentation")
MODEL = ("--model", "finegrain-test", "--no-progress")


def cli(*argv) -> tuple[int, str, str]:
    """``finegrain ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str, command: str = "eval") -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"finegrain {command}: error:")]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def metrics_of(output: dict, benchmark: str) -> dict:
    """The ``benchmark/metric`` keys of an ``--output`` file, without the prefix."""
    return {key.split("/", 1)[1]: value for key, value in output.items() if key.startswith(f"{benchmark}/")}


def cell(metric: str, value: float) -> str:
    """A value as the results table prints it."""
    return f"{value:.0f}" if isinstance(value, int) or metric.startswith(("num_", "skipped_")) else f"{value:.2f}"


@pytest.fixture(scope="module", autouse=True)
def demo_root(tmp_path_factory):
    """A small demo dataset (24 train / 8 val) where ``ensure_demo_dataset()`` looks for the demo data."""
    cache = tmp_path_factory.mktemp("cache")
    make_demo_dataset(cache / "demo-v3", num_train=24, num_val=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINEGRAIN_CACHE", str(cache))
        assert ensure_demo_dataset() == cache / "demo-v3"
        yield cache / "demo-v3"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run ``a``: the three demo benchmarks twice (different random models); run ``b``: demo-retrieval once.
    Returns the folder of the runs and each evaluation's (stdout, --output metrics)."""
    root = tmp_path_factory.mktemp("runs")
    done = []
    for seed, run, names in ((0, "a", DEMO), (1, "a", DEMO), (2, "b", ("demo-retrieval",))):
        torch.manual_seed(seed)
        output = root / f"metrics-{len(done)}.json"
        code, out, err = cli("eval", *MODEL, "--benchmark", ",".join(names), "--output-dir", root / run,
                             "--output", output)
        assert code == 0, err
        done.append((out, json.loads(output.read_text())))
    return root, done


def test_benchmarks_append_one_line_each_and_latest_json_equals_printed_and_output_metrics(runs):
    root, done = runs
    entries = read_lines(root / "a" / "results.jsonl")
    assert [e["benchmark"] for e in entries] == [*DEMO, *DEMO]
    assert [e["task"] for e in entries[:3]] == ["retrieval", "box_classification", "segmentation"]
    assert all(e["model"] == "finegrain-test" and e["pretrained"] is None for e in entries)
    for run, (out, output) in enumerate(done[:2]):
        assert set(output) == {f"{e['benchmark']}/{k}" for e in entries[:3] for k in e["metrics"]}
        for entry in entries[3 * run:3 * run + 3]:
            name = entry["benchmark"]
            assert entry["metrics"] == metrics_of(output, name)
            assert format_metrics({f"{name}/{k}": v for k, v in entry["metrics"].items()}) in out
    assert entries[0]["metrics"]["num_images"] == 8 and entries[2]["metrics"]["num_images"] == 8
    assert entries[:3] != entries[3:]  # the two random models score differently
    for entry in entries[3:]:  # <benchmark>.json holds the newest entry
        assert json.loads((root / "a" / f"{entry['benchmark']}.json").read_text()) == entry
    assert len(read_lines(root / "b" / "results.jsonl")) == 1


def test_table_shows_newest_values_one_column_per_run_and_dash_where_a_run_lacks_a_benchmark(runs):
    root, done = runs
    code, out, _ = cli("eval", "--table", root / "a", root / "b" / "results.jsonl")
    assert code == 0
    header, *lines = out.splitlines()
    assert header.split() == ["benchmark", "metric", "a", "b"]
    newest_a, newest_b = done[1][1], done[2][1]
    assert len(lines) == len(newest_a)
    for line in lines:
        name, metric, value_a, value_b = line.split()
        assert value_a == cell(metric, newest_a[f"{name}/{metric}"])
        expected_b = cell(metric, newest_b[f"{name}/{metric}"]) if name == "demo-retrieval" else "-"
        assert value_b == expected_b
    assert [line.split()[0] for line in lines] == sorted((line.split()[0] for line in lines), key=DEMO.index)


def test_option_overrides_one_benchmark_default_and_keeps_the_others(tmp_path, monkeypatch):
    seen = {}
    original = benchmarks.evaluate_segmentation

    @functools.wraps(original)  # the same signature, which run_benchmark checks options against
    def spy(model, dataset, tokenizer, **kwargs):
        seen.update(kwargs)
        return original(model, dataset, tokenizer, **kwargs)

    monkeypatch.setattr(benchmarks, "evaluate_segmentation", spy)
    code, _, err = cli("eval", *MODEL, "--benchmark", "demo-segmentation", "--option", "templates=openai",
                       "--option", "dense_mode=plain", "--output-dir", tmp_path)
    assert code == 0, err
    assert seen["templates"] == "openai" and seen["dense_mode"] == "plain"
    assert seen["inference"] == "whole" and seen["short_side"] is None  # the benchmark's other defaults
    assert BENCHMARKS["demo-segmentation"].options["templates"] == "simple"  # the registry is untouched
    (entry,) = read_lines(tmp_path / "results.jsonl")
    assert entry["options"] == {**BENCHMARKS["demo-segmentation"].options, "templates": "openai",
                                "dense_mode": "plain"}


def test_parse_options_reads_yaml_values_and_refuses_a_pair_without_equals():
    assert parse_options(["ways=[roi, mask]", "image_size=1024", "templates=openai", "short_side=null",
                          "lr=7e-4", "name=a=b"]) == {"ways": ["roi", "mask"], "image_size": 1024,
                                                      "templates": "openai", "short_side": None, "lr": 7e-4,
                                                      "name": "a=b"}
    with pytest.raises(ValueError, match="--option 'templates': expected KEY=VALUE"):
        parse_options(["templates"])


def test_misspelt_option_is_a_one_line_error_naming_the_valid_options_and_writes_nothing(tmp_path):
    code, _, err = cli("eval", *MODEL, "--benchmark", "demo-segmentation", "--option", "templatez=openai",
                       "--output-dir", tmp_path)
    assert code == 2
    (line,) = error_lines(err)
    assert "'demo-segmentation'" in line and "['templatez']" in line
    assert all(f"'{name}'" in line for name in ("templates", "inference", "short_side", "dense_mode"))
    assert not (tmp_path / "results.jsonl").exists()


def test_shared_arguments_given_as_options_are_an_error_pointing_to_their_flags(tmp_path):
    code, _, err = cli("eval", *MODEL, "--benchmark", "demo-retrieval", "--option", "batch_size=4",
                       "--output-dir", tmp_path)
    assert code == 2
    (line,) = error_lines(err)
    assert "unknown option(s) ['batch_size']; the protocol takes []" in line and "are flags" in line


def test_unknown_benchmark_is_an_error_naming_it_and_the_known_ones(tmp_path):
    code, out, err = cli("eval", *MODEL, "--benchmark", "demo-retrieval,demo-retreival", "--output-dir", tmp_path)
    assert code == 2 and out == ""
    (line,) = error_lines(err)
    assert "unknown benchmark 'demo-retreival'" in line and "demo-retrieval, demo-boxes" in line
    assert "--list" in line
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_list_prints_every_benchmark_with_its_protocol():
    code, out, _ = cli("eval", "--list")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(BENCHMARKS)
    for line, (name, bench) in zip(lines, BENCHMARKS.items()):
        assert line.split()[:2] == [name, bench.protocol] and bench.about in line


def test_eval_config_runs_a_named_benchmark_and_a_custom_job_on_the_same_data_alike(tmp_path, demo_root):
    demo = BENCHMARKS["demo-segmentation"].options
    config = {"model": {"name": "finegrain-test"}, "data_root": str(demo_root), "benchmarks": [
        "demo-segmentation",
        {"name": "my-seg", "protocol": "segmentation", "data": ".", "options": dict(demo)},
        {"name": "my-retrieval", "protocol": "retrieval", "data": "val.jsonl"},
    ]}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = cli("eval", "--config", path, "--no-progress", "--output-dir", tmp_path / "out",
                       "--output", tmp_path / "m.json")
    assert code == 0, err
    named, custom, retrieval = read_lines(tmp_path / "out" / "results.jsonl")
    assert (named["benchmark"], custom["benchmark"], retrieval["benchmark"]) == ("demo-segmentation", "my-seg",
                                                                                 "my-retrieval")
    assert custom["task"] == "segmentation" and custom["data_root"] == str(demo_root)
    assert custom["metrics"] == named["metrics"] and custom["metrics"]["num_images"] == 8
    assert retrieval["metrics"]["num_images"] == 8 and retrieval["metrics"]["num_texts"] == 16
    assert set(metrics_of(json.loads((tmp_path / "m.json").read_text()), "my-seg")) == set(custom["metrics"])


@pytest.mark.parametrize(("config", "named"), [
    ({"model": {"name": "finegrain-test"}, "benchmark": ["demo-retrieval"]}, "['benchmark']"),
    ({"benchmarks": [{"benchmark": "demo-retrieval", "option": {"x": 1}}]}, "['option']"),
    ({"benchmarks": [{"name": "x", "protocol": "retrieval"}]}, "['data']"),
])
def test_eval_config_with_an_unknown_or_missing_key_is_an_error_naming_it(tmp_path, config, named):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = cli("eval", "--config", path, *MODEL)
    assert code == 2
    (line,) = error_lines(err)
    assert str(path) in line and named in line


def test_zero_shot_task_on_an_imagefolder_equals_evaluate_zero_shot(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "pets"
    for label, colour in (("red", (220, 30, 30)), ("green", (30, 200, 40)), ("blue", (30, 40, 220))):
        (folder / label).mkdir(parents=True)
        for i in range(2):
            pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    torch.manual_seed(0)
    code, _, err = cli("eval", *MODEL, "--task", "zero_shot", "--data", f"imagefolder:{folder}", "--option",
                       "templates=['a {} picture.', 'a photo of something {}.']", "--output-dir", tmp_path / "out",
                       "--output", tmp_path / "m.json")
    assert code == 0, err

    torch.manual_seed(0)
    model = create_model("finegrain-test")
    pp = open_clip.get_model_preprocess_cfg(model.clip)
    transform = open_clip.image_transform(model.image_size, is_train=False, mean=pp["mean"], std=pp["std"])
    records, root = resolve_source(DataSourceConfig(path=f"imagefolder:{folder}"))
    expected = evaluate_zero_shot(model, records, root, transform, get_tokenizer("finegrain-test"),
                                  templates=["a {} picture.", "a photo of something {}."], progress=False)
    assert expected["num_images"] == 6
    assert json.loads((tmp_path / "m.json").read_text()) == {f"zero_shot/{k}": v for k, v in expected.items()}
    assert read_results(tmp_path / "out")[f"zero_shot on imagefolder:{folder}"]["metrics"] == expected


def write_results(path: Path, *entries: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(entry) + "\n" if entry else "\n" for entry in entries))


def test_compare_runs_prints_the_exact_table_of_hand_written_results(tmp_path):
    write_results(tmp_path / "runs" / "base" / "eval" / "results.jsonl",
                  {"benchmark": "demo-retrieval", "metrics": {"text_retrieval_recall@1": 10.0, "num_images": 8}},
                  {"benchmark": "demo-boxes", "metrics": {"roi_acc1": 12.3456, "num_boxes": 19}},
                  {},
                  {"benchmark": "demo-retrieval", "metrics": {"text_retrieval_recall@1": 56.04166, "num_images": 8}})
    write_results(tmp_path / "other" / "ft" / "eval" / "results.jsonl",
                  {"benchmark": "demo-retrieval",
                   "metrics": {"text_retrieval_recall@1": 100.0, "num_images": 8.0, "skipped_images": 0.0}})
    write_results(tmp_path / "more" / "base" / "eval" / "results.jsonl",
                  {"benchmark": "demo-segmentation", "metrics": {"miou": 1.5, "num_images": 8}})
    table = compare_runs([tmp_path / "runs" / "base",  # a run folder
                          tmp_path / "other" / "ft" / "eval" / "results.jsonl",  # a results file
                          tmp_path / "more" / "base" / "eval"])  # an eval folder; its label is taken
    assert table.splitlines() == [
        "benchmark          metric                    base      ft  base'",
        "demo-retrieval     text_retrieval_recall@1  56.04  100.00      -",
        "demo-retrieval     num_images                   8       8      -",
        "demo-retrieval     skipped_images               -       0      -",
        "demo-boxes         roi_acc1                 12.35       -      -",
        "demo-boxes         num_boxes                   19       -      -",
        "demo-segmentation  miou                         -       -   1.50",
        "demo-segmentation  num_images                   -       -      8",
    ]


def test_table_keeps_task_runs_on_different_data_apart(tmp_path, tiny_data):
    for split in ("val", "train"):
        code, _, err = cli("eval", *MODEL, "--task", "retrieval", "--data", tiny_data / f"{split}.jsonl",
                           "--output-dir", tmp_path / "run" / "eval", "--batch-size", "128")
        assert code == 0, err
    code, out, _ = cli("eval", "--table", tmp_path / "run")
    rows = [line.split() for line in out.splitlines()[1:]]
    images = {row[2]: row[4] for row in rows if row[3] == "num_images"}
    assert images == {str(tiny_data / "val.jsonl"): "24", str(tiny_data / "train.jsonl"): "96"}
    assert {row[2] for row in rows if row[3] == "text_retrieval_recall@1"} == set(images)


def test_read_results_names_the_file_and_line_of_an_entry_that_is_not_a_result(tmp_path):
    write_results(tmp_path / "results.jsonl", {"benchmark": "demo-boxes", "metrics": {"roi_acc1": 1.0}},
                  {"benchmark": "demo-boxes"})
    with pytest.raises(ValueError, match=r"results\.jsonl:2: not an evaluation result"):
        read_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="no evaluation results"):
        read_results(tmp_path / "elsewhere")


def assert_pngs(paths: list[Path]) -> None:
    for path in paths:
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 0
            image.load()


@pytest.mark.parametrize(("args", "outputs"), [
    (["attention", *MODEL[:2], "--data", "demo:val", "--max-images", "2", "--per-head", "--keep-ratio", "0.5",
      "--out", "{out}/attention.png"], ["attention.png"]),
    (["attention", *MODEL[:2], "--data", "demo:val", "--max-images", "1", "--layer", "0",
      "--out", "{out}/layer0.png"], ["layer0.png"]),
    (["clusters", "--models", "a=finegrain-test", "b=finegrain-test", "--data", "demo:val", "--max-images", "2",
      "--k", "3", "--out", "{out}/clusters.png"], ["clusters.png"]),
    (["boxes", *MODEL[:2], "--data", "demo:val", "--max-images", "2", "--way", "crop", "--out-dir", "{out}/boxes"],
     ["boxes/000000.png", "boxes/000001.png"]),
    (["segmentation", *MODEL[:2], "--max-images", "2", "--out-dir", "{out}/seg"], ["seg/000000.png", "seg/000001.png"]),
], ids=["attention", "attention-layer", "clusters", "boxes", "segmentation"])
def test_viz_subcommand_writes_its_pngs(tmp_path, args, outputs):
    code, out, err = cli("viz", *[a.format(out=tmp_path) for a in args], "--device", "cpu")
    assert code == 0, err
    paths = [tmp_path / name for name in outputs]
    assert out.splitlines() == [f"wrote {path}" for path in paths]
    assert_pngs(paths)


def test_viz_clusters_without_out_writes_under_runs_viz_and_never_replaces_a_foreign_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ("viz", "clusters", "--models", "a=finegrain-test", "--data", "demo:val", "--max-images", "1", "--k", "2",
            "--device", "cpu")
    code, out, err = cli(*args)
    assert code == 0, err
    assert out.splitlines() == [f"wrote {Path('runs/viz/clusters.png')}"]
    assert_pngs([tmp_path / "runs/viz/clusters.png"])
    assert cli(*args)[0] == 0  # its own picture is replaced
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"not finegrain's")
    code, out, err = cli(*args, "--out", foreign)
    assert code == 2 and out == ""
    assert err.splitlines() == [(f"finegrain viz: error: {foreign} exists and is not a picture finegrain wrote: "
                                 "choose another output path, or move that file away")]
    assert foreign.read_bytes() == b"not finegrain's"


def test_viz_help_is_plain_text_listing_the_pictures(capsys):
    with pytest.raises(SystemExit):
        main(["viz", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":mod:" not in out
    assert "clusters      k-means of the dense features" in out and "runs/viz/" in out


def test_viz_boxes_mask_way_on_non_panoptic_data_is_a_one_line_error(tmp_path):
    code, out, err = cli("viz", "boxes", *MODEL[:2], "--data", "demo:val", "--way", "mask",
                         "--out-dir", tmp_path / "boxes")
    assert code == 2 and out == ""
    assert err.splitlines() == ["finegrain viz: error: --way mask needs COCO panoptic data (segment masks)"]
    assert not (tmp_path / "boxes").exists()
