"""``finegrain predict``: a checkpoint run on new images with a vocabulary chosen now, written as standard files
(see :mod:`finegrain.predict.outputs`), split over processes under torchrun / srun, resumable."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import DataError

TASKS = ("auto", "segment", "classify", "embed")
EXAMPLES = """examples:
  finegrain predict --checkpoint runs/demo-finetune/ovd-fineclip/best.pt --images photos/ --classes "red star,blue circle" --out preds/ --draw
  finegrain predict --checkpoint runs/demo-finetune/seg-clip/best.pt --images "photos/*.jpg" --out labels/
  finegrain predict --checkpoint ViT-B-16:openai --images photos/ --classes ade20k-150 --out dense/ --draw   # training-free
  finegrain predict --checkpoint ViT-B-16:openai --task classify --images list.txt --classes "a cat,a dog" --out cls/
  torchrun --nproc_per_node 4 -m finegrain predict --checkpoint ... --images /data/photos --out preds/ --resume

what it writes in --out: predict.json (the run's settings), predictions.jsonl (one line per image), detectors:
detections.json (COCO results, masks as RLE) + images.json (their COCO images and categories); segmenters:
labels/<image>.png (palette PNG of class indices) + classes.txt; --draw: overlays/<image>.png; summary.json.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="run a checkpoint on new images with your class names: COCO json, label maps, pictures",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Predict with any checkpoint: a finetune-ovd run (F-ViT) detects ANY class names given here; a "
                    "finetune-det run (Mask R-CNN) gives boxes and masks of its classes; a finetune-seg run gives label "
                    "maps; any other checkpoint (a finegrain pretraining run, an open_clip NAME:TAG, a released "
                    "checkpoint) segments with any class names from its dense features, or classifies or embeds "
                    "the images (--task). Each image is predicted by the test pipeline of the held-out evaluation "
                    "of its kind, so the files hold what `finegrain eval` / fine-tuning evaluation would score.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT",
                   help="a finegrain checkpoint (*.pt), or NAME:PRETRAINED (an open_clip model and tag or file, e.g. "
                        "ViT-B-16:openai)")
    p.add_argument("--images", required=True, nargs="+", metavar="IMAGES",
                   help="image folders (searched recursively), glob patterns (quote them), image files, text files "
                        "listing image paths (one per line, relative to the list), or records files (JSONL, COCO "
                        "json, CSV; demo:val): their images")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="only the first N images")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="class names: 'a,b,c', a file (one per line) or a built-in list (e.g. ov-coco-novel, "
                        "ade20k-150). Default: a detector's or segmenter's own classes (F-ViT: its base classes). "
                        "A closed-set model keeps a subset of its classes")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; other files in it are left "
                                                               "alone)")
    p.add_argument("--task", default="auto", choices=TASKS,
                   help="what a CLIP checkpoint does: segment (default: open-vocabulary segmentation from dense "
                        "features), classify (zero-shot, top 5) or embed (image embeddings); fine-tuned checkpoints "
                        "do their own task")
    p.add_argument("--templates", default="openai",
                   help="prompt templates of a CLIP checkpoint's class embeddings (built-in name or file; default "
                        "%(default)s); fine-tuned detectors use their recipe's")
    p.add_argument("--score-threshold", type=float, default=0.0,
                   help="detections kept from this score (default 0: all the model returns, as its evaluation)")
    p.add_argument("--draw", action="store_true", help="also write overlays/<image>.png (predictions drawn on it)")
    p.add_argument("--draw-threshold", type=float, default=0.3, help="detections drawn from this score "
                                                                     "(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="images (F-ViT, CLIP) or windows (segmenters) per "
                                                             "forward (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one) | cpu | cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (default %(default)s, as the evaluations)")
    p.add_argument("--resume", action="store_true",
                   help="continue an earlier run into --out: skip the images already predicted (same checkpoint, "
                        "task and classes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def kind_of(predictor, task: str) -> str:
    """``detection`` | ``segmentation`` | ``classification`` | ``embedding``."""
    from ..predict import ClipPredictor

    if not isinstance(predictor, ClipPredictor):
        if task not in ("auto",):
            raise DataError(f"--task {task}: a {predictor.loaded.method_name} checkpoint does its own task "
                            f"({predictor.kind}); --task is for CLIP checkpoints")
        return predictor.kind
    return {"auto": "segmentation", "segment": "segmentation", "classify": "classification",
            "embed": "embedding"}[task]


def run(args) -> int:
    from tqdm import tqdm

    from ..data.images import ImageError
    from ..predict import ClipPredictor, list_images, load_predictor, outputs
    from ..predict.inputs import load_input
    from ..train.distributed import barrier, cleanup, init_distributed

    out = Path(args.out)
    paths = list_images(args.images)[:args.max_images]
    earlier = outputs.check_output_folder(out, args.resume)  # every process, before anything is loaded or written
    dist, device = init_distributed(args.device)
    try:
        predictor = load_predictor(args.checkpoint, device, args.precision, args.batch_size)
        kind = kind_of(predictor, args.task)
        if args.draw and kind not in ("detection", "segmentation"):
            raise DataError(f"--draw: only detections and label maps are drawn, not a {kind}")
        classes = [] if kind == "embedding" else predictor.classes(args.classes)
        options = {"task": args.task, "score_threshold": args.score_threshold,
                   "templates": args.templates if isinstance(predictor, ClipPredictor) else None}
        manifest = {"format": outputs.FORMAT, "checkpoint": str(args.checkpoint), "kind": kind, "classes": classes,
                    "options": options}
        done = outputs.check_same_run(out, earlier, manifest)
        barrier()
        if dist.is_main:
            outputs.write_atomic(out / outputs.MANIFEST, json.dumps(manifest, indent=2))
        keys = dict(zip(map(str, paths), outputs.image_keys(paths)))
        # F-ViT: the classes it never saw as boxes are drawn dashed and marked *
        trained = set(getattr(predictor.loaded.task, "base", classes))
        novel = {name for name in classes if name not in trained}
        todo = [p for i, p in enumerate(paths) if i % dist.world_size == dist.rank and str(p) not in done]
        palette = None
        if kind == "segmentation" and len(classes) <= 256:
            from ..viz.panels import palette as class_colours

            palette = class_colours(len(classes))
        part = out / "parts" / f"rank{dist.rank}.jsonl"
        part.parent.mkdir(parents=True, exist_ok=True)
        start, predicted = time.perf_counter(), 0
        bar = tqdm(total=len(todo), unit="img", desc="predict", disable=args.no_progress or not dist.is_main)
        with part.open("a") as lines:
            for first in range(0, len(todo), args.batch_size):
                chunk, images, written = todo[first:first + args.batch_size], [], []
                for path in chunk:
                    try:
                        images.append((path, load_input(path)))
                    except ImageError as e:
                        written.append({"image": str(path), "skipped": str(e)})
                results = _predict(predictor, kind, [image for _, image in images], classes, args)
                for (path, image), result in zip(images, results):
                    line = {"image": str(path), "width": image.width, "height": image.height,
                            **_line(kind, result, out, keys[str(path)], palette)}
                    if args.draw:
                        _draw(kind, image, result, out / "overlays" / f"{keys[str(path)]}.png", args, novel)
                    written.append(line)
                lines.write("".join(json.dumps(line) + "\n" for line in written))
                lines.flush()
                predicted += len(images)
                bar.update(len(chunk))
                bar.set_postfix_str(f"{predicted / max(time.perf_counter() - start, 1e-9):.2f} img/s")
        bar.close()
        barrier()
        if dist.is_main:
            seconds = time.perf_counter() - start
            summary = {**outputs.merge(out, paths, kind, classes), "seconds": round(seconds, 2),
                       "images_per_second": round(predicted * dist.world_size / seconds, 3) if seconds else None}
            outputs.write_atomic(out / "summary.json", json.dumps(summary, indent=2))
            skipped = f", {summary['skipped']} skipped (unreadable: {summary['skipped_first'][0]})" \
                if summary["skipped"] else ""
            print(f"predicted {summary['predicted']} of {summary['images']} images{skipped} into {out} "
                  f"({kind}; {len(classes)} classes)")
        barrier()
    finally:
        cleanup()
    return 0


def _predict(predictor, kind: str, images: list, classes: list[str], args) -> list:
    """The results of one batch of RGB images."""
    if not images:
        return []
    if kind == "detection":
        return predictor(images, classes, score_threshold=args.score_threshold)
    if kind == "classification":
        return predictor.classify(images, classes, templates=args.templates)
    if kind == "embedding":
        return list(predictor.embed_images(images))
    if hasattr(predictor, "segment"):
        return predictor.segment(images, classes, templates=args.templates)
    return predictor(images, classes)


def _line(kind: str, result, out: Path, key: str, palette) -> dict:
    """A result as its JSON line's fields (a label map is written to ``labels/``)."""
    from ..predict import outputs

    if kind == "detection":
        return outputs.detection_line(result)
    if kind == "segmentation":
        outputs.write_label_map(out / "labels" / f"{key}.png", result.label_map, palette)
        return outputs.segmentation_line(result, f"labels/{key}.png")
    if kind == "classification":
        return outputs.classification_line(result)
    return {"embedding": result.tolist()}


def _draw(kind: str, image, result, path: Path, args, novel: set[str]) -> None:
    """The overlay picture of one image's detections or label map."""
    from ..viz import plot_segmentation
    from ..viz.detections import Detections, plot_detections
    from ..viz.panels import check_replaceable

    check_replaceable(path)
    if kind == "detection":
        shown = result.above(args.draw_threshold)
        plot_detections(image, Detections(shown.boxes, shown.names, shown.scores.tolist(), shown.masks), None,
                        result.class_names, path, novel=novel, title=path.stem)
    else:
        plot_segmentation(image, result.label_map, None, result.class_names, path, title=path.stem)
