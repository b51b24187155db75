"""Training curves from ``metrics.jsonl`` as a PNG: every ``*_loss`` term and the total, and the
headline evaluation metrics (R@1, top-1) when there are any."""

from __future__ import annotations

from pathlib import Path

from ..train.metrics_log import read_metrics


def plot_curves(metrics_path: str | Path, out_path: str | Path, smooth: int = 10) -> Path:
    """Plot losses (raw, faint, and a running mean over ``smooth`` steps) and eval metrics over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    loss_keys = ["loss"] + sorted({k for r in train for k in r if k.endswith("_loss")})
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/") and k.endswith(("@1", "acc1"))})
    fig, axes = plt.subplots(1, 2 if eval_keys else 1, figsize=(12 if eval_keys else 6.5, 4), squeeze=False)
    ax = axes[0, 0]
    for key in loss_keys:
        steps = [r["step"] for r in train if key in r]
        values = [r[key] for r in train if key in r]
        if not values:
            continue
        line, = ax.plot(steps, values, alpha=0.25)
        window = max(1, min(smooth, len(values)))
        running = [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
                   for i in range(len(values))]
        ax.plot(steps, running, color=line.get_color(), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training losses")
    ax.legend()
    if eval_keys:
        ax = axes[0, 1]
        for key in eval_keys:
            ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], marker="o",
                    label=key.removeprefix("eval/"))
        ax.set_xlabel("step")
        ax.set_title("evaluation (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
