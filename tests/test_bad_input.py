"""Malformed data: box rules, skipped-and-counted records in every reader, strict mode, encodings, and the
bad-record counter counting distinct records."""

from __future__ import annotations

import io
import json
import logging
import math
import re
from itertools import islice

import pytest
import torch
from PIL import Image

from finegrain.data import dataset as dataset_module
from finegrain.data.collate import collate
from finegrain.data.dataset import BadRecordCounter, RecordDataset, ResumableBatchSampler
from finegrain.data.readers import read_coco_captions, read_coco_instances, read_csv, read_jsonl, read_records
from finegrain.data.records import Record, RecordError, Region, check_record_size, fit_boxes, parse_record
from finegrain.data.webdataset import ShardStream, sample_id, write_shards
from finegrain.errors import DataError


def _record(*boxes, **fields) -> dict:
    return {"image": "a.png", "regions": [{"box": list(b)} for b in boxes], **fields}


# ----- boxes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_box_drops_that_region_naming_record_and_field(value):
    record = parse_record(_record((0, 0, 4, 4), (0, 0, value, 4)), "data.jsonl:7")
    assert record.regions == (Region((0.0, 0.0, 4.0, 4.0)),)
    (message,) = record.bad_regions
    assert re.match(r"data.jsonl:7: field 'regions\[1\].box'.*NaN or infinite", message)


def test_reversed_box_message_suggests_xywh():
    (message,) = parse_record(_record((10, 20, 5, 8)), "k").bad_regions
    assert re.match(r"k: field 'regions\[0\].box' \[10, 20, 5, 8\] has x1 < x0 or y1 < y0.*"
                    r"\[x0, y0, x1, y1\].*\[x, y, width, height\]", message)


def test_one_reversed_box_drops_that_region_and_keeps_the_image_and_its_good_regions(tmp_path):
    path = tmp_path / "regions.jsonl"
    record = {"image": "a.png", "captions": ["two cups"], "width": 100, "height": 50,
              "regions": [{"box": [10, 10, 30, 30], "caption": "a cup"}, {"box": [60, 40, 50, 20], "caption": "x"},
                          {"box": [40, 10, 70, 30], "caption": "another cup"}]}
    path.write_text(json.dumps(record) + "\n")
    (parsed,) = read_jsonl(path)  # was: the whole line a bad record
    assert [r.caption for r in parsed.regions] == ["a cup", "another cup"] and parsed.captions == ("two cups",)
    assert len(parsed.bad_regions) == 1 and parsed.bad_regions[0].startswith(f"{path}:1: field 'regions[1].box'")
    with pytest.raises(RecordError, match=r"regions.jsonl:1: field 'regions\[1\].box'"):
        read_jsonl(path, strict=True)


def test_one_negative_coco_box_drops_that_region_and_keeps_the_image(tmp_path):
    path = tmp_path / "inst.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [60, 10, -20, 10]},
                        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [40, 5, 10, 10]}],
        "categories": [{"id": 1, "name": "cup"}]}))
    records = read_coco_instances(path)  # was: no record, one failure
    assert records.failures == []
    (record,) = records
    assert [r.box for r in record.regions] == [(10.0, 10.0, 30.0, 30.0), (40.0, 5.0, 50.0, 15.0)]
    message = (f"{path}: image 1: annotation 11: field 'bbox' [60, 10, -20, 10] has a negative width or height "
               "(COCO boxes are [x, y, width, height])")
    assert record.bad_regions == (message,)
    with pytest.raises(RecordError, match=r"annotation 11: field 'bbox'"):
        read_coco_instances(path, strict=True)


def test_normalised_boxes_are_refused_at_parse_time_when_the_size_is_known():
    with pytest.raises(RecordError, match=r"k: field 'regions'.*look normalised to \[0, 1\].*absolute pixels"
                                          r".*640x480 image"):
        parse_record(_record((0.1, 0.2, 0.5, 0.6), (0.0, 0.0, 1.0, 1.0), width=640, height=480), "k")
    record = parse_record(_record((0.1, 0.2, 0.5, 0.6)), "k")  # size unknown: fit_boxes catches it
    with pytest.raises(RecordError, match=r"k: field 'regions'.*look normalised.*640x480"):
        fit_boxes(record.regions, 640, 480, "k")


