#!/usr/bin/env python
"""Annotation throughput: images/s and regions/s of `finegrain annotate` per proposer and captioner.

Writes ``--images`` COCO-size JPEGs (see ``input_pipeline.write_dataset``) whose records carry
``--regions`` random boxes each (the ``gt`` proposer's input; CC2.5M has about 4 regions per image), then
runs the real pipeline (``finegrain.annotate.pipeline.run_annotation``: threaded decoding, proposer,
filter, crops, captioner, JSONL shards) once per set-up ``PROPOSER+CAPTIONER`` and reports images/s,
regions/s and the hours that rate implies for CC2.5M's 10.4M regions.

Models have random weights of realistic sizes (timing does not depend on the values):

  proposers   gt: the records' boxes; torchvision: Faster R-CNN (``--detector``), its best ``--regions``
              boxes per image kept (``--min-score 0``)
  captioners  template: RegionCLIP's rule with a CLIP (``--clip-model``, ImageNet's 1000 classes as concepts);
              blip2-tiny / blip2-opt-2.7b / blip2-opt-6.7b: BLIP-2 (ViT-g/14 + Q-Former + OPT; tiny is a test
              model) generating exactly ``--tokens`` tokens per region (``min_new_tokens``), in bf16 on CUDA

  python benchmarks/annotate_throughput.py                          # CPU: tiny models, 32 images
  python benchmarks/annotate_throughput.py --device cuda --images 512 --setups gt+blip2-opt-2.7b \\
      gt+blip2-opt-6.7b torchvision+template --caption-batch-size 128 --json h100-annotate.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from input_pipeline import write_dataset
from step_time import print_rows, run_benchmark

from finegrain.annotate.base import ProposalFilter
from finegrain.annotate.captioners import Blip2Captioner, TemplateCaptioner
from finegrain.annotate.output import AnnotationOutput
from finegrain.annotate.pipeline import Annotator, run_annotation
from finegrain.annotate.proposers import GroundTruthProposer, TorchvisionProposer
from finegrain.annotate.sources import ImageSource
from finegrain.models import create_model, get_tokenizer

CC25M_REGIONS = 10.4e6  # FineCLIP's CC2.5M: YOLOv9 boxes captioned by BLIP2-COCO-6.7B in about 12.5 h
# BLIP-2's ViT-g/14 (EVA-CLIP, without its last layer), Q-Former (BERT-base width, 32 queries), OPT sizes
VISION = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
              "image_size": 224, "patch_size": 14}
QFORMER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "encoder_hidden_size": 1408}
OPT = {"opt-2.7b": {"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32},
       "opt-6.7b": {"hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32, "num_attention_heads": 32}}
OPT_VOCAB = 50272


def with_boxes(records_path: Path, regions: int, seed: int = 0) -> None:
    """Give every record of the JSONL ``regions`` random boxes of 32 to 320 pixels inside its image."""
    rng = random.Random(seed)
    lines = []
    for line in records_path.read_text().splitlines():
        record = json.loads(line)
        boxes = []
        for _ in range(regions):
            w, h = rng.uniform(32, 320), rng.uniform(32, 320)
            x, y = rng.uniform(0, record["width"] - w), rng.uniform(0, record["height"] - h)
            boxes.append({"box": [x, y, x + w, y + h]})
        lines.append(json.dumps({**record, "regions": boxes}))
    records_path.write_text("\n".join(lines) + "\n")


def random_blip2(size: str, device: torch.device, dtype: torch.dtype):
    """``(model, processor)``: a random-weight BLIP-2 of ``size`` (``tiny`` or an :data:`OPT` size) with an
    in-memory word-level tokenizer of OPT's vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
        PreTrainedTokenizerFast,
    )

    tiny = size == "tiny"
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(special + [f"w{i}" for i in range((512 if tiny else OPT_VOCAB) - 5)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", padding_side="left")
    queries = 4 if tiny else 32
    image_size = 32 if tiny else VISION["image_size"]
    processor = Blip2Processor(BlipImageProcessor(size={"height": image_size, "width": image_size}), tokenizer,
                               num_query_tokens=queries)
    if tiny:
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "image_size": 32, "patch_size": 8}
        qformer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "encoder_hidden_size": 32}
        text = {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    else:
        vision, qformer, text = VISION, QFORMER, OPT[size]
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**vision), qformer_config=Blip2QFormerConfig(**qformer),
        text_config=OPTConfig(vocab_size=len(tokenizer), word_embed_proj_dim=text["hidden_size"],
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, **text),
        num_query_tokens=queries, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # weights made where they run, in their dtype (seconds, not minutes)
            model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval(), processor


