"""``finegrain models``: the model names create_model accepts, with dense support and tags."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list model names create_model accepts, with dense support and tags",
                       description="Every model name (open_clip's and finegrain's), its parameters (counted "
                                   "from the config for open_clip's standard ViT and text towers, '-' for other "
                                   "towers), its input size, whether the dense API (encode_dense, encode_boxes, "
                                   "...) supports it or why not, and its open_clip pretrained tags.")
    p.add_argument("--dense-only", action="store_true", help="only models the dense API supports")


def run(args) -> int:
    import open_clip

    from ..models.factory import dense_support, list_models, model_config, parameter_count
    from ..tables import format_table

    rows = []
    for name in list_models():
        cfg = model_config(name)
        reason = dense_support(cfg)
        if reason is None or not args.dense_only:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "-"
            count = parameter_count(cfg)
            size = cfg.get("vision_cfg", {}).get("image_size", "-")
            rows.append([name, "-" if count is None else f"{count / 1e6:.1f}M",
                         "x".join(map(str, size)) if isinstance(size, (list, tuple)) else str(size),
                         "yes" if reason is None else f"no: {reason}", tags])
    print(format_table(["model", "params", "input", "dense API", "pretrained tags"], rows, right=(1, 2)))
    return 0
