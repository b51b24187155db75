"""A data error in a loader worker ends `finegrain train` with one line and a non-zero exit, never a hang."""

import json
import subprocess
import sys

import pytest


def _train(data: list[str], tmp_path, workers: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finegrain", "train", "model.name=finegrain-test", *data, "data.batch_size=4",
         f"data.num_workers={workers}", "train.steps=3", "optim.warmup_steps=1",
         f"train.output_dir={tmp_path / f'run{workers}'}", "--no-progress"], capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.parametrize("workers", [2, 0])
def test_jsonl_whose_images_are_all_missing_is_one_line_and_exit_2_with_workers_or_not(tmp_path, workers):
    path = tmp_path / "missing.jsonl"
    path.write_text("".join(json.dumps({"image": f"gone{i}.jpg", "captions": ["a cat"]}) + "\n" for i in range(20)))
    result = _train([f"data.train.path={path}"], tmp_path, workers)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finegrain train: error: 16 consecutive records failed to load")
    assert "gone" in lines[0] and "image file not found" in lines[0] and "Traceback" not in lines[0]


def test_coco_captions_without_root_is_one_line_and_exit_2_with_workers(tiny_data, tmp_path):
    """The images are beside the json's folder, not in it: every image fails in the workers."""
    records = [json.loads(line) for line in (tiny_data / "train.jsonl").read_text().splitlines()]
    coco = {"images": [{"id": i, "file_name": r["image"], "width": r["width"], "height": r["height"]}
                       for i, r in enumerate(records)],
            "annotations": [{"id": i, "image_id": i, "caption": r["captions"][0]} for i, r in enumerate(records)]}
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions.json"
    path.write_text(json.dumps(coco))
    result = _train([f"data.train.path={path}"], tmp_path, 2)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "consecutive records failed to load" in lines[0] and "Traceback" not in lines[0]
