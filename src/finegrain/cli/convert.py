"""``finegrain convert``: FineCLIP's COCO layout to region-text JSONL, or a released checkpoint to a finegrain one."""

from __future__ import annotations

from ..errors import DataError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert FineCLIP's COCO layout (3 json files) to region-text JSONL, or "
                                       "a released FineCLIP / CLIPSelf / DetailCLIP checkpoint to a finegrain one",
                       description="Two modes. Checkpoint: --checkpoint RELEASED.pt --model NAME --output OUT.pt "
                                   "converts a released FineCLIP / CLIPSelf (EVA-CLIP keys; --model EVA02-B-16 or "
                                   "EVA02-L-14-336, or the release's names EVA02-CLIP-B-16 / EVA02-CLIP-L-14-336) "
                                   "or DetailCLIP (--model detailclip-timm-vit-b-16) checkpoint by "
                                   "key into a finegrain checkpoint ({'state_dict': open_clip state dict, "
                                   "'model_name'}); unknown or missing keys are an error listing them. "
                                   "Data: read the layout of the FineCLIP / CLIPSelf releases: COCO captions json, "
                                   "COCO-format proposals (or instances) json with bbox [x, y, w, h], and the "
                                   "region-caption json keyed '<file_name>_<int x>_<int y>_<int w>_<int h>.jpg'. "
                                   "Write one region-text record per image of the proposals json: all its "
                                   "captions, its boxes (xyxy) with their region captions. Boxes without a "
                                   "region caption are kept without one and counted; images without a caption "
                                   "are skipped and counted. The same files train directly with "
                                   "data.train.path=<captions> data.train.regions=<proposals> "
                                   "data.train.region_captions=<region captions> data.train.root=<image folder>.")
    p.add_argument("--checkpoint", help="checkpoint mode: a released FineCLIP / CLIPSelf / DetailCLIP .pt file")
    p.add_argument("--model", help="checkpoint mode: the target model name or JSON config")
    p.add_argument("--captions", help="data mode: COCO captions json, e.g. captions_train2017.json")
    p.add_argument("--regions", help="data mode: COCO-format proposals or instances json (category ids unused)")
    p.add_argument("--region-captions", help="data mode: json object: region key -> caption")
    p.add_argument("--image-dir", default="",
                   help="folder prefixed to each file_name so image paths are relative to the dataset root "
                        "(the output's folder unless data.*.root says otherwise), e.g. train2017")
    p.add_argument("--output", required=True, help="region-text JSONL file (data mode) or .pt file (checkpoint mode)")


def run(args) -> int:
    data_args = [a for a in ("captions", "regions", "region_captions") if getattr(args, a)]
    if args.checkpoint:
        if data_args or args.image_dir:
            raise DataError("give either --checkpoint (with --model) or --captions/--regions/--region-captions, "
                            "not both")
        if not args.model:
            raise DataError("--checkpoint needs --model, the target model (e.g. EVA02-B-16)")
        return _convert_checkpoint(args.checkpoint, args.model, args.output)
    missing = [f"--{a.replace('_', '-')}" for a in ("captions", "regions", "region_captions") if a not in data_args]
    if missing or args.model:
        raise DataError(f"data mode needs --captions, --regions and --region-captions (missing: "
                        f"{', '.join(missing) or 'none'}); --model goes with --checkpoint")
    from ..data.coco_regions import read_coco_region_text
    from ..data.records import write_jsonl

    records, summary = read_coco_region_text(args.captions, args.regions, args.region_captions, args.image_dir)
    write_jsonl(records, args.output)
    print(f"wrote {args.output}: {summary}")
    return 0


def _convert_checkpoint(source: str, name: str, output: str) -> int:
    from .. import __version__
    from ..models import create_model
    from ..models.released import detect_format, read_released
    from ..train.checkpoint import save_atomic

    state = read_released(source)
    if state is None:
        raise DataError(f"{source} is not a released FineCLIP / CLIPSelf (EVA-CLIP) or DetailCLIP checkpoint")
    model = create_model(name, pretrained=source)  # converts by key (models/released.py)
    model_name, clip = model.name, model.clip
    save_atomic({"state_dict": clip.state_dict(), "model_name": model_name, "config": {"model": {"name": name}},
                 "source": {"path": str(source), "format": detect_format(state)}, "finegrain_version": __version__},
                output)
    print(f"wrote {output}: {detect_format(state)} checkpoint {source} as {model_name}")
    return 0

