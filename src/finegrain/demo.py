"""``finegrain demo``: evaluate a tiny random CLIP on the demo data, train it, evaluate again, print a table."""

from __future__ import annotations

from pathlib import Path

from .config import load_config
from .data.demo import DEMO_CLASSES
from .train.trainer import Trainer

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


def run_demo(output: str | Path = "runs/demo", steps: int | None = None, overrides: list[str] = ()) -> dict:
    """Train the demo config into ``output``; return ``{"before": metrics, "after": metrics}``."""
    overrides = [f"train.output_dir={output}", "train.overwrite=true", *([f"train.steps={steps}"] if steps else []), *overrides]
    cfg = load_config("demo", overrides)
    trainer = Trainer(cfg)
    print(f"demo: {cfg.model.name} on the built-in shapes data, {cfg.train.steps} steps of "
          f"{cfg.data.batch_size} -> {cfg.train.output_dir}")
    before = trainer.evaluate()
    result = trainer.fit()
    print()
    print(format_table(before, result.eval_metrics))
    print(f"\nrun folder: {result.output_dir} (config.yaml, step_*.pt, best.pt, metrics.jsonl, loss.png)")
    print("RoI (dense) box classification of plain CLIP may stay near chance: that is the gap the region "
          "methods close.")
    return {"before": before, "after": result.eval_metrics}
