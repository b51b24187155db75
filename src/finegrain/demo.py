"""``finegrain demo``: evaluate a tiny random CLIP on the demo data, train it, evaluate again, print a table.

``finegrain demo --method M`` compares a method with CLIP trained from the same start for the same steps:
FineCLIP and CLIPSelf fine-tune the CLIP demo's model (as the papers fine-tune a pretrained CLIP) next to
plain CLIP fine-tuning; DetailCLIP trains from the same random initialisation as plain CLIP. The composed
``fineclip+detailclip`` fine-tunes the CLIP demo's model next to FineCLIP and DetailCLIP alone, and adds the
demo's open-vocabulary segmentation to the table.

``finegrain demo --finetune`` judges backbones as the papers do, by fine-tuning them: a segmenter and a Mask
R-CNN from the CLIP demo's backbone against a random one, and F-ViT open-vocabulary detection from FineCLIP's
demo backbone against the backbone before FineCLIP (novel shape classes never seen as boxes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .annotate.captioners import TemplateCaptioner
from .annotate.output import AnnotationOutput, own_files, read_output
from .annotate.pipeline import Annotator, run_annotation
from .annotate.proposers import GroundTruthProposer
from .annotate.sources import ImageSource
from .config import ExperimentConfig, load_config
from .data.demo import DEMO_CLASSES
from .data.images import load_image
from .data.loader import resolve_source
from .data.sample import SampleBuilder
from .errors import DataError
from .eval.benchmarks import BENCHMARKS, run_benchmark
from .objectives import complete_method_options
from .sample_spec import AUGMENT_NONE, SampleSpec
from .train.checkpoint import list_checkpoints, run_artefacts
from .train.trainer import Trainer
from .viz.token_removal import plot_token_removal

DEMO_MARKER = ".finegrain-demo"  # marks a run folder the demo wrote (and may replace)

ROWS = [
    ("retrieval/text_retrieval_recall@1", "image->text R@1"),
    ("retrieval/image_retrieval_recall@1", "text->image R@1"),
    ("retrieval/text_retrieval_recall@5", "image->text R@5"),
    ("box_classification/crop_acc1", "box classification top-1 (crops)"),
    ("box_classification/roi_acc1", "box classification top-1 (RoI, dense)"),
    ("segmentation/miou", "segmentation mIoU (dense)"),  # only in demos that run it
]


def chance(metric: str, num_images: int) -> str:
    """The metric's chance level, formatted (none for segmentation: its classes differ in area)."""
    if metric.startswith("retrieval/"):
        k = int(metric.rsplit("@", 1)[1])
        return f"{100.0 * min(1.0, k / num_images):8.1f}"
    if metric.startswith("segmentation/"):
        return f"{'-':>8s}"
    return f"{100.0 / len(DEMO_CLASSES):8.1f}"


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """One row per metric of :data:`ROWS`, one column per ``{header: metrics}``, then chance."""
    num_images = int(list(columns.values())[-1].get("retrieval/num_images", 200))
    width = max(8, *(len(h) for h in columns))
    lines = [f"{'metric (held-out split, %)':42s} " + " ".join(f"{h:>{width}s}" for h in columns) + f" {'chance':>8s}"]
    for key, label in ROWS:
        if not all(key in m for m in columns.values()):
            continue
        lines.append(f"{label:42s} " + " ".join(f"{m[key]:{width}.1f}" for m in columns.values())
                     + f" {chance(key, num_images)}")
    return "\n".join(lines)


def region_gap_note(after: dict[str, float]) -> str:
    """What the trained model's box classification numbers say about RoI (dense) features versus crops."""
    roi, crop = after["box_classification/roi_acc1"], after["box_classification/crop_acc1"]
    if crop - roi >= 1.0:
        return (f"RoI (dense) box classification is {crop - roi:.1f} points below crop classification "
                f"({roi:.1f} vs {crop:.1f}): the gap that region-level methods (FineCLIP, CLIPSelf) target.")
    if roi - crop >= 1.0:
        return f"RoI (dense) box classification is {roi - crop:.1f} points above crop classification here."
    return f"RoI (dense) and crop box classification are within 1 point of each other ({roi:.1f} vs {crop:.1f})."


