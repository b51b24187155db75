#!/usr/bin/env python
"""Prediction on new images (``finegrain.load_predictor``) against the held-out evaluation path: images/s.

For each task, on the same image files and the same model (a shipped demo recipe's task on its tiny tower, random
weights; the cost is the same as trained ones):

  eval      what the task's evaluation runs per image: Mask R-CNN ``predict_records`` (one image per forward),
            F-ViT ``FViTTask.detect`` on ``--batch-size`` files, the segmenter's ``segment_dataset`` slide
            inference, CLIP's ``evaluate_segmentation``; metric bookkeeping excluded where it is separate.
  predict   the predictor's call on the same files (``predictor(files, classes)``), results typed and moved to
            the CPU: what ``finegrain predict`` runs for each batch before writing files.

Method: ``--warmup`` calls of each, then ``--repeats`` interleaved rounds (eval, predict, eval, ...); medians;
images/s = images / median. PASS when predict / eval time <= ``--threshold`` (prediction must not be slower).

Examples:
  python benchmarks/predict_throughput.py
  python benchmarks/predict_throughput.py --device cuda --precision bf16 --images 32 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from step_time import print_rows, relative_iqr, run_benchmark

from finegrain.config import load_config
from finegrain.data.records import Record
from finegrain.devices import autocast
from finegrain.eval.segmentation import evaluate_segmentation, segment_dataset
from finegrain.finetune.detection import predict_records
from finegrain.finetune.segmentation import LabelledRecords
from finegrain.models import create_model, get_tokenizer
from finegrain.objectives import EvalContext, create_method
from finegrain.predict import ClipPredictor, InstanceDetector, OpenVocabularyDetector, Segmenter
from finegrain.predict.loading import LoadedCheckpoint

TASKS = {"det": ("demo-finetune-det", InstanceDetector), "ovd": ("demo-finetune-ovd", OpenVocabularyDetector),
         "seg": ("demo-finetune-seg", Segmenter), "clip-seg": ("demo", ClipPredictor)}


def demo_images(count: int, size: tuple[int, int], folder: Path, generator: torch.Generator) -> list[Path]:
    """Random-pixel PNGs with a label map beside each (the segmentation evaluation reads one)."""
    files = []
    for i in range(count):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
        files.append(folder / f"{i}.png")
        Image.fromarray(pixels.numpy()).save(files[-1])
        Image.new("L", size, 1).save(folder / f"{i}_label.png")
    return files


def setups(task_name: str, files: list[Path], device: torch.device, args):
    """``(eval(), predict())`` closures of one task on ``files``."""
    recipe, predictor_class = TASKS[task_name]
    cfg = load_config(recipe, ["model.pretrained=null"])
    torch.manual_seed(args.seed)
    model = create_model(cfg.model.name, device=device).eval()
    folder = files[0].parent
    records = [Record(p.name, width=args.size[0], height=args.size[1], label_map=f"{p.stem}_label.png")
               for p in files]
    if task_name == "clip-seg":
        predictor = ClipPredictor(LoadedCheckpoint(model), device, args.precision, args.batch_size)
        names = ["red circle", "blue square", "green star", "sky"]

        class Pairs(LabelledRecords):
            class_names = names

        from finegrain.sample_spec import DenseTargets

        pairs = Pairs(records, folder, DenseTargets("segmentation", len(names), crop=(64, 64)))
        short_side = min(args.size)  # the protocol's 448 would upsample these small images
        return (lambda: evaluate_segmentation(model, pairs, get_tokenizer(model.name), names, progress=False,
                                              short_side=short_side, batch_size=args.batch_size, device=device),
                lambda: predictor.segment(files, names, short_side=short_side))
    task = create_method(cfg.method.name, cfg.method.options, model).to(device).eval()
    predictor = predictor_class(LoadedCheckpoint(model, task, cfg), device, args.precision, args.batch_size)
    context = EvalContext(records, folder, "bench", device, args.batch_size)
    if task_name == "det":
        import open_clip

        pp = open_clip.get_model_preprocess_cfg(model.clip)
        return lambda: predict_records(task, context, pp["mean"], pp["std"]), lambda: predictor(files)
    if task_name == "ovd":
        classes = [*task.base, *task.novel]

        def evaluate():
            return [task.detect(model, files[i:i + args.batch_size]) for i in range(0, len(files), args.batch_size)]

        return evaluate, lambda: predictor(files, classes)
    pairs = LabelledRecords(records, folder, task.dense_targets())
    return (lambda: segment_dataset(task.window_logits, pairs, task.class_names, task.slide_inference(args.batch_size),
                                    device, progress=False),
            lambda: predictor(files))


def run_task(task_name: str, args, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    files = demo_images(args.images, args.size, Path(tempfile.mkdtemp(prefix="finegrain-bench-")), generator)
    evaluate, predict = setups(task_name, files, device, args)
    times = {"eval": [], "predict": []}
    with autocast(device, args.precision):
        for round_ in range(args.warmup + args.repeats):
            for label, call in (("eval", evaluate), ("predict", predict)):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.no_grad():
                    call()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if round_ >= args.warmup:
                    times[label].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["predict"] / med["eval"]
    print(f"{task_name}: eval {args.images / med['eval']:.2f} img/s, predict {args.images / med['predict']:.2f} img/s, "
          f"ratio {ratio:.3f}", flush=True)
    return {"task": task_name, "recipe": TASKS[task_name][0], "images": args.images, "image_size": list(args.size),
            "batch_size": args.batch_size, "device": device.type, "precision": args.precision, "median_s": med,
            "images_per_s": {k: args.images / v for k, v in med.items()},
            "relative_iqr": {k: relative_iqr(v) for k, v in times.items()}, "predict_vs_eval": ratio,
            "pass": ratio <= args.threshold}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated (default: %(default)s)")
    p.add_argument("--images", type=int, default=8, help="images per call (default %(default)s)")
    p.add_argument("--size", type=int, nargs=2, default=(96, 64), metavar=("W", "H"), help="image size (default 96 64)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threshold", type=float, default=1.05, help="PASS when predict / eval time <= this")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"--tasks {unknown}: expected some of {list(TASKS)}")
    args.size = tuple(args.size)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def run(device: torch.device) -> list[dict]:
        results = [run_task(t, args, device) for t in args.tasks]
        rows = [[r["task"], r["recipe"], f"{r['images_per_s']['eval']:.2f}", f"{r['images_per_s']['predict']:.2f}",
                 f"{r['predict_vs_eval']:.3f}", f"{max(r['relative_iqr'].values()):.2f}",
                 "PASS" if r["pass"] else "FAIL"] for r in results]
        print_rows(["task", "recipe", "eval img/s", "predict img/s", "ratio", "rel. IQR", ""], rows,
                   "ratio = predict / eval time on the same files and model (<= 1: prediction is not slower)")
        return results

    return run_benchmark(args, run)


if __name__ == "__main__":
    sys.exit(main())
