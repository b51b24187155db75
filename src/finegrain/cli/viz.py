"""``finegrain viz``: pictures of what a model sees, from checkpoints and images (the CLI side of
:mod:`finegrain.viz`). torch loads when a picture is drawn, not when the parser is built."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError
from .common import add_image_args, add_model_args

if TYPE_CHECKING:
    import torch

DESCRIPTION = """\
Pictures of what a model sees, from checkpoints and images:

  attention     CLS attention over images and, with --keep-ratio, the tokens DetailCLIP would remove
                (--teacher: a DetailCLIP checkpoint's EMA teacher and its own keep ratio)
  clusters      k-means of the dense features of one or more models, side by side
  boxes         box classification results drawn on images (green right, red wrong)
  segmentation  open-vocabulary segmentation next to the ground truth, or a fine-tuned segmenter's
                (a finetune-seg checkpoint) on its held-out records
  detections    a detection fine-tuning checkpoint's boxes and masks next to the ground truth (--novel:
                a class list drawn dashed and marked *)

Pictures go to runs/viz/ unless --out / --out-dir says otherwise; each path written is printed. A file
there that finegrain viz did not write is never replaced."""
OUT_DIR = Path("runs") / "viz"


def add_parser(sub) -> None:
    """The ``viz`` command and its five sub-commands."""
    viz = sub.add_parser("viz", help="pictures: attention, dense-feature clusters, box, segmentation and detection "
                                     "results",
                         description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = viz.add_subparsers(dest="picture", required=True, metavar="PICTURE")

    p = kinds.add_parser("attention", help="CLS attention maps (and DetailCLIP token removal) over images")
    add_model_args(p)
    add_image_args(p)
    p.add_argument("--teacher", action="store_true",
                   help="a DetailCLIP checkpoint's EMA teacher, with the removal its training applied")
    p.add_argument("--layer", default="last", help="last | mean (over all blocks: what token removal ranks) | N")
    p.add_argument("--per-head", action="store_true", help="one map per head besides their mean")
    p.add_argument("--keep-ratio", type=float, default=None,
                   help="also draw the patches DetailCLIP would keep/remove at this keep ratio")
    p.add_argument("--out", default=str(OUT_DIR / "attention.png"), help="output PNG (default: %(default)s)")

    p = kinds.add_parser("clusters", help="k-means of dense features, one column per model")
    p.add_argument("--models", nargs="+", required=True, metavar="LABEL=MODEL",
                   help="columns: LABEL=CHECKPOINT.pt, LABEL=NAME:PRETRAINED (open_clip tag or file) or LABEL=NAME")
    add_image_args(p)
    p.add_argument("--k", type=int, default=6, help="clusters per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-mode", default="v_only", choices=["v_only", "plain"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=str(OUT_DIR / "clusters.png"), help="output PNG (default: %(default)s)")

    p = kinds.add_parser("boxes", help="box classification results drawn on images")
    add_model_args(p)
    p.add_argument("--data", required=True,
                   help="records with labelled regions (JSONL, COCO instances json, demo:val) or a COCO panoptic "
                        "json (with --images: its image folder)")
    p.add_argument("--images", default=None, help="image folder (default: the data file's folder)")
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--way", default="roi", choices=["roi", "crop", "mask"], help="mask: panoptic data only")
    p.add_argument("--templates", default=None, help="prompt templates (default: vild for panoptic, else simple)")
    p.add_argument("--out-dir", default=str(OUT_DIR / "boxes"), help="one PNG per image (default: %(default)s)")

    p = kinds.add_parser("segmentation", help="open-vocabulary or fine-tuned (finetune-seg) segmentation, next to "
                                              "the ground truth or on new images")
    add_model_args(p)
    p.add_argument("--images", nargs="+", default=None, metavar="IMAGES",
                   help="new images (files, folders, glob patterns): the prediction alone, without ground truth")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="class names with --images ('a,b,c', a file or a built-in list); default a finetune-seg "
                        "checkpoint's classes (a CLIP needs them)")
    p.add_argument("--benchmark", default="demo-segmentation",
                   help="a segmentation benchmark of `finegrain eval --list` (default demo-segmentation)")
    p.add_argument("--data", default=None,
                   help="a finetune-seg checkpoint: records with label maps (default: the run's data.val)")
    p.add_argument("--data-root", default=None, help="its dataset root")
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--out-dir", default=str(OUT_DIR / "segmentation"),
                   help="one PNG per image (default: %(default)s)")

    p = kinds.add_parser("detections", help="a detector's boxes and masks next to the ground truth, or on new images")
    p.add_argument("--checkpoint", required=True, help="a finegrain fine-tuning checkpoint (finetune-det or "
                                                       "finetune-ovd)")
    p.add_argument("--data", default=None, help="records with labelled regions (default: the run's data.val)")
    p.add_argument("--images", nargs="+", default=None, metavar="IMAGES",
                   help="without --data: new images (files, folders, glob patterns), drawn without ground truth; "
                        "with --data: the image folder of --data (default: the data file's folder)")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="class names ('a,b,c', a file or a built-in list); default the checkpoint's (F-ViT: its base "
                        "and novel classes); F-ViT takes any names")
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--score-threshold", type=float, default=0.3, help="predictions drawn from this score")
    p.add_argument("--novel", default=None, metavar="NAMES",
                   help="classes drawn dashed and marked * (a built-in list such as ov-coco-novel, or a file); "
                        "default an F-ViT checkpoint's classes never seen as boxes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out-dir", default=str(OUT_DIR / "detections"), help="one PNG per image (default: %(default)s)")


def image_paths(images: Sequence[str] | None, data: str | None, max_images: int) -> list[Path]:
    """The files of ``--images`` (files, folders, patterns), or the first ``max_images`` images of ``--data``."""
    from ..config import DataSourceConfig
    from ..data.loader import resolve_source
    from ..predict import list_images

    if images:
        return list_images(images)
    if not data:
        raise DataError("give --images FILE... or --data DATASET")
    records, root = resolve_source(DataSourceConfig(path=data))
    return [Path(root) / records[i].image for i in range(min(max_images, len(records)))]


def _teacher_removal(checkpoint: str, model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A DetailCLIP checkpoint's teacher attention and removal mask (``removal_maps``) on ``images``."""
    from ..config import build_config, yaml_layout
    from ..models.factory import read_checkpoint
    from ..objectives import create_method

    state = read_checkpoint(checkpoint)
    cfg = build_config(yaml_layout(state["config"]))
    method = create_method(cfg.method.name, cfg.method.options, model)
    if not hasattr(method, "removal_maps"):
        raise DataError(f"{checkpoint}: --teacher needs a DetailCLIP checkpoint (method {cfg.method.name!r} has "
                        "no EMA teacher with token removal)")
    method.load_state_dict(state["method"])
    method.to(images.device)
    return method.removal_maps(model, images)