def test_outside_and_zero_area_boxes_parse_and_fit_boxes_clips_drops_and_counts():
    record = parse_record(_record((10, 10, 20, 20), (-5, 10, 20, 60), (120, 0, 130, 10), (30, 30, 30, 40),
                                  width=100, height=50), "k")
    assert len(record.regions) == 4
    kept, clipped, dropped = fit_boxes(record.regions, 100, 50, "k")
    # inside: kept; partly outside: clipped to (0, 10, 20, 50); wholly outside and zero-area: dropped
    assert [r.box for r in kept] == [(10.0, 10.0, 20.0, 20.0), (0.0, 10.0, 20.0, 50.0)]
    assert (clipped, dropped) == (1, 2)


def test_check_record_size():
    record = Record("a.jpg", regions=(Region((1, 1, 5, 5)),), width=640, height=480, key="f.jsonl:2")
    check_record_size(record, (640, 480))
    check_record_size(Record("a.jpg"), (1, 1))  # no size in the record: nothing to check
    with pytest.raises(RecordError, match=r"f.jsonl:2: fields 'width'/'height' say 640x480 but the image is "
                                          r"480x640 \(the record matches the stored, un-rotated image"):
        check_record_size(record, (480, 640))
    with pytest.raises(RecordError, match=r"say 640x480 but the image is 100x100; its boxes"):
        check_record_size(Record("a.jpg", regions=(Region((1, 1, 5, 5)),), width=640, height=480), (100, 100))


def test_caption_only_record_sized_in_the_stored_frame_of_a_rotated_photo_is_kept():
    """A COCO captions record with a sideways photo's stored size has no box to misplace: training keeps it."""
    captions_only = Record("a.jpg", ("a cat",), width=640, height=480, key="captions.json: image 1")
    check_record_size(captions_only, (480, 640))
    with_a_box = Record("a.jpg", ("a cat",), (Region((10, 10, 20, 20)),), 640, 480, key="instances.json: image 1")
    with pytest.raises(RecordError, match=r"instances.json: image 1: fields 'width'/'height' say 640x480 but "
                                          r"the image is 480x640 \(the record matches the stored"):
        check_record_size(with_a_box, (480, 640))


# ----- readers: skip and report, or strict ----------------------------------------------------------------


def _identity_build(image: Image.Image, record: Record, seed: int) -> dict:
    return {"image": torch.tensor(image.size), "caption": record.captions[0]}


def test_jsonl_bad_line_is_skipped_and_counted_in_training_and_strict_raises(tmp_path):
    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "caption": f"c{i}"}) for i in range(4)]
    lines[2] = '{"image": "a.png", "caption": '  # line 3: truncated JSON
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=rf"{path}:3: not valid JSON"):
        read_jsonl(path, strict=True)
    records = read_jsonl(path)
    assert len(records) == 4 and records.failures == []
    dataset = RecordDataset(records, tmp_path, _identity_build)
    sample = dataset[(2, 0)]  # record 2 is the bad line: record 3 replaces it
    assert sample["caption"] == "c3"
    assert [(i, m.split(" (")[0]) for i, m in sample["bad_records"]] == [(2, f"{path}:3: not valid JSON")]


def test_bom_files_read(tmp_path):
    bom = "\ufeff"
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_text(bom + json.dumps({"image": "a.png", "caption": "x"}) + "\n", encoding="utf-8")
    assert [r.key for r in read_jsonl(jsonl, strict=True)] == [f"{jsonl}:1"]
    csv_path = tmp_path / "bom.csv"
    csv_path.write_text(bom + "filepath,title\nimg/1.jpg,a cat\n", encoding="utf-8")
    assert [r.image for r in read_csv(csv_path, strict=True)] == ["img/1.jpg"]
    coco = tmp_path / "bom.json"
    coco.write_text(bom + json.dumps({"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}],
                                      "annotations": [{"id": 2, "image_id": 1, "caption": "é"}]}),
                    encoding="utf-8")
    assert read_coco_captions(coco)[0].captions == ("é",)


