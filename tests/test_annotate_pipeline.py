"""`finegrain annotate` end to end: sources, the pipeline, sharded output, resume, data parallelism, export."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finegrain.annotate.base import Proposal, ProposalFilter
from finegrain.annotate.output import AnnotationOutput, export_paper_layout, read_output
from finegrain.annotate.pipeline import AnnotationCounts, Annotator, run_annotation
from finegrain.annotate.sources import ImageSource
from finegrain.cli import main
from finegrain.config import DataSourceConfig
from finegrain.data.coco_regions import read_coco_region_text
from finegrain.data.loader import resolve_source
from finegrain.data.readers import read_jsonl
from finegrain.data.webdataset import iter_tar_samples, sample_to_record, write_shards
from finegrain.models import create_model
from finegrain.train.trainer import train

skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


class SizeCaptioner:
    """A captioner whose caption says the size of what it saw (checks crops reach it) and counts calls."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def describe(self) -> str:
        return "size"

    def caption(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # the process is killed here
        return [f"a crop of {im.width} by {im.height} pixels" for im in images]


class RecordBoxes:
    """The record's own boxes, plus one box wholly outside the image (zero area after clipping)."""

    def describe(self) -> str:
        return "record-boxes"

    def propose(self, images, records):
        return [[Proposal(r.box, r.score, r.label) for r in record.regions]
                + [Proposal((image.width + 5.0, 0.0, image.width + 50.0, 10.0), 0.9)]
                for image, record in zip(images, records)]


@pytest.fixture
def photo_folder(tmp_path):
    """The four scikit-image photos as JPEGs in a folder, one in a sub-folder, plus an unreadable file."""
    root = tmp_path / "photos"
    (root / "more").mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        Image.fromarray(getattr(skimage_data, name)()).convert("RGB").save(
            root / ("more" if i == 3 else "") / f"{name}.jpg", quality=90)
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def run(source, folder, annotator, units=None, fmt="jsonl", resume=False, images_per_shard=2):
    src = ImageSource(str(source), images_per_shard=images_per_shard)
    settings = {"source": str(source), **annotator.settings()}
    units = range(src.units) if units is None else units
    output = AnnotationOutput(folder, fmt, settings, src.units, units, resume=resume)
    return run_annotation(src, annotator, output, units, progress=False)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_demo_records_are_well_formed_with_boxes_inside_their_images(tiny_data, tmp_path):
    counts, summary = run(tiny_data / "val.jsonl", tmp_path / "out",
                          Annotator(RecordBoxes(), SizeCaptioner()), images_per_shard=10)
    source = read_jsonl(tiny_data / "val.jsonl")
    records = list(read_output(tmp_path / "out"))
    assert [r.image for r in records] == [r.image for r in source]
    assert summary["images"] == len(source) == counts.images
    assert summary["zero_area_boxes"] == len(source)  # the outside box of each image
    assert summary["regions"] == sum(len(r.regions) for r in source)
    for record, original in zip(records, source):
        assert record.captions == original.captions and record.width == 64 and record.height == 64
        for region, given in zip(record.regions, original.regions, strict=True):
            assert region.box == given.box and region.label == given.label
            x0, y0, x1, y1 = region.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert region.caption == f"a crop of {x1 - x0:.0f} by {y1 - y0:.0f} pixels"
        assert record.source == {"proposer": "record-boxes score>=0 area>=0", "captioner": "size"}
    merged, root = resolve_source(DataSourceConfig(path=str(tmp_path / "out" / "regions.jsonl"), root=str(tiny_data)))
    assert len(merged) == len(records) and merged[3].regions == records[3].regions and root == tiny_data


def test_unreadable_images_are_skipped_and_counted_and_images_without_regions_left_out(photo_folder, tmp_path):
    class Quarter:
        def describe(self):
            return "quarter"

        def propose(self, images, records):  # the top-left quarter, none for the coffee photo
            return [[] if "coffee" in r.image else [Proposal((0, 0, im.width / 2, im.height / 2), 0.5)]
                    for im, r in zip(images, records)]

    _, summary = run(photo_folder, tmp_path / "out", Annotator(Quarter(), SizeCaptioner(),
                                                                    caption_images=True))
    records = {r.image: r for r in read_output(tmp_path / "out")}
    assert sorted(records) == ["astronaut.jpg", "chelsea.jpg", "more/rocket.jpg"]
    assert summary["unreadable_images"] == 1 and summary["images_without_regions"] == 1
    (left_out,) = summary["left_out"]  # named, with the reason, in summary.json
    assert left_out.startswith(f"{photo_folder / 'broken.jpg'}: cannot decode image")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["left_out"] == [left_out]
    assert summary["captioned_images"] == 3
    chelsea = records["chelsea.jpg"]
    assert (chelsea.width, chelsea.height) == (451, 300)
    assert chelsea.regions[0].box == (0.0, 0.0, 225.5, 150.0)
    assert chelsea.captions == ("a crop of 451 by 300 pixels",)  # the whole image, captioned


def test_boxes_are_in_the_exif_oriented_frame(tmp_path):
    """A photo stored sideways (orientation 6) is annotated upright, as training loads it."""
    root = tmp_path / "exif"
    root.mkdir()
    stored = Image.fromarray(skimage_data.astronaut()).resize((200, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(root / "sideways.jpg", exif=exif)

    class Whole:
        def describe(self):
            return "whole"

        def propose(self, images, records):
            return [[Proposal((0, 0, im.width, im.height))] for im in images]

    run(root, tmp_path / "out", Annotator(Whole(), SizeCaptioner()))
    (record,) = read_output(tmp_path / "out")
    assert (record.width, record.height) == (100, 200)
    assert record.regions[0].box == (0.0, 0.0, 100.0, 200.0)


def test_files_a_folder_source_passes_over_are_counted_by_extension(photo_folder):
    for name in ("anim.gif", "more/still.GIF", "notes.txt", "README"):
        (photo_folder / name).write_bytes(b"x")
    source = ImageSource(str(photo_folder))
    assert source.size == 5  # four photos and broken.jpg
    assert source.passed_over == {".gif": 2, ".txt": 1, "": 1}
    assert source.passed_over_summary() == "4 file(s) that are not images it reads: 2 .gif, 1 (no extension), 1 .txt"
    assert ImageSource(str(photo_folder / "more")).passed_over_summary() == (
        "1 file(s) that are not images it reads: 1 .gif")


def test_record_sized_in_the_stored_frame_of_a_rotated_photo_is_left_out_as_training_does(tmp_path):
    """Orientation 6: stored 80x60, displayed 60x80. A record giving the stored size and a box in the stored
    frame was kept, its box clipped to [50, 5, 60, 25]; training refuses it: so does annotate now."""
    from finegrain.data.records import RecordError, check_record_size

    root = tmp_path / "exif"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(skimage_data.astronaut()).resize((80, 60)).save(root / "sideways.jpg", exif=exif)
    stored_frame = {"image": "sideways.jpg", "width": 80, "height": 60, "captions": ["an astronaut"],
                    "regions": [{"box": [50, 5, 75, 25]}]}
    (root / "data.jsonl").write_text(json.dumps(stored_frame) + "\n" + json.dumps({**stored_frame, "width": 60,
                                                                                    "height": 80}) + "\n")
    _, summary = run(root / "data.jsonl", tmp_path / "out", Annotator(RecordBoxes(), SizeCaptioner()))
    (record,) = read_output(tmp_path / "out")  # the second line, sized as displayed
    assert record.regions[0].box == (50.0, 5.0, 60.0, 25.0)
    assert summary["malformed_records"] == 1 and summary["images"] == 1
    (left_out,) = summary["left_out"]
    assert f"{root / 'data.jsonl'}:1: fields 'width'/'height' say 80x60 but the image is 60x80" in left_out
    first = read_jsonl(root / "data.jsonl")[0]
    with pytest.raises(RecordError, match=re.escape(left_out)):  # the same rule, the same words, as training
        check_record_size(first, (60, 80))


def test_a_reversed_source_box_drops_that_region_and_is_counted(tiny_data, tmp_path):
    line = json.loads((tiny_data / "val.jsonl").read_text().splitlines()[0])
    line["regions"].append({"box": [40, 10, 20, 30], "caption": "reversed"})
    line["image"] = str(tiny_data / line["image"])
    (tmp_path / "data.jsonl").write_text(json.dumps(line) + "\n")
    _, summary = run(tmp_path / "data.jsonl", tmp_path / "out", Annotator(RecordBoxes(), SizeCaptioner()))
    (record,) = read_output(tmp_path / "out")  # was: the record left out as malformed
    assert len(record.regions) == len(line["regions"]) - 1 and summary["malformed_records"] == 0
    assert summary["malformed_regions"] == 1
    (message,) = summary["left_out"]
    assert message.startswith(f"{tmp_path / 'data.jsonl'}:1: field 'regions[{len(line['regions']) - 1}].box' "
                              "[40, 10, 20, 30] has x1 < x0")


def test_resume_after_a_kill_mid_run_writes_exactly_the_uninterrupted_output(tiny_data, tmp_path):
    source = tiny_data / "val.jsonl"
    run(source, tmp_path / "whole", Annotator(RecordBoxes(), SizeCaptioner(), batch_size=4), images_per_shard=8)
    with pytest.raises(KeyboardInterrupt):  # dies in the middle of the second shard
        run(source, tmp_path / "killed", Annotator(RecordBoxes(), SizeCaptioner(fail_after=3), batch_size=4),
            images_per_shard=8)
    assert sorted(p.name for p in (tmp_path / "killed").glob("*.stats.json")) == ["regions-000000.stats.json"]
    with pytest.raises(ValueError, match="--resume continues it"):
        run(source, tmp_path / "killed", Annotator(RecordBoxes(), SizeCaptioner(), batch_size=4), images_per_shard=8)
    captioner = SizeCaptioner()
    run(source, tmp_path / "killed", Annotator(RecordBoxes(), captioner, batch_size=4), images_per_shard=8,
        resume=True)
    assert captioner.calls == 4  # shards 2 and 3 only: 16 images in batches of 4
    assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "whole")


def test_shards_split_over_processes_cover_every_image_once(tiny_data, tmp_path):
    source = tiny_data / "val.jsonl"
    run(source, tmp_path / "one", Annotator(RecordBoxes(), SizeCaptioner()), images_per_shard=5)
    summaries = [run(source, tmp_path / "three", Annotator(RecordBoxes(), SizeCaptioner()),
                     units=range(k, 5, 3), images_per_shard=5)[1] for k in range(3)]
    assert summaries[:2] == [None, None] and summaries[2]["images"] == 24  # the last process finishes the run
    assert folder_bytes(tmp_path / "three") == folder_bytes(tmp_path / "one")


def test_webdataset_in_and_out_keeps_images_and_passes_captions(tiny_data, tmp_path):
    source = read_jsonl(tiny_data / "val.jsonl")
    samples = [(r, (tiny_data / r.image).read_bytes()) for r in source]
    write_shards(samples, str(tmp_path / "in-%02d.tar"), 10)
    _, summary = run(tmp_path / "in-{00..02}.tar", tmp_path / "out", Annotator(RecordBoxes(), SizeCaptioner()),
                          fmt="wds")
    assert summary["images"] == 24
    out = sorted((tmp_path / "out").glob("regions-*.tar"))
    assert [p.name for p in out] == ["regions-000000.tar", "regions-000001.tar", "regions-000002.tar"]
    read = [sample_to_record(s) for p in out for s in iter_tar_samples(p)]
    for (record, image), (given, given_image) in zip(read, samples, strict=True):
        assert image == given_image and record.captions == given.captions
        assert [r.box for r in record.regions] == [r.box for r in given.regions]
        assert Image.open(io.BytesIO(image)).size == (record.width, record.height)


def test_paper_layout_export_reads_back_as_the_same_boxes_and_captions(tiny_data, tmp_path):
    run(tiny_data / "val.jsonl", tmp_path / "out", Annotator(RecordBoxes(), SizeCaptioner()))
    records = list(read_output(tmp_path / "out"))
    counts = export_paper_layout(records, tmp_path / "paper")
    assert counts == {"images": 24, "regions": sum(len(r.regions) for r in records),
                      "captions": sum(len(r.captions) for r in records), "duplicate_keys": 0}
    back, summary = read_coco_region_text(tmp_path / "paper" / "captions.json", tmp_path / "paper" / "proposals.json",
                                          tmp_path / "paper" / "region_captions.json")
    assert summary.regions_without_caption == 0
    for got, want in zip(back, records, strict=True):
        assert got.image == want.image and got.captions == want.captions
        assert [(r.box, r.caption) for r in got.regions] == [(r.box, r.caption) for r in want.regions]


def test_output_folder_of_other_settings_or_other_files_is_refused(tiny_data, tmp_path):
    source = tiny_data / "val.jsonl"
    run(source, tmp_path / "out", Annotator(RecordBoxes(), SizeCaptioner()))
    with pytest.raises(ValueError, match=r"other settings \(differing: filter\)"):
        run(source, tmp_path / "out", Annotator(RecordBoxes(), SizeCaptioner(), ProposalFilter(min_area=4)),
            resume=True)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no annotation"):
        run(source, tmp_path / "foreign", Annotator(RecordBoxes(), SizeCaptioner()))
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_counts_add_up_field_by_field():
    a, b = AnnotationCounts(images=2, regions=5), AnnotationCounts(images=1, zero_area_boxes=3)
    a.add(b)
    assert (a.images, a.regions, a.zero_area_boxes) == (3, 5, 3)


def test_cli_gt_template_on_demo_data_then_resume_with_paper_layout(tiny_data, tmp_path, capsys):
    args = ["annotate", str(tiny_data / "val.jsonl"), "--output", str(tmp_path / "out"), "--proposer", "gt",
            "--captioner", "template", "--clip-model", "finegrain-test", "--concepts",
            str(tiny_data / "segmentation_classes.txt"), "--images-per-shard", "10", "--no-progress",
            "--min-area", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "all 3 shard(s) finished: 24 images" in out and "data.train.path=" in out
    record = next(iter(read_output(tmp_path / "out")))
    assert all(r.caption.startswith("a photo of a ") for r in record.regions)
    assert main(args + ["--resume", "--paper-layout", str(tmp_path / "paper")]) == 0
    assert "wrote the paper layout" in capsys.readouterr().out
    assert json.loads((tmp_path / "paper" / "proposals.json").read_text())["images"][0]["file_name"] == record.image
    assert main(args) == 2  # finished shards without --resume: refused, one line
    assert "--resume continues it" in capsys.readouterr().err
    progress = [a for a in args if a != "--no-progress"]
    assert main(progress + ["--output", str(tmp_path / "with-progress")]) == 0
    assert "class prompts" in capsys.readouterr().err  # encoding the concepts is not silent


def test_overwrite_deletes_exactly_the_files_the_manifest_names(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["annotate", str(tiny_data / "val.jsonl"), "--output", str(out), "--proposer", "gt", "--captioner",
            "template", "--clip-model", "finegrain-test", "--concepts", str(tiny_data / "segmentation_classes.txt"),
            "--images-per-shard", "10", "--no-progress", "--min-area", "0"]
    assert main(args) == 0
    annotation = folder_bytes(out)
    assert len(annotation) == 9  # annotate.json, 3 shards + 3 stats, regions.jsonl, summary.json
    mine = {"regions-notes.txt": b"my notes", "regions-000007.jsonl": b"not a shard of this run",
            "notes.txt": b"more notes", "regions.jsonl.bak.tmp": b"my backup"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    assert main([*args, "--overwrite", "--min-score", "0.5"]) == 0
    capsys.readouterr()
    after = folder_bytes(out)
    assert {name: after[name] for name in mine} == mine  # the user's files stay, whatever their names
    assert set(after) - set(mine) == set(annotation)  # the annotation was replaced, file for file
    assert json.loads(after["annotate.json"])["filter"] != json.loads(annotation["annotate.json"])["filter"]

    (out / "annotate.json").unlink()  # no manifest: --overwrite refuses before deleting anything
    before = folder_bytes(out)
    assert main([*args, "--overwrite"]) == 2
    assert "holds no annotation" in capsys.readouterr().err
    assert folder_bytes(out) == before


def test_paper_layout_never_replaces_files_unless_overwrite(tiny_data, tmp_path, capsys):
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "captions.json").write_text("the user's captions")
    args = ["annotate", str(tiny_data / "val.jsonl"), "--output", str(tmp_path / "out"), "--proposer", "gt",
            "--captioner", "template", "--clip-model", "finegrain-test", "--concepts",
            str(tiny_data / "segmentation_classes.txt"), "--no-progress", "--paper-layout", str(paper)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--paper-layout {paper} already holds captions.json" in err and "--overwrite" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert (paper / "captions.json").read_text() == "the user's captions"
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((paper / "captions.json").read_text())["images"]


def test_resume_removes_the_temp_file_of_a_merge_killed_midway(tiny_data, tmp_path, monkeypatch):
    source = tiny_data / "val.jsonl"
    run(source, tmp_path / "whole", Annotator(RecordBoxes(), SizeCaptioner()), images_per_shard=8)
    with monkeypatch.context() as patch:
        def copy_then_die(src, dst):
            dst.write(src.read(100))
            raise KeyboardInterrupt  # killed while writing regions.jsonl

        patch.setattr("finegrain.annotate.output.shutil.copyfileobj", copy_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(source, tmp_path / "killed", Annotator(RecordBoxes(), SizeCaptioner()), images_per_shard=8)
    left = tmp_path / "killed" / f"regions.jsonl.{os.getpid()}.tmp"
    assert [p.name for p in (tmp_path / "killed").glob("regions.jsonl*")] == [left.name]
    left.rename(tmp_path / "killed" / "regions.jsonl.4242.tmp")  # the killed process had another pid
    run(source, tmp_path / "killed", Annotator(RecordBoxes(), SizeCaptioner()), images_per_shard=8, resume=True)
    assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "whole")


@pytest.mark.slow
def test_cli_killed_process_resumes_to_the_uninterrupted_output(tiny_data, tmp_path):
    """A real kill (SIGKILL) of `finegrain annotate` after its first shard, then the same command with --resume."""
    weights = tmp_path / "clip.pt"  # one CLIP for every process (a random init would differ between them)
    torch.save(create_model("finegrain-test").clip.state_dict(), weights)

    def command(output):
        return [sys.executable, "-m", "finegrain", "annotate", str(tiny_data / "train.jsonl"), "--output", str(output),
                "--proposer", "gt", "--captioner", "template", "--clip-model", "finegrain-test", "--clip-pretrained",
                str(weights), "--concepts", str(tiny_data / "segmentation_classes.txt"), "--images-per-shard", "8",
                "--no-progress", "--device", "cpu"]

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)
    process = subprocess.Popen(command(tmp_path / "killed"), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "killed").glob("*.stats.json")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list((tmp_path / "killed").glob("*.stats.json")))
    assert 1 <= finished < 12
    subprocess.run(command(tmp_path / "killed") + ["--resume"], check=True, env=env, capture_output=True)
    assert folder_bytes(tmp_path / "killed") == folder_bytes(tmp_path / "whole")
    assert np.sum([json.loads(p.read_text())["images"] for p in (tmp_path / "killed").glob("*.stats.json")]) == 96


def test_fineclip_trains_on_the_annotated_output(tiny_data, tiny_config, tmp_path):
    run(tiny_data / "train.jsonl", tmp_path / "out", Annotator(RecordBoxes(), SizeCaptioner()), images_per_shard=50)
    cfg = tiny_config("method.name=fineclip", "train.steps=2", "train.save_every=2",
                      f"data.train.path={tmp_path / 'out' / 'regions.jsonl'}", f"data.train.root={tiny_data}")
    result = train(cfg, progress_bar=False)
    losses = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    region_losses = [r["region_contrastive_loss"] for r in losses if "region_contrastive_loss" in r]
    assert len(region_losses) == 2 and all(np.isfinite(region_losses))