def cmd_attention(args) -> Path:
    from ..data.images import load_image
    from ..devices import pick_device
    from ..objectives.token_removal import removal_mask
    from ..predict import load_model
    from ..predict.inputs import model_pixels
    from ..viz import cls_attention_maps, plot_attention
    from ..viz.panels import check_replaceable

    check_replaceable(args.out)
    device = pick_device(args.device)
    model = load_model(args.checkpoint, args.model, args.pretrained, device)
    paths = image_paths(args.images, args.data, args.max_images)
    pixels, images = model_pixels(model, [load_image(p) for p in paths])
    images = images.to(device)
    if args.teacher:
        if not args.checkpoint:
            raise DataError("--teacher needs --checkpoint (a DetailCLIP training checkpoint)")
        attention, removed = _teacher_removal(args.checkpoint, model, images)
        label = "teacher CLS attention (mean of blocks)"
    else:
        if args.layer not in ("last", "mean") and not args.layer.lstrip("-").isdigit():
            raise DataError(f"--layer {args.layer!r}: expected last, mean or a block index")
        layer = {"last": -1, "mean": None}.get(args.layer, None) if args.layer in ("last", "mean") else int(args.layer)
        attention = cls_attention_maps(model, images, layer=layer, per_head=args.per_head)
        removed = None
        if args.keep_ratio is not None:
            mean_map = attention.mean(dim=1) if args.per_head else attention
            removed = removal_mask(mean_map, args.keep_ratio).view_as(mean_map)
        label = f"CLS attention ({args.layer})"
    return plot_attention(pixels, attention.cpu(), None if removed is None else removed.cpu(), args.out,
                          titles=[p.name for p in paths], attention_label=label)


