"""``finegrain export``: a checkpoint as an open_clip local-dir model."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint as an open_clip local-dir model",
                       description="Write open_clip_config.json + open_clip_model.safetensors, loadable with "
                                   "open_clip.create_model('local-dir:DIR') and clip_benchmark --model local-dir:DIR.")
    p.add_argument("--checkpoint", required=True, help="a finegrain training checkpoint")
    p.add_argument("--output", required=True, help="output folder")


def run(args) -> int:
    from ..models import export_local_dir, model_from_checkpoint

    out = export_local_dir(model_from_checkpoint(args.checkpoint), args.output)
    print(f"exported to {out}; load with open_clip.create_model('local-dir:{out}')")
    return 0