def test_csv_unterminated_quote_is_one_bad_record_naming_the_lines_it_swallowed(tmp_path):
    rows = [f"img/{i}.jpg,caption {i}" for i in range(1, 17)]
    rows[4] = 'img/5.jpg,"a red circle'  # never closed: the reader runs on to the next quote, in row 12
    rows[11] = 'img/12.jpg,a "big" dog'
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\n" + "\n".join(rows) + "\n")
    records = read_csv(path)  # was: 9 records, one caption holding rows 5-12
    assert [r.image for r in records] == [f"img/{i}.jpg" for i in (1, 2, 3, 4, 13, 14, 15, 16)]
    message = f"{path}:6-13: a quoted field spans lines 6-13 (an unterminated quote swallows the rows after it)"
    assert records.failures == [(f"{path}:6-13", message)]
    with pytest.raises(RecordError, match=r"pairs.csv:6-13: a quoted field spans lines"):
        read_csv(path, strict=True)


def test_csv_row_whose_field_count_differs_from_the_header_is_a_bad_record(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\nimg/1.jpg,a cat\nimg/2.jpg,a red, round ball\nimg/3.jpg\n\nimg/4.jpg,a dog\n")
    records = read_csv(path)  # was: img/2.jpg captioned "a red", img/3.jpg an empty caption
    assert [(r.image, r.captions) for r in records] == [("img/1.jpg", ("a cat",)), ("img/4.jpg", ("a dog",))]
    hint = "where the header has 2 (a separator ',' inside an unquoted caption? quote it)"
    assert records.failures == [(f"{path}:3", f"{path}:3: 3 field(s) {hint}"),
                                (f"{path}:4", f"{path}:4: 1 field(s) {hint}")]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_text_says_save_it_as_utf8(tmp_path, encoding):
    lines = json.dumps({"image": "a.png", "caption": "x"}) + "\n" + json.dumps({"image": "b.png", "caption": "y"})
    jsonl = tmp_path / "utf16.jsonl"
    jsonl.write_text(lines + "\n", encoding=encoding)
    with pytest.raises(RecordError, match=rf"^{jsonl}: UTF-16 text: save it as UTF-8$"):
        read_jsonl(jsonl)
    csv_path = tmp_path / "utf16.csv"
    csv_path.write_text("filepath,title\nimg/1.jpg,a cat\n", encoding=encoding)
    with pytest.raises(RecordError, match=rf"^{csv_path}: UTF-16 text: save it as UTF-8$"):
        read_csv(csv_path)


def test_utf16_coco_json_and_config_say_save_it_as_utf8(tmp_path):
    from finegrain.config import ConfigError, load_config

    coco = tmp_path / "utf16.json"
    coco.write_text(json.dumps({"images": [], "annotations": []}), encoding="utf-16")
    with pytest.raises(RecordError, match=rf"^{coco}:1: UTF-16 text: save it as UTF-8$"):
        read_records(coco)
    config = tmp_path / "utf16.yaml"
    config.write_text("train: {steps: 3}\n", encoding="utf-16")
    with pytest.raises(ConfigError, match=rf"^{config}:1: UTF-16 text: save it as UTF-8$"):
        load_config(str(config))


def test_non_utf8_text_names_file_and_line(tmp_path):
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes(b"filepath,title\nimg/1.jpg,a cat\nimg/2.jpg,caf\xe9\n")
    with pytest.raises(RecordError, match=rf"{csv_path}:3: field 'title' is not UTF-8 text"):
        read_csv(csv_path, strict=True)
    records = read_csv(csv_path)
    assert [r.image for r in records] == ["img/1.jpg"] and records.failures[0][0] == f"{csv_path}:3"
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(RecordError, match=rf"{jsonl}:2: not UTF-8 text \(byte 0xe9 at column 35\)"):
        read_jsonl(jsonl, strict=True)
    coco = tmp_path / "latin1.json"
    coco.write_bytes(b'{"images": [],\n "annotations": [{"caption": "caf\xe9"}]}')
    with pytest.raises(RecordError, match=rf"{coco}:2: not UTF-8 text \(byte 0xe9 at column 34\)") as error:
        read_records(coco)
    assert "\n" not in str(error.value)


def test_coco_bad_images_and_annotations_are_skipped_with_keys(tmp_path):
    path = tmp_path / "inst.json"
    images = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50},
              {"id": 2, "file_name": "b.jpg", "width": 100, "height": 50},
              {"id": 3, "file_name": "", "width": 100, "height": 50},  # bad entry
              {"id": 4, "file_name": "d.jpg", "width": 100, "height": 50}]
    annotations = [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [90, 10, 30, 10]},  # partly outside: fine
                   {"id": 11, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]},
                   {"id": 12, "image_id": 2, "category_id": 1, "bbox": [1, 1, math.nan, 5]},  # that box bad
                   {"id": 13, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]},  # image 3 already bad
                   {"id": 14, "image_id": 9, "category_id": 1, "bbox": [1, 1, 5, 5]},  # unknown image
                   {"id": 15, "image_id": 4, "category_id": 1, "bbox": [0.1, 0.1, 0.2, 0.2]}]  # normalised
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "cup"}]}))
    records = read_coco_instances(path)
    assert [r.image for r in records] == ["a.jpg", "b.jpg"] and records[0].regions[0].box == (90.0, 10.0, 120.0, 20.0)
    assert records[1].regions == (Region((1.0, 1.0, 6.0, 6.0), label="cup"),)
    assert "annotation 12: field 'bbox'" in records[1].bad_regions[0]
    assert [key for key, _ in records.failures] == [f"{path}: image 3", f"{path}: annotation 14", f"{path}: image 4"]
    messages = [m for _, m in records.failures]
    assert "file_name" in messages[0] and "'image_id' 9" in messages[1] and "normalised" in messages[2]
    with pytest.raises(RecordError, match=r"image 3: field 'file_name'"):
        read_coco_instances(path, strict=True)


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (value, value, value)).save(out, format="PNG")
    return out.getvalue()


