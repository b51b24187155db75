"""``finegrain demo``: evaluate a tiny random CLIP on the demo data, train it, evaluate again, print a table."""

from __future__ import annotations

from pathlib import Path

from .config import load_config
from .data.demo import DEMO_CLASSES
from .train.checkpoint import run_artefacts
from .train.trainer import Trainer

DEMO_MARKER = ".finegrain-demo"  # marks a run folder the demo wrote (and may replace)

ROWS = [
    ("retrieval/i2t_r1", "image->text R@1"),
    ("retrieval/t2i_r1", "text->image R@1"),
    ("retrieval/i2t_r5", "image->text R@5"),
    ("box_classification/crop_top1", "box classification top-1 (crops)"),
    ("box_classification/roi_top1", "box classification top-1 (RoI, dense)"),
]


def chance(metric: str, num_images: int) -> float:
    if metric.startswith("retrieval/"):
        k = int(metric.rsplit("_r", 1)[1])
        return 100.0 * min(1.0, k / num_images)
    return 100.0 / len(DEMO_CLASSES)


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    num_images = int(after.get("retrieval/num_images", 200))
    lines = [f"{'metric (held-out split, %)':42s} {'before':>8s} {'after':>8s} {'chance':>8s}"]
    for key, label in ROWS:
        lines.append(f"{label:42s} {before[key]:8.1f} {after[key]:8.1f} {chance(key, num_images):8.1f}")
    return "\n".join(lines)


def region_gap_note(after: dict[str, float]) -> str:
    """What the trained model's box classification numbers say about RoI (dense) features versus crops."""
    roi, crop = after["box_classification/roi_top1"], after["box_classification/crop_top1"]
    if crop - roi >= 1.0:
        return (f"RoI (dense) box classification is {crop - roi:.1f} points below crop classification "
                f"({roi:.1f} vs {crop:.1f}): the gap that region-level methods (FineCLIP, CLIPSelf) target.")
    if roi - crop >= 1.0:
        return f"RoI (dense) box classification is {roi - crop:.1f} points above crop classification here."
    return f"RoI (dense) and crop box classification are within 1 point of each other ({roi:.1f} vs {crop:.1f})."


def run_demo(output: str | Path = "runs/demo", steps: int | None = None, overrides: list[str] = (),
             overwrite: bool = False, progress_bar: bool = True) -> dict:
    """Train the demo config into ``output``; return ``{"before": metrics, "after": metrics}``.

    An earlier demo run in ``output`` is replaced; any other run there is kept (an error) unless
    ``overwrite``.
    """
    output = Path(output)
    if run_artefacts(output) and not (overwrite or (output / DEMO_MARKER).exists()):
        raise FileExistsError(f"{output} holds a run that `finegrain demo` did not write "
                              f"({', '.join(run_artefacts(output))}): pass --output DIR, or --overwrite to replace it")
    overrides = [f"train.output_dir={output}", "train.overwrite=true", *([f"train.steps={steps}"] if steps else []),
                 *overrides]
    cfg = load_config("demo", overrides)
    trainer = Trainer(cfg, progress_bar=progress_bar)
    (output / DEMO_MARKER).write_text("written by finegrain demo: a later demo may replace this run\n")
    print(f"demo: {cfg.model.name} on the built-in shapes data, {cfg.train.steps} steps of "
          f"{cfg.data.batch_size} -> {cfg.train.output_dir}")
    before = trainer.evaluate()
    result = trainer.fit()
    print()
    print(format_table(before, result.eval_metrics))
    print(f"\nrun folder: {result.output_dir} (config.yaml, step_*.pt, best.pt, metrics.jsonl, loss.png)")
    print(region_gap_note(result.eval_metrics))
    return {"before": before, "after": result.eval_metrics}
