"""``finegrain embed-text``: the text tower's embeddings of every caption of a config, as a text cache."""

from __future__ import annotations

from .common import add_config_args


def add_parser(sub) -> None:
    p = sub.add_parser("embed-text", help="precompute the text tower's embeddings of every caption of a config",
                       description="Run the config's model's text tower (eval, no grad) once over every distinct "
                                   "caption and region caption of data.train and data.val (region labels too "
                                   "when the method uses them as region text), and write a text cache: "
                                   "embeddings.npy (N, D) float16 L2-normalised, hashes.npy (N,) uint64 sorted "
                                   "(blake2b-64 of each text), meta.json (model, pretrained, embed dim, context "
                                   "length, count, a probe embedding). A method whose sample spec names the "
                                   "folder (text_cache) then trains without the text tower; the trainer checks "
                                   "that the cache was made by the model being trained. A model without "
                                   "pretrained weights is initialised as `finegrain train` does (train.seed).")
    add_config_args(p)
    p.add_argument("--output", required=True, help="cache folder (its files are replaced)")
    p.add_argument("--batch-size", type=int, default=256, help="texts per forward (default: 256)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import itertools

    from ..config import load_config
    from ..data.text_cache import source_texts, write_text_cache
    from ..models import create_model, get_tokenizer
    from ..objectives import create_method
    from ..train.preflight import check_data_paths
    from ..train.trainer import seed_everything

    cfg = load_config(args.config, args.overrides, args.data)
    check_data_paths(cfg)
    from ..devices import pick_device

    device = pick_device(args.device)
    seed_everything(cfg.train.seed)  # a randomly initialised model starts as `finegrain train`'s (rank 0)
    model = create_model(cfg.model.name, cfg.model.pretrained, image_size=cfg.model.image_size)
    labels = create_method(cfg.method.name, cfg.method.options, model).sample_spec().label_as_region_text
    model = model.to(device).eval()
    texts = itertools.chain.from_iterable(source_texts(src, labels) for src in (cfg.data.train, cfg.data.val) if src)
    meta = write_text_cache(args.output, texts, lambda tokens: model.encode_text(tokens.to(device)),
                            get_tokenizer(cfg.model.name), {"model": cfg.model.name, "pretrained": cfg.model.pretrained,
                                                            "context_length": model.context_length},
                            batch_size=args.batch_size, progress=not args.no_progress)
    print(f"wrote {meta['count']} distinct text embeddings ({meta['embed_dim']}-d) to {args.output}")
    return 0