def test_webdataset_bad_sample_is_reported_by_id_or_raises_when_strict(tmp_path):
    pairs = [(Record(f"{i}.png", (f"c{i}",)), b"broken" if i == 2 else _png(i)) for i in range(6)]
    urls = [str(p) for p in write_shards(pairs, str(tmp_path / "s-%d.tar"), samples_per_shard=6)]
    stream = ShardStream(urls, _identity_build, seed=0, rank=0, world_size=1, batch_size=3, num_workers=0)
    bad = [b for sample in islice(stream.worker_samples(0), 6) for b in sample["bad_records"]]
    assert [record_id for record_id, _ in bad] == [sample_id(urls[0], "2")]
    assert f"{urls[0]}: sample 2" in bad[0][1]
    strict = ShardStream(urls, _identity_build, seed=0, rank=0, world_size=1, batch_size=3, num_workers=0,
                         strict=True)
    with pytest.raises(RecordError, match=rf"{urls[0]}: sample 2: cannot decode image"):
        list(islice(strict.worker_samples(0), 6))


# ----- the bad-record counter -----------------------------------------------------------------------------


BAD = {1, 4, 6, 9, 11, 13}


def _fifteen_records(tmp_path) -> list[Record]:
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    return [Record("missing.png" if i in BAD else "ok.png", (f"c{i}",), key=f"r{i}") for i in range(15)]