def cmd_clusters(args) -> Path:
    import torch

    from ..data.images import load_image
    from ..devices import pick_device
    from ..predict import parse_model_spec
    from ..predict.inputs import model_pixels
    from ..viz import dense_clusters, plot_dense_clusters
    from ..viz.panels import check_replaceable

    check_replaceable(args.out)
    device = pick_device(args.device)
    paths = image_paths(args.images, args.data, args.max_images)
    columns, pixels = {}, None
    for spec in args.models:
        label, eq, model_spec = spec.partition("=")
        if not eq:
            raise DataError(f"--models {spec!r}: expected LABEL=MODEL")
        model = parse_model_spec(model_spec, device).eval()
        shown, images = model_pixels(model, [load_image(p) for p in paths])
        pixels = shown if pixels is None else pixels
        with torch.no_grad():
            features = model.encode_dense(images.to(device), mode=args.dense_mode)
        columns[label] = dense_clusters(features.float().cpu(), args.k, args.seed)
    return plot_dense_clusters(pixels, columns, args.out, titles=[p.name for p in paths])


def cmd_boxes(args) -> list[Path]:
    import torch

    from ..config import DataSourceConfig
    from ..data.coco_panoptic import read_panoptic
    from ..data.images import load_image
    from ..data.loader import resolve_source
    from ..devices import pick_device
    from ..eval.box_classification import predict_boxes
    from ..eval.classification import class_text_embeddings
    from ..models import get_tokenizer
    from ..predict import load_model
    from ..viz import plot_box_predictions
    from ..viz.panels import check_replaceable

    device = pick_device(args.device)
    model = load_model(args.checkpoint, args.model, args.pretrained, device)
    panoptic = args.data.endswith(".json") and "panoptic" in Path(args.data).name
    if panoptic:
        data = read_panoptic(args.data)
        root = Path(args.images or Path(args.data).parent)
        names, skipped = data.class_names, []
        items = []
        for sample in data.samples(skipped):
            masks = sample.masks() if args.way == "mask" else None
            items.append((sample.image, [s.box for s in sample.segments], [s.category for s in sample.segments],
                          masks))
            if len(items) == args.max_images:
                break
    else:
        if args.way == "mask":
            raise DataError("--way mask needs COCO panoptic data (segment masks)")
        records, root = resolve_source(DataSourceConfig(path=args.data, root=args.images))
        labelled = [records[i] for i in range(len(records)) if any(r.label for r in records[i].regions)]
        names = sorted({r.label for record in labelled for r in record.regions if r.label})
        items = [(record.image, [r.box for r in record.regions if r.label], [r.label for r in record.regions
                                                                             if r.label], None)
                 for record in labelled[:args.max_images]]
    if not items:
        raise DataError(f"{args.data}: no image with labelled boxes")
    templates = args.templates or ("vild" if panoptic else "simple")
    classifier = class_text_embeddings(model.eval(), get_tokenizer(model.name), names, templates, device=device,
                                       progress=False)
    out_dir, written = Path(args.out_dir), []
    for image_name, boxes, labels, masks in items:
        out = check_replaceable(out_dir / f"{Path(image_name).stem}.png")
        image = load_image(Path(root) / image_name)
        pred, score = predict_boxes(model, image, boxes, classifier, way=args.way, masks=masks, device=device)
        written.append(plot_box_predictions(image, torch.tensor(boxes), labels, [names[i] for i in pred.tolist()],
                                            score, out, title=f"{Path(image_name).name} ({args.way})"))
    return written