def build_captioner(name: str, args, device: torch.device):
    if name == "template":
        model = create_model(args.clip_model, device=device)
        return TemplateCaptioner(model, get_tokenizer(args.clip_model), "imagenet", templates="simple",
                                 batch_size=args.caption_batch_size, device=device, model_label=args.clip_model)
    size = name.removeprefix("blip2-")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = random_blip2(size, device, dtype)
    model.generation_config.min_new_tokens = args.tokens  # every caption exactly --tokens long
    params = sum(p.numel() for p in model.parameters())
    return Blip2Captioner(model, processor, max_new_tokens=args.tokens, batch_size=args.caption_batch_size,
                          device=device, name=f"blip2-{size}({params / 1e9:.2f}B)")


def build_proposer(name: str, args, device: torch.device):
    if name == "gt":
        return GroundTruthProposer()
    return TorchvisionProposer(args.detector, weights="none", device=str(device), batch_size=args.batch_size)


def timed_run(annotator: Annotator, records: Path, count: int, output: Path, device: torch.device):
    """``(seconds, counts)`` of annotating the first ``count`` records into ``output`` (one shard)."""
    source = ImageSource(str(records), images_per_shard=count)
    out = AnnotationOutput(output, "jsonl", {"records": str(records)}, 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    counts, _ = run_annotation(source, annotator, out, [0], progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, counts


def measure(args, device: torch.device) -> list[dict]:
    folder = Path(tempfile.mkdtemp(prefix="finegrain-annotate-bench-"))
    records = write_dataset(folder, args.images)
    with_boxes(records, args.regions)
    results, built = [], {}
    for setup in args.setups:
        proposer_name, captioner_name = setup.split("+")
        for kind, name, build in (("proposer", proposer_name, build_proposer),
                                  ("captioner", captioner_name, build_captioner)):
            if (kind, name) not in built:
                start = time.perf_counter()
                built = {k: v for k, v in built.items() if k[0] != kind}  # one model of each kind in memory
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                built[(kind, name)] = build(name, args, device)
                print(f"built {kind} {name} in {time.perf_counter() - start:.0f} s", flush=True)
        annotator = Annotator(built[("proposer", proposer_name)], built[("captioner", captioner_name)],
                              ProposalFilter(min_score=0.0, max_per_image=args.regions), batch_size=args.batch_size)

        timed_run(annotator, records, min(args.warmup, args.images), folder / f"{setup}-warmup", device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, counts = timed_run(annotator, records, args.images, folder / f"{setup}-timed", device)
        regions_per_s = counts.regions / seconds
        results.append({"setup": setup, "images": counts.images, "regions": counts.regions, "seconds": seconds,
                        "images_per_s": counts.images / seconds, "regions_per_s": regions_per_s,
                        "cc25m_hours": CC25M_REGIONS / regions_per_s / 3600,
                        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                        "captioner": annotator.captioner.describe()})
        print(f"{setup}: {results[-1]['images_per_s']:.1f} images/s, {regions_per_s:.1f} regions/s", flush=True)
    print_rows(["setup", "images", "regions", "s", "images/s", "regions/s", "h for 10.4M regions", "peak GiB"],
               [[r["setup"], str(r["images"]), str(r["regions"]), f"{r['seconds']:.1f}", f"{r['images_per_s']:.1f}",
                 f"{r['regions_per_s']:.1f}", f"{r['cc25m_hours']:.1f}",
                 "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"] for r in results],
               f"(random weights; {args.regions} regions per image; captions of exactly {args.tokens} tokens; "
               f"{device}; wall time of run_annotation over {args.images} images after a warm-up)")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="(default: %(default)s)")
    p.add_argument("--setups", nargs="+", default=["gt+template", "gt+blip2-tiny", "torchvision+blip2-tiny"],
                   help="PROPOSER+CAPTIONER set-ups (default: %(default)s)")
    p.add_argument("--images", type=int, default=32, help="images timed (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=8, help="images of the untimed warm-up run (default: %(default)s)")
    p.add_argument("--regions", type=int, default=4, help="regions per image (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per caption (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per proposer call (default: %(default)s)")
    p.add_argument("--caption-batch-size", type=int, default=64, help="crops per captioner call (default: %(default)s)")
    p.add_argument("--detector", default=None,
                   help="torchvision detector (default: fasterrcnn_resnet50_fpn_v2 on CUDA, "
                        "fasterrcnn_mobilenet_v3_large_320_fpn on CPU)")
    p.add_argument("--clip-model", default=None, help="template captioner's CLIP (default: ViT-B-16 on CUDA, "
                                                      "finegrain-tiny on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.detector = args.detector or ("fasterrcnn_resnet50_fpn_v2" if gpu else "fasterrcnn_mobilenet_v3_large_320_fpn")
    args.clip_model = args.clip_model or ("ViT-B-16" if gpu else "finegrain-tiny")
    return run_benchmark(args, lambda device: measure(args, device))


if __name__ == "__main__":
    sys.exit(main())