def test_counter_counts_6_bad_of_15_as_6_of_15_across_epochs(tmp_path):
    records = _fifteen_records(tmp_path)
    dataset = RecordDataset(records, tmp_path, _identity_build)
    sampler = ResumableBatchSampler(len(records), batch_size=5, seed=1)
    counter = BadRecordCounter(max_fraction=0.5, min_seen=10, num_records=len(records))
    for batch in islice(sampler, 4 * sampler.batches_per_epoch):  # 4 epochs, 60 slots, many retries
        samples = [dataset[key] for key in batch]
        counter.update(len(samples), [b for s in samples for b in s["bad_records"]])
    assert (counter.bad, counter.seen) == (6, 15)
    assert counter.bad_ids == BAD and counter.fraction == pytest.approx(6 / 15)
    assert "missing.png" in counter.examples[0]


def _records_with_missing_images(tmp_path, num: int, missing: range) -> list[Record]:
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    return [Record("missing.png" if i in missing else "ok.png", (f"c{i}",), key=f"r{i}") for i in range(num)]


def test_20_consecutive_missing_images_of_400_do_not_stop_a_run_allowing_10_percent(tmp_path):
    records = _records_with_missing_images(tmp_path, 400, range(100, 120))
    dataset = RecordDataset(records, tmp_path, _identity_build, max_bad_fraction=0.1)  # streak limit 41
    sample = dataset[(100, 0)]  # was: "16 consecutive records failed to load"
    assert [i for i, _ in sample["bad_records"]] == list(range(100, 120)) and sample["records_tried"] == 21
    strict_fraction = RecordDataset(records, tmp_path, _identity_build, max_bad_fraction=0.01)  # limit 16
    with pytest.raises(DataError, match=r"^16 consecutive records failed to load \(records 100..115 of 400\): "
                                          r"more than data.max_bad_fraction=0.01 of the data \(a streak of "
                                          r"max\(16, max_bad_fraction x records \+ 1\) failures stops the run\)"):
        strict_fraction[(100, 0)]


def test_failure_streak_limit_fits_the_data_size():
    assert dataset_module.failure_streak_limit(0.1, 400) == 41
    assert dataset_module.failure_streak_limit(0.01, 400) == 16
    assert dataset_module.failure_streak_limit(0.01, 10_000) == 101
    assert dataset_module.failure_streak_limit(0.5, 10) == 10  # never more than the records


def test_counter_never_reports_more_bad_records_than_seen_after_a_streak(tmp_path, caplog):
    records = _records_with_missing_images(tmp_path, 400, range(100, 120))
    dataset = RecordDataset(records, tmp_path, _identity_build, max_bad_fraction=0.1)
    samples = [dataset[(i, 0)] for i in (100, 101, 5, 6)]  # two slots whose replacement chains fail
    batch = collate([{k: s[k] for k in ("records_tried", "bad_records")} for s in samples])
    counter = BadRecordCounter(max_fraction=0.1, num_records=400)
    with caplog.at_level(logging.WARNING, logger="finegrain.data.dataset"):
        counter.update(batch["records_tried"], batch["bad_records"])  # was: 20 bad of 4 seen
    assert (counter.bad, counter.seen) == (20, 43)
    assert "(1 bad records of 43 seen, 0 bad regions so far)" in caplog.records[0].getMessage()


def test_counter_counts_malformed_regions_once_and_lists_every_skip(tmp_path):
    counter = BadRecordCounter(max_fraction=1.0, num_records=100)
    counter.set_source(100, [("f.csv:3", "f.csv:3: bad row")], name="f.csv")
    counter.update(4, [(7, "r7: gone")], ["r9: field 'regions[1].box' reversed"])
    counter.update(4, [(7, "r7: gone")], ["r9: field 'regions[1].box' reversed"])  # the same again: not counted
    assert (counter.bad, counter.bad_regions) == (2, 1)
    assert counter.take_entries() == [
        {"source": "f.csv", "skipped": "record", "record": "f.csv:3", "reason": "f.csv:3: bad row"},
        {"source": "f.csv", "skipped": "record", "record": 7, "reason": "r7: gone"},
        {"source": "f.csv", "skipped": "region", "reason": "r9: field 'regions[1].box' reversed"}]
    assert counter.take_entries() == []
    assert counter.first_examples() == ["f.csv:3: bad row", "r7: gone"]  # the reader's skips too (was: [])


