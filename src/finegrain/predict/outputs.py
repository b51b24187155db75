"""A prediction run's files, in standard formats, written so that a run can be split over processes and resumed.

``OUT/`` holds:

- ``predict.json``: what was run (checkpoint, kind, classes, options); a later ``--resume`` must match it;
- ``predictions.jsonl``: one line per image, in input order (``image``, ``width``, ``height`` and the results);
- detections: ``detections.json``, COCO results (``bbox`` xywh, ``score``, ``category_id``, RLE ``segmentation``
  with masks) and ``images.json``, the COCO ``images`` and ``categories`` they refer to, so that
  ``COCO("images.json").loadRes("detections.json")`` loads them;
- segmentation: ``labels/<image>.png``, the label map (8-bit with a palette up to 256 classes, else 16-bit),
  and ``classes.txt``, the class of each value;
- ``parts/rank<r>.jsonl``: each process's lines as it goes (what ``--resume`` reads), merged into the files above;
- ``summary.json``: images, predicted, skipped (unreadable, with the first reasons), seconds, images/s.

Nothing is replaced that a prediction run did not write: ``OUT`` may hold other files, but an earlier run's
files are only continued with ``resume``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..eval.detection import encode_masks
from .results import Classification, Detections, Segmentation

FORMAT = "finegrain.predict/1"
MANIFEST = "predict.json"
OWN_FILES = (MANIFEST, "predictions.jsonl", "detections.json", "images.json", "classes.txt", "summary.json")
OWN_FOLDERS = ("parts", "labels", "overlays")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def image_keys(paths: Sequence[Path]) -> list[str]:
    """Each image's name under ``labels/`` (and ``overlays/``): its path relative to the inputs' common folder,
    without suffix (``photos/a.jpg``, ``photos/sub/b.jpg`` -> ``a``, ``sub/b``)."""
    if not paths:
        return []
    resolved = [Path(os.path.abspath(p)) for p in paths]
    base = Path(os.path.commonpath([p.parent for p in resolved]))
    return [p.relative_to(base).with_suffix("").as_posix() for p in resolved]


def check_output_folder(out: Path, resume: bool) -> dict | None:
    """Before anything is loaded or written: ``out`` may be new, hold other files, or (with ``resume``) an earlier
    run, whose manifest is returned (None otherwise). An earlier run without ``resume``, or a file of ours that no
    run wrote, is a ``FileExistsError`` naming it."""
    earlier = out / MANIFEST
    if earlier.is_file():
        try:
            written = json.loads(earlier.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            written = {}
        if not isinstance(written, dict) or written.get("format") != FORMAT:
            raise FileExistsError(f"{earlier} exists and was not written by finegrain predict: choose another --out")
        if not resume:
            raise FileExistsError(f"{out} holds an earlier prediction run ({earlier}): --resume continues it, or "
                                  "choose another --out")
        return written
    foreign = [name for name in (*OWN_FILES, *OWN_FOLDERS) if (out / name).exists()]
    if foreign:
        raise FileExistsError(f"{out / foreign[0]} exists and no prediction run wrote it (no {MANIFEST}): choose "
                              "another --out, or move it away")
    return None


def check_same_run(out: Path, earlier: dict | None, manifest: dict) -> set[str]:
    """The images already done when resuming ``earlier`` (a manifest from :func:`check_output_folder`) with
    ``manifest``: another checkpoint, kind, class list or options is a ``DataError`` naming them."""
    if earlier is None:
        return set()
    changed = [key for key in ("checkpoint", "kind", "classes", "options") if earlier.get(key) != manifest[key]]
    if changed:
        raise DataError(f"--resume: {out} was predicted with another {', '.join(changed)} "
                        f"({', '.join(f'{k}={earlier.get(k)!r}' for k in changed)[:300]}): choose another --out")
    return done_images(out)


def done_images(out: Path) -> set[str]:
    """The images with a prediction line in ``out/parts/*.jsonl`` (any process count)."""
    return {line["image"] for line in read_parts(out) if "skipped" not in line}


def read_parts(out: Path) -> list[dict]:
    """Every line of ``out/parts/*.jsonl``; a last line cut short by a killed process is ignored."""
    lines = []
    for part in sorted((out / "parts").glob("rank*.jsonl")):
        for text in part.read_text().splitlines():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                continue
    return lines


def detection_line(result: Detections) -> dict:
    """A :class:`Detections` as a JSON line's ``detections``: ``box`` xyxy, ``score``, ``label`` (name),
    ``class_id`` (index into the run's classes) and, with masks, ``mask`` (COCO RLE)."""
    masks = encode_masks(result.masks.numpy()) if result.masks is not None else None
    rows = []
    for k, (box, score, label) in enumerate(zip(result.boxes.tolist(), result.scores.tolist(),
                                                result.labels.tolist())):
        row = {"box": box, "score": score, "label": result.class_names[label],
               "class_id": label}
        if masks is not None:
            row["mask"] = masks[k]
        rows.append(row)
    return {"detections": rows}


def write_label_map(path: Path, label_map: torch.Tensor, palette: np.ndarray | None = None) -> None:
    """``(H, W)`` class indices as a PNG: 8-bit with ``palette`` ``(C, 3)`` uint8 (when at most 256 classes),
    else 16-bit grey."""
    values = label_map.numpy()
    if values.max(initial=0) < 256:
        image = Image.fromarray(values.astype(np.uint8), "P")
        if palette is not None:
            colours = np.zeros((256, 3), np.uint8)
            colours[:len(palette)] = palette[:256]
            image.putpalette(colours.reshape(-1).tolist())
    else:
        image = Image.fromarray(values.astype(np.uint16))
    encoded = io.BytesIO()
    image.save(encoded, format="PNG")
    write_atomic(path, encoded.getvalue())


def segmentation_line(result: Segmentation, label_path: str) -> dict:
    """A :class:`Segmentation` as a JSON line: the label map's file and the pixels of each class present."""
    counts = torch.bincount(result.label_map.flatten(), minlength=len(result.class_names))
    return {"label_map": label_path,
            "pixels": {result.class_names[i]: int(counts[i]) for i in counts.nonzero().flatten().tolist()}}


def classification_line(result: Classification, top: int = 5) -> dict:
    return {"top": [[name, score] for name, score in result.top(top)]}


def merge(out: Path, images: Sequence[Path], kind: str, classes: Sequence[str]) -> dict:
    """Merge ``parts/`` into ``predictions.jsonl`` (input order; an image's last line wins) and, for detections,
    ``detections.json`` + ``images.json``; return the counts (``images``, ``predicted``, ``skipped``,
    ``skipped_first``)."""
    latest = {line["image"]: line for line in read_parts(out)}
    ordered = [latest[str(path)] for path in images if str(path) in latest]
    predicted = [line for line in ordered if "skipped" not in line]
    skipped = [line["skipped"] for line in ordered if "skipped" in line]
    write_atomic(out / "predictions.jsonl", "".join(json.dumps(line) + "\n" for line in predicted))
    if kind == "detection":
        ids = {str(path): i for i, path in enumerate(images, 1)}
        coco_images = [{"id": ids[line["image"]], "file_name": line["image"], "width": line["width"],
                        "height": line["height"]} for line in predicted]
        categories = [{"id": i, "name": name} for i, name in enumerate(classes, 1)]
        write_atomic(out / "images.json", json.dumps({"images": coco_images, "categories": categories,
                                                      "annotations": []}))
        results = []
        for line in predicted:
            for row in line["detections"]:
                x0, y0, x1, y1 = row["box"]
                entry = {"image_id": ids[line["image"]], "category_id": row["class_id"] + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "score": row["score"]}
                if "mask" in row:
                    entry["segmentation"] = row["mask"]
                results.append(entry)
        write_atomic(out / "detections.json", json.dumps(results))
    if kind == "segmentation":
        write_atomic(out / "classes.txt", "".join(f"{name}\n" for name in classes))
    return {"images": len(images), "predicted": len(predicted), "skipped": len(skipped),
            "skipped_first": skipped[:5]}