def cmd_segmentation(args) -> list[Path]:
    """New images (``--images``), a finetune-seg run's held-out records, or a segmentation benchmark."""
    from ..predict import Segmenter, load_predictor

    spec = args.checkpoint or (f"{args.model}:{args.pretrained}" if args.pretrained else args.model)
    predictor = load_predictor(spec, args.device)
    if args.images:
        return _segment_new_images(args, predictor)
    if isinstance(predictor, Segmenter):
        return _segment_records(args, predictor)
    return _segment_benchmark(args, predictor)


def _segment_new_images(args, predictor) -> list[Path]:
    from ..data.images import load_image
    from ..predict import ClipPredictor, list_images
    from ..viz import plot_segmentation
    from ..viz.panels import check_replaceable

    if isinstance(predictor, ClipPredictor) and not args.classes:
        raise DataError("--images with a CLIP model: give the class names (--classes 'a,b,c', a file or a list)")
    out_dir, written = Path(args.out_dir), []
    for path in list_images(args.images)[:args.max_images]:
        out = check_replaceable(out_dir / f"{path.stem}.png")
        result = (predictor.segment(path, args.classes) if isinstance(predictor, ClipPredictor)
                  else predictor(path, args.classes))[0]
        written.append(plot_segmentation(load_image(path), result.label_map, None, result.class_names, out,
                                         title=path.name))
    return written


def _segment_records(args, predictor) -> list[Path]:
    """A finetune-seg checkpoint's predictions on the first ``--max-images`` records of ``--data`` (default the
    run's ``data.val``), next to their label maps."""
    from ..config import DataSourceConfig
    from ..data.loader import resolve_source
    from ..finetune.segmentation import LabelledRecords
    from ..viz import plot_segmentation
    from ..viz.panels import check_replaceable

    task, cfg = predictor.loaded.task, predictor.loaded.config
    source = args.data or (cfg.data.val.path if cfg.data.val is not None else None)
    if source is None:
        raise DataError(f"{args.checkpoint}: the run had no data.val: give --data (records with label maps) or "
                        "--images (new images)")
    records, root = resolve_source(DataSourceConfig(path=source))
    pairs = LabelledRecords(records, root, task.dense_targets())
    out_dir, written = Path(args.out_dir), []
    for i in range(min(args.max_images, len(pairs))):
        sample = pairs[i]
        out = check_replaceable(out_dir / f"{Path(records[i].image).stem}.png")  # keys need not be file names
        (result,) = predictor(sample.image, args.classes)
        written.append(plot_segmentation(sample.image, result.label_map.numpy(), sample.label.numpy(),
                                         result.class_names, out, ignore_index=task.options.ignore_index,
                                         title=f"{sample.stem} ({cfg.method.name})"))
    return written