def test_counter_raises_over_the_limit_with_examples():
    counter = BadRecordCounter(max_fraction=0.3, min_seen=4, num_records=15)
    counter.update(2, [(1, "r1: gone")])
    counter.update(1, [])  # 3 loaded < min_seen: 1 of 3 is not checked yet
    counter.check()
    counter.update(1, [(4, "r4: gone"), (1, "r1: gone")])  # counting never raises: the trainer checks
    with pytest.raises(DataError, match=r"(?s)2 of 4 records are bad.*50.0% of the data > data.max_bad_fraction=30.0%"
                                          r".*r1: gone.*r4: gone"):
        counter.check()


def test_counter_is_seeded_with_read_failures_and_estimates_the_fraction():
    failures = [(f"f.csv:{i}", f"f.csv:{i}: bad") for i in (2, 5, 7)]
    counter = BadRecordCounter(max_fraction=0.9, min_seen=1)
    counter.set_source(7, failures)  # 7 good rows of 10
    assert (counter.bad, counter.seen, counter.fraction) == (3, 3, pytest.approx(0.3))
    counter.update(4, [(0, "a"), (3, "b")])
    # read share 3/10 plus the good rows' share 7/10 times the load failure rate 2/4
    assert (counter.bad, counter.seen, counter.fraction) == (5, 7, pytest.approx(0.3 + 0.7 * 0.5))
    counter.update(8, [])  # 12 slots: all 7 loaded
    assert (counter.bad, counter.seen, counter.fraction) == (5, 10, pytest.approx(5 / 10))
    strict_limit = BadRecordCounter(max_fraction=0.2, min_seen=1, num_records=7, read_failures=failures)
    strict_limit.update(1, [])
    with pytest.raises(DataError, match=r"3 malformed in the file"):
        strict_limit.check()


def test_counter_state_round_trip_keeps_distinct_ids():
    counter = BadRecordCounter(max_fraction=1.0, min_seen=1, num_records=100)
    counter.update(10, [(3, "x"), (7, "y")])
    restored = BadRecordCounter(max_fraction=1.0, min_seen=1, num_records=100)
    restored.load_state_dict(counter.state_dict())
    restored.update(10, [(3, "x again")])
    assert (restored.bad, restored.seen, restored.examples) == (2, 20, ["x", "y"])


def test_counter_logs_the_first_ten_skips_then_at_most_every_interval(monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(dataset_module.time, "monotonic", lambda: now[0])
    counter = BadRecordCounter(max_fraction=1.0, min_seen=1, log_interval=30.0)
    with caplog.at_level(logging.WARNING, logger="finegrain.data.dataset"):
        counter.update(20, [(i, f"record {i} broken") for i in range(12)])
        now[0] += 10
        counter.update(1, [(12, "record 12 broken")])
        now[0] += 25  # 35 s after the last line
        counter.update(1, [(13, "record 13 broken")])
    skipped = [r.getMessage() for r in caplog.records if "skipped a bad record" in r.getMessage()]
    assert [m.rsplit(": ", 1)[1] for m in skipped] == [f"record {i} broken" for i in (*range(10), 13)]
    assert "(14 bad records of 22 seen, 0 bad regions so far)" in skipped[-1]
    assert any("at most every 30 s" in r.getMessage() for r in caplog.records)


def test_region_json_round_trip_keeps_zero_area_boxes_for_fit_boxes():
    region = Region((5.0, 5.0, 5.0, 9.0), label="dot")
    record = parse_record({"image": "a.png", "regions": [region.to_json()]}, "k")
    assert record.regions == (region,)
    assert fit_boxes(record.regions, 10, 10, "k") == ([], 0, 1)