def claim_folders(runs: list[Path], annotation: Path | None, overwrite: bool) -> None:
    """Check every folder the demo writes before anything is written: a run folder holding a run the demo did
    not write, or an annotation folder inside a run folder the demo did not mark, is refused unless
    ``overwrite`` (and an annotation folder holding files no annotation wrote always is). Then mark each run
    folder as the demo's."""
    taken = [f"{run} ({', '.join(run_artefacts(run))})" for run in runs
             if run_artefacts(run) and not (run / DEMO_MARKER).exists()]
    if (annotation is not None and annotation.is_dir() and any(annotation.iterdir())
            and not (annotation.parent / DEMO_MARKER).exists()):
        taken.append(f"{annotation} (an annotation folder)")
    if taken and not overwrite:
        raise FileExistsError(f"`finegrain demo` did not write {'; '.join(taken)}: pass another --output DIR, or "
                              "--overwrite to replace them")
    if annotation is not None:
        own_files(annotation)  # an error when it holds files that are no annotation's: --overwrite keeps those
    for run in runs:
        run.mkdir(parents=True, exist_ok=True)
        (run / DEMO_MARKER).write_text("written by finegrain demo: a later demo may replace this run\n")


def load_demo_config(name: str, output_dir: Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Config ``name`` training into ``output_dir`` (replacing the run there: :func:`claim_folders` checked it);
    an override that sends the run to another folder is refused."""
    cfg = complete_method_options(load_config(name, [f"train.output_dir={output_dir}", "train.overwrite=true",
                                                     *overrides]))
    if Path(cfg.train.output_dir) != output_dir:
        raise DataError(f"train.output_dir={cfg.train.output_dir}: the demo writes only into the folders of its "
                        f"--output ({output_dir} here); choose the folder with --output instead")
    return cfg


def run_demo(output: str | Path = "runs/demo", steps: int | None = None, overrides: list[str] = (),
             overwrite: bool = False, progress_bar: bool = True) -> dict:
    """Train the demo config into ``output``; return ``{"before": metrics, "after": metrics}``.

    An earlier demo run in ``output`` is replaced; any other run there is kept (an error) unless
    ``overwrite``.
    """
    output = Path(output)
    cfg = load_demo_config("demo", output, [*([f"train.steps={steps}"] if steps else []), *overrides])
    claim_folders([output], output / "annotate", overwrite)
    trainer = Trainer(cfg, progress_bar=progress_bar)
    print(f"demo: {cfg.model.name} on the built-in shapes data, {cfg.train.steps} steps of "
          f"{cfg.data.batch_size} -> {cfg.train.output_dir}")
    before = trainer.evaluate()
    result = trainer.fit()
    print()
    print(format_table({"before": before, "after": result.eval_metrics}))
    print(f"\nrun folder: {result.output_dir} (config.yaml, step_*.pt, best.pt, metrics.jsonl, loss.png)")
    print(region_gap_note(result.eval_metrics))
    print(annotate_demo(trainer, output / "annotate", progress_bar))
    return {"before": before, "after": result.eval_metrics}


def annotate_demo(trainer: Trainer, folder: Path, progress_bar: bool = True) -> str:
    """Annotate the held-out split as ``finegrain annotate --proposer gt --captioner template`` does, with the
    trained model choosing each box's caption among the demo's shape names; a one-line report."""
    captioner = TemplateCaptioner(trainer.model, trainer.tokenizer, DEMO_CLASSES, template="a {}.",
                                  templates="simple", device=trainer.device, concepts_name="demo-shapes",
                                  model_label="demo model")
    annotator = Annotator(GroundTruthProposer(), captioner)
    source = ImageSource("demo:val")
    output = AnnotationOutput(folder, "jsonl", {"source": source.spec, **annotator.settings()}, source.units,
                              overwrite=True)
    _, summary = run_annotation(source, annotator, output, range(source.units), progress=progress_bar)
    regions = [region for record in read_output(folder) for region in record.regions]
    right = 100.0 * sum(region.caption == f"a {region.label}." for region in regions) / len(regions)
    return (f"annotate: {summary['images']} held-out images, {summary['regions']} ground-truth boxes captioned by "
            f"the trained model choosing among the {len(DEMO_CLASSES)} shape names -> {output.training_source()}; "
            f"{right:.1f}% of the captions name the true shape (chance {100 / len(DEMO_CLASSES):.1f}%)")


@dataclass(frozen=True)
class MethodDemo:
    label: str  # the method's column in the table
    config: str  # the method's demo config
    baselines: tuple[tuple[str, str, str], ...]  # (folder, column, config) of each run it is compared with
    fine_tune: bool  # start from the CLIP demo's trained model (else from the same random initialisation)
    segmentation: bool = False  # also run the demo-segmentation benchmark on every column


METHOD_DEMOS = {
    "fineclip": MethodDemo("FineCLIP", "demo-fineclip", (("clip", "CLIP ft", "demo-clip-finetune"),), fine_tune=True),
    "clipself": MethodDemo("CLIPSelf", "demo-clipself", (("clip", "CLIP ft", "demo-clip-finetune"),), fine_tune=True),
    "detailclip": MethodDemo("DetailCLIP", "demo-detailclip", (("clip", "CLIP", "demo"),), fine_tune=False),
    "fineclip+detailclip": MethodDemo(
        "FineCLIP+DetailCLIP", "demo-fineclip-detailclip",
        (("fineclip", "FineCLIP", "demo-fineclip"), ("detailclip", "DetailCLIP", "demo-detailclip")),
        fine_tune=True, segmentation=True),
}


def demo_segmentation(trainer: Trainer) -> dict[str, float]:
    """The demo-segmentation benchmark (open-vocabulary, from dense features) on the method's evaluated model."""
    bench = BENCHMARKS["demo-segmentation"]
    metrics = run_benchmark(trainer.method.eval_model(trainer.model), bench.protocol, bench.data, None, bench.images,
                            trainer.tokenizer, None, bench.options, device=trainer.device, progress=False)
    return {"segmentation/miou": metrics["miou"]}


def run_method_demo(method: str, output: str | Path, steps: int | None = None,
                    overrides: list[str] = (), overwrite: bool = False, progress_bar: bool = True,
                    start: str | None = None) -> dict[str, dict[str, float]]:
    """Train ``method``'s demo config and the runs it is compared with (plain CLIP; for a composed method,
    its parts alone) from the same start for the same steps, into ``output/<method>`` and
    ``output/<baseline>``; print their evaluations side by side and return them.

    Fine-tuning methods start from ``start`` (a checkpoint), or from the CLIP demo trained first into
    ``output/start``; every run then takes the method's model architecture. ``overrides`` apply to the
    method's run only.
    """
    if method not in METHOD_DEMOS:
        raise DataError(f"no demo for method {method!r}; demos: clip, {', '.join(METHOD_DEMOS)}")
    demo = METHOD_DEMOS[method]
    output = Path(output)
    method_cfg = load_demo_config(demo.config, output / method, [*([f"train.steps={steps}"] if steps else []),
                                                                 *overrides])
    folders = [*(output / folder for folder, _, _ in demo.baselines), output / method]
    if demo.fine_tune and start is None:
        folders.insert(0, output / "start")
    elif start is not None and Path(start).resolve().parent in {f.resolve() for f in folders}:
        raise DataError(f"--start {start}: the demo replaces the run in {Path(start).parent}; copy the "
                        "checkpoint elsewhere, or choose another --output")
    claim_folders([output, *folders], None, overwrite)
    steps = method_cfg.train.steps
    common = [f"train.steps={steps}", f"model.name={method_cfg.model.name}"]  # the same architecture
    columns: dict[str, dict[str, float]] = {}
    if demo.fine_tune:
        if start is None:
            print(f"demo: training the start model (the CLIP demo) -> {output / 'start'}")
            Trainer(load_demo_config("demo", output / "start"), progress_bar=progress_bar).fit()
            start = str(output / "start" / "best.pt")
        common.append(f"model.pretrained={start}")
    runs = [*((label, config, output / folder, common) for folder, label, config in demo.baselines),
            (demo.label, demo.config, output / method, [*common, *overrides])]
    for label, config, folder, run_overrides in runs:
        trainer = Trainer(load_demo_config(config, folder, run_overrides), progress_bar=progress_bar)
        if not columns:  # the common start, as loaded
            columns["start"] = {**trainer.evaluate(), **(demo_segmentation(trainer) if demo.segmentation else {})}
        print(f"demo: {label}, {steps} steps of {trainer.cfg.data.batch_size} -> {trainer.cfg.train.output_dir}")
        columns[label] = {**trainer.fit().eval_metrics, **(demo_segmentation(trainer) if demo.segmentation else {})}
    print()
    print(format_table(columns))
    print(f"\nrun folders: {', '.join(map(str, folders))}")
    if hasattr(trainer.method, "removal_maps"):
        print(f"teacher attention and kept blocks of 4 held-out images: {save_removal_picture(trainer, output / method)}")
    print(region_gap_note(columns[demo.label]))
    return columns


def save_removal_picture(trainer: Trainer, folder: Path, count: int = 4) -> Path:
    """A PNG of the trained method's teacher attention and kept/removed blocks on ``count`` held-out images."""
    records, root = resolve_source(trainer.cfg.data.val)
    build = SampleBuilder(SampleSpec(augment=AUGMENT_NONE, caption="none"), trainer.model.image_size, trainer.tokenizer)
    images = torch.stack([build(load_image(Path(root) / records[i].image), records[i], 0)["image"] for i in range(count)])
    attention, removed = trainer.method.removal_maps(trainer.model, trainer.to_device({"image": images})["image"])
    return plot_token_removal(images, attention, removed, folder / "token_removal.png")


@dataclass(frozen=True)
class FinetuneDemo:
    config: str  # the task's demo recipe
    backbones: tuple[str, ...]  # the columns it runs: of BACKBONE_LABELS
    rows: tuple[tuple[str, str], ...]  # (metric key, label)


BACKBONE_LABELS = {"random": "random", "clip": "CLIP demo", "fineclip": "FineCLIP demo"}
FINETUNE_DEMOS = {
    "seg": FinetuneDemo("demo-finetune-seg", ("random", "clip"), (("segmentation/miou", "segmentation mIoU"),)),
    "det": FinetuneDemo("demo-finetune-det", ("random", "clip"), (("detection/bbox_ap", "detection box AP"),
                                                                ("detection/segm_ap", "instance mask AP"))),
    "ovd": FinetuneDemo("demo-finetune-ovd", ("clip", "fineclip"), (("ovd/ap50_novel", "open-vocab. AP50 novel"),
                                                                   ("ovd/ap50_base", "open-vocab. AP50 base"))),
}


def format_finetune_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Rows: the tasks' metrics; columns: the backbones (``-`` where a task does not run one)."""
    width = 14
    lines = [f"{'fine-tuned on the demo (held-out split, %)':44s}"
             + "".join(f"{label:>{width}s}" for label in BACKBONE_LABELS.values())]
    for task, by_backbone in results.items():
        for key, label in FINETUNE_DEMOS[task].rows:
            cells = [f"{by_backbone[b][key]:{width}.1f}" if b in by_backbone else f"{'-':>{width}s}"
                     for b in BACKBONE_LABELS]
            lines.append(f"{label:44s}" + "".join(cells))
    return "\n".join(lines)


def final_weights(run: Path) -> Path:
    """A finished run's weights to start from: its ``best.pt`` when it keeps one (a ``train.best_metric``), else
    its last step checkpoint."""
    best = run / "best.pt"
    if best.exists():
        return best
    saved = list_checkpoints(run)
    if not saved:
        raise FileNotFoundError(f"{run}: the run wrote no checkpoint")
    return saved[-1]


def run_finetune_demo(tasks: list[str], output: str | Path = "runs/demo-finetune", overwrite: bool = False,
                      progress_bar: bool = True, start: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Fine-tune each task of ``tasks`` (of :data:`FINETUNE_DEMOS`) from its backbones into
    ``output/<task>-<backbone>``: random (the tiny CLIP's random initialisation), the CLIP demo's model (trained
    first into ``output/start``, or ``start``), FineCLIP's demo model (trained from it into ``output/fineclip``);
    print the held-out metrics side by side and return ``{task: {backbone: metrics}}``."""
    unknown = [task for task in tasks if task not in FINETUNE_DEMOS]
    if unknown or not tasks:
        raise DataError(f"--finetune takes tasks among {sorted(FINETUNE_DEMOS)}, got {tasks}")
    output = Path(output)
    needed = {backbone for task in tasks for backbone in FINETUNE_DEMOS[task].backbones}
    runs = [output / f"{task}-{backbone}" for task in tasks for backbone in FINETUNE_DEMOS[task].backbones]
    pretraining = ([output / "start"] if start is None and needed - {"random"} else [])
    pretraining += [output / "fineclip"] if "fineclip" in needed else []
    if start is not None and Path(start).resolve().parent in {f.resolve() for f in [output, *pretraining, *runs]}:
        raise DataError(f"--start {start}: the demo replaces the run in {Path(start).parent}; copy the checkpoint "
                        "elsewhere, or choose another --output")
    claim_folders([output, *pretraining, *runs], None, overwrite)
    weights: dict[str, str | None] = {"random": None}
    if needed - {"random"}:
        if start is None:
            print(f"demo: training the CLIP demo (the pretrained backbone) -> {output / 'start'}")
            Trainer(load_demo_config("demo", output / "start"), progress_bar=progress_bar).fit()
            start = str(output / "start" / "best.pt")
        weights["clip"] = start
    if "fineclip" in needed:
        print(f"demo: FineCLIP from the CLIP demo -> {output / 'fineclip'}")
        Trainer(load_demo_config("demo-fineclip", output / "fineclip", [f"model.pretrained={start}"]),
                progress_bar=progress_bar).fit()
        weights["fineclip"] = str(final_weights(output / "fineclip"))
    results: dict[str, dict[str, dict[str, float]]] = {}
    for task in tasks:
        demo = FINETUNE_DEMOS[task]
        for backbone in demo.backbones:
            folder = output / f"{task}-{backbone}"
            cfg = load_demo_config(demo.config, folder, [f"model.pretrained={weights[backbone] or 'null'}"])
            print(f"demo: {task} from the {BACKBONE_LABELS[backbone]} backbone, {cfg.train.steps} steps -> {folder}")
            results.setdefault(task, {})[backbone] = Trainer(cfg, progress_bar=progress_bar).fit().eval_metrics
    print()
    print(format_finetune_table(results))
    print(f"\nrun folders: {', '.join(map(str, runs))} (each with eval/results.jsonl: `finegrain eval --table`)")
    return results