def _segment_benchmark(args, predictor) -> list[Path]:
    """A CLIP's open-vocabulary segmentation of a benchmark's first images, by its protocol's options."""
    from ..data.demo import ensure_demo_dataset
    from ..eval.benchmarks import BENCHMARKS
    from ..eval.prompts import load_class_names
    from ..eval.protocols import PROTOCOLS
    from ..viz import plot_segmentation
    from ..viz.panels import check_replaceable

    bench = BENCHMARKS.get(args.benchmark)
    if bench is None or bench.protocol != "segmentation":
        raise DataError(f"--benchmark {args.benchmark!r}: expected one of "
                        f"{[n for n, b in BENCHMARKS.items() if b.protocol == 'segmentation']}")
    root = ensure_demo_dataset() if bench.data == "demo" else Path(args.data_root or ".")
    options = dict(bench.options)
    (dataset,) = PROTOCOLS["segmentation"].inputs(root, bench.data, bench.images, options)
    names = load_class_names(dataset.class_names)
    predict = {key: options[key] for key in ("templates", "inference", "short_side") if key in options}
    out_dir, written = Path(args.out_dir), []
    for i in range(min(args.max_images, len(dataset))):
        sample = dataset[i]
        out = check_replaceable(out_dir / f"{sample.stem}.png")
        (result,) = predictor.segment(sample.image, names, **predict)
        written.append(plot_segmentation(sample.image, result.label_map.numpy(), sample.label.numpy(), names,
                                         out, ignore_index=dataset.ignore_index,
                                         title=f"{sample.stem} ({args.benchmark})"))
    return written


def cmd_detections(args) -> list[Path]:
    """A detector's detections on the held-out records (next to their boxes) or on new images (``--images``)."""
    import torch

    from ..config import DataSourceConfig
    from ..data.dense import decode_mask
    from ..data.images import load_image
    from ..data.loader import resolve_source
    from ..data.records import RecordError
    from ..eval.prompts import load_class_names
    from ..predict import OpenVocabularyDetector, list_images, load_predictor
    from ..viz.detections import Detections, plot_detections
    from ..viz.panels import check_replaceable

    predictor = load_predictor(args.checkpoint, args.device)
    if predictor.kind != "detection":
        raise DataError(f"{args.checkpoint}: method {predictor.loaded.method_name!r} is not a detection task "
                        "(finetune-det, finetune-ovd)")
    task, cfg = predictor.loaded.task, predictor.loaded.config
    fvit = isinstance(predictor, OpenVocabularyDetector)
    classes = predictor.classes(args.classes if args.classes or not fvit else [*task.base, *task.novel])
    novel = set(load_class_names(args.novel)) if args.novel else set(classes) - set(task.base) if fvit else set()
    if args.images and not args.data:  # new images: the prediction alone
        items = [(path, None) for path in list_images(args.images)[:args.max_images]]
    else:
        source = DataSourceConfig(path=args.data, root=args.images[0] if args.images else None) if args.data \
            else cfg.data.val
        if source is None:
            raise DataError(f"{args.checkpoint}: the run has no data.val; give --data, or --images (new images)")
        records, root = resolve_source(source)
        items = [(Path(root) / records[i].image, records[i]) for i in range(min(args.max_images, len(records)))]
    out_dir, written = Path(args.out_dir), []
    for path, record in items:
        out = check_replaceable(out_dir / f"{path.stem}.png")
        image = load_image(path)
        (found,) = predictor(image, classes)
        shown = found.above(args.score_threshold)
        predicted = Detections(shown.boxes, shown.names, shown.scores.tolist(), shown.masks)
        truth = None
        if record is not None:
            listed = [r for r in record.regions if r.label in classes]
            try:  # the true masks when every region has one that decodes
                masks = (torch.stack([torch.from_numpy(decode_mask(r.mask, image.width, image.height, record.image))
                                      for r in listed])
                         if shown.masks is not None and listed and all(r.mask for r in listed) else None)
            except RecordError:
                masks = None
            truth = Detections(torch.tensor([r.box for r in listed]), [r.label for r in listed], masks=masks)
        written.append(plot_detections(image, predicted, truth, classes, out, novel=novel, title=path.name))
    return written


PICTURES = {"attention": cmd_attention, "clusters": cmd_clusters, "boxes": cmd_boxes,
            "segmentation": cmd_segmentation, "detections": cmd_detections}


def run(args) -> int:
    written = PICTURES[args.picture](args)
    for path in written if isinstance(written, list) else [written]:
        print(f"wrote {path}")
    return 0
