#!/usr/bin/env python
"""A fine-grained method's training step vs. a naive implementation of it and vs. plain CLIP, in one process.

Three set-ups, each the trainer itself (``Trainer.train_step`` + ``Trainer.flush_log`` on a loader-style
uint8 batch), built from the same initial weights and stepped on the same synthetic batch:

  method   the method as shipped. ``--method fineclip``: one tower pass gives the full image's global
           embedding and its v-only dense map; the frozen text tower runs without a graph.
           ``--method detailclip``: the teacher forms only the CLS row of each layer's attention and
           every block runs fused attention (SDPA).
  naive    the same method and losses with the released code's computation, registered by this script
           and differing from ``method`` only there. ``fineclip_naive``: the image tower runs three times
           per step (crops, full image for the dense map, full image again for the global embedding).
           ``detailclip_naive``: the teacher materialises every layer's full attention maps
           (softmax(QK^T), unfused) and keeps them to use one row of each.
  clip     plain CLIP (method ``clip``) on the same images (first view) and captions: the cost multiple's
           baseline.

Method: ``--warmup`` steps of each, then method, naive, clip, method, ... interleaved for ``--repeats``
rounds; medians compared: ratio = median(method) / median(naive), cost multiple = median(method) /
median(clip). For FineCLIP with R regions per image the image-tower FLOPs bound the ratio at about
(R + 1 + 1/L) / (R + 2) for L blocks (the crops and one full pass, plus the v-only last block, against the
crops and two full passes); the script prints that bound and PASSes when the ratio is within 5% of it.
For DetailCLIP it PASSes when peak memory is below the naive variant's and the cost multiple is <= 2.5.

``--method fineclip+detailclip`` instead times the composed method's step against FineCLIP's and
DetailCLIP's steps alone (same weights, heads, teacher; the same images, regions and views; text towers
frozen as in the recipe) and PASSes when it costs less than the two steps back to back (shared caption
embeddings, one backward, one optimizer step).
Peak memory: one extra untimed step of each (see benchmarks/step_time.py for how it is measured on CPU
and CUDA).

Examples:
  python benchmarks/method_step.py                                   # CPU: finegrain-tiny@16 and ViT-B-16@4, R = 4, 20
  python benchmarks/method_step.py --models ViT-B-16 --batch-sizes 4 --regions 20 --json out.json
  python benchmarks/method_step.py --method detailclip --models detailclip-vit-b-16   # CPU, batch 4 x 2 views
  python benchmarks/method_step.py --method detailclip --models detailclip-tiny method.out_dim=512 \
      method.hidden_dim=256 method.bottleneck_dim=64                # the demo's head sizes
  python benchmarks/method_step.py --device cuda --precision bf16 --models ViT-B-16 --batch-sizes 32 --regions 20
  python benchmarks/method_step.py --method fineclip+detailclip --models finegrain-tiny --regions 4 \
      method.detailclip.out_dim=512 method.detailclip.hidden_dim=256 method.detailclip.bottleneck_dim=64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from step_time import fmt_mem, peak_memory_mb, print_rows, relative_iqr, run_benchmark, timed_step

from finegrain.config import load_config
from finegrain.models.roi import pool_boxes
from finegrain.models.tower import TowerOutput
from finegrain.models.vit_tower import OpenCLIPViTTower
from finegrain.objectives import register_method
from finegrain.objectives.detailclip import DetailCLIP
from finegrain.objectives.fineclip import FineCLIP, encode_text, scatter_rows
from finegrain.train.trainer import Trainer

TOTAL_STEPS = 10_000  # for the learning-rate schedule only
COMPOSED = "fineclip+detailclip"
DEFAULT_MODELS = {"fineclip": ["finegrain-tiny", "ViT-B-16"], "detailclip": ["detailclip-tiny", "detailclip-vit-b-16"],
                  COMPOSED: ["finegrain-tiny", "ViT-B-16"]}
DEFAULT_BATCH_SIZES = {"finegrain-tiny": 16, "detailclip-tiny": 16}  # other models: 4
MAX_COST_MULTIPLE = {"detailclip": 2.5}


@register_method("fineclip_naive")
class NaiveFineCLIP(FineCLIP):
    """FineCLIP with the released code's three image-tower passes per step (and the text tower run
    without ``no_grad``); the losses are the shipped method's."""

    def features(self, model, batch, progress):
        image = model.encode_image(batch["image"], normalize=True)  # pass 1: global
        dense = model.encode_dense(batch["image"])  # pass 2: dense, all blocks again
        valid = batch["box_valid"]
        roi = pool_boxes(dense, batch["boxes"], model.patch_size, valid)
        crop = scatter_rows(model.encode_image(batch["crops"], normalize=True).to(roi.dtype), valid)  # pass 3
        region_valid = valid & batch["region_text_valid"]
        region_text = scatter_rows(F.normalize(model.encode_text(batch["region_text"][region_valid]).float(), dim=-1),
                                   region_valid)
        return {"image": image, "text": encode_text(model, batch["text"]), "roi": roi,
                "crop": crop, "region_text": region_text, "box_valid": valid, "region_valid": region_valid}


def naive_teacher_pass(source, model, views):
    """The released teacher pass: every layer's full attention map materialised, unfused (``softmax(q k^T /
    sqrt(d))`` for all queries, maps of all layers stacked, then one row used)."""
    visual = source.teacher["visual"]
    x, grid = OpenCLIPViTTower(visual)._embed(views)
    x = visual.ln_pre(x)
    maps = []
    for block in visual.transformer.resblocks:
        attn = block.attn
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(
            *x.shape[:2], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (N, heads, T, T)
        maps.append(weights)
        x = x + block.ls_1(attn.out_proj((weights @ v).transpose(1, 2).reshape(x.shape)))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    cls_attention = torch.stack(maps, dim=1)[:, :, :, 0, 1:]
    return TowerOutput(grid_size=grid, tokens=visual.ln_post(x), cls_attention=cls_attention)


@register_method("detailclip_naive")
class NaiveDetailCLIP(DetailCLIP):
    """DetailCLIP whose teacher pass is :func:`naive_teacher_pass`, as released."""

    def __init__(self, options, model):
        super().__init__(options, model)
        source = self.sources["token_removal"]
        source.teacher_pass = types.MethodType(naive_teacher_pass, source)


@dataclass
class Setup:
    label: str
    trainer: Trainer

    @property
    def device(self):
        return self.trainer.device

    def step(self, batch: dict) -> float:
        self.trainer.train_step(iter([dict(batch, bad_records=[])]))
        return self.trainer.flush_log()["loss"]


def make_setup(label: str, method: str, name: str, args, device, method_overrides: list[str], state=None) -> Setup:
    overrides = [f"model.name={name}", f"method.name={method}", f"train.device={device.type}",
                 f"train.precision={args.precision}", f"train.output_dir={tempfile.mkdtemp(prefix='finegrain-bench-')}",
                 f"train.steps={TOTAL_STEPS}", "train.log_every=1", *method_overrides]
    trainer = Trainer(load_config(None, overrides), progress_bar=False)
    if state is not None:
        trainer.model.clip.load_state_dict(state)
    return Setup(label, trainer)


def synthetic_batch(model, method: str, batch_size: int, regions: int, generator: torch.Generator) -> dict:
    """uint8 images of the model's size and token ids; FineCLIP: ``regions`` captioned boxes per image with
    their uint8 crops; DetailCLIP: two views per image."""
    h, w = model.image_size
    length = model.context_length
    views = 2 if method == "detailclip" else 1
    image = torch.randint(0, 256, (batch_size, views, 3, h, w), generator=generator, dtype=torch.uint8)
    batch = {"image": image.squeeze(1), "text": torch.randint(1, 49000, (batch_size, length), generator=generator)}
    if method == "fineclip":
        xy = torch.rand(batch_size, regions, 2, generator=generator) * torch.tensor([w / 2, h / 2])
        wh = (0.2 + 0.3 * torch.rand(batch_size, regions, 2, generator=generator)) * torch.tensor([w, h])
        batch.update(boxes=torch.cat([xy, xy + wh], dim=-1), box_valid=torch.ones(batch_size, regions, dtype=torch.bool),
                     region_text=torch.randint(1, 49000, (batch_size, regions, length), generator=generator),
                     region_text_valid=torch.ones(batch_size, regions, dtype=torch.bool),
                     crops=torch.randint(0, 256, (batch_size * regions, 3, h, w), generator=generator, dtype=torch.uint8))
    return batch


def fineclip_bound(regions: int, layers: int) -> float:
    """Image-tower FLOPs of the one-pass step over the three-pass step: (R + 1 + 1/L) / (R + 2)."""
    return (regions + 1 + 1 / layers) / (regions + 2)


def time_setups(setups: list[Setup], batches: dict, args) -> tuple[dict, dict, dict]:
    """``--warmup`` steps of each set-up, then ``--repeats`` interleaved rounds, then one untimed step each for
    peak memory; returns the first-step losses, the step times and the peak memory by label."""
    first = {}
    for setup in setups:
        for _ in range(args.warmup):
            _, loss = timed_step(setup, batches[setup.label])
            first.setdefault(setup.label, loss)
    times = {s.label: [] for s in setups}
    for i in range(args.repeats):
        for setup in setups:
            times[setup.label].append(timed_step(setup, batches[setup.label])[0])
        print(f"  round {i + 1:3d}/{args.repeats}: "
              + "  ".join(f"{k} {v[-1] * 1e3:8.1f} ms" for k, v in times.items()), flush=True)
    return first, times, {s.label: peak_memory_mb(s, batches[s.label]) for s in setups}


def run_config(name: str, batch_size: int, regions: int, args, device) -> dict:
    torch.manual_seed(args.seed)
    common = ["model.lock_text=true"] if args.method == "fineclip" else []  # the same trainable parameters
    method = [*common, *([f"method.max_regions={regions}"] if args.method == "fineclip" else []), *args.overrides]
    ours = make_setup("method", args.method, name, args, device, method)
    state = ours.trainer.model.clip.state_dict()
    setups = [ours, make_setup("naive", f"{args.method}_naive", name, args, device, method, state),
              make_setup("clip", "clip", name, args, device, common, state)]
    setups[1].trainer.method.load_state_dict(ours.trainer.method.state_dict())  # same heads and teacher
    model = ours.trainer.model
    generator = torch.Generator().manual_seed(args.seed)
    batch = synthetic_batch(model, args.method, batch_size, regions, generator)
    clip_batch = {"image": batch["image"][:, 0] if args.method == "detailclip" else batch["image"], "text": batch["text"]}
    batches = {"method": batch, "naive": batch, "clip": clip_batch}
    layers = model.tower.num_layers
    shape = f"{batch_size} x {regions} regions" if args.method == "fineclip" else f"{batch_size} x 2 views"
    print(f"\n== {args.method} {name}  batch {shape}  image {tuple(model.image_size)}  device {device}  "
          f"{args.precision}  warmup {args.warmup}  repeats {args.repeats}", flush=True)
    first, times, memory = time_setups(setups, batches, args)
    print(f"  first-step loss: method {first['method']:.5f}  naive {first['naive']:.5f} (must agree)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio, cost = med["method"] / med["naive"], med["method"] / med["clip"]
    result = {"method": args.method, "model": name, "batch_size": batch_size, "regions": regions, "layers": layers,
              "image_size": list(model.image_size), "device": str(device), "precision": args.precision,
              "repeats": args.repeats, "first_step_loss": first, "times_s": times, "median_s": med,
              "images_per_s": {k: batch_size / v for k, v in med.items()}, "peak_memory_mib": memory,
              "relative_iqr": {k: relative_iqr(v) for k, v in times.items()},
              "ratio_vs_naive": ratio, "cost_multiple_vs_clip": cost}
    if args.method == "fineclip":
        result["flop_bound"] = fineclip_bound(regions, layers)
        result["pass"] = ratio <= result["flop_bound"] * 1.05
        verdict = f"FLOP bound {result['flop_bound']:.3f}: {'PASS' if result['pass'] else 'FAIL'} at 5%"
    else:
        lower_memory = None if memory["method"] is None else memory["method"] < memory["naive"]
        result["pass"] = cost <= MAX_COST_MULTIPLE[args.method] and lower_memory is not False
        verdict = (f"memory below naive: {lower_memory}, cost multiple <= {MAX_COST_MULTIPLE[args.method]}: "
                   f"{'PASS' if result['pass'] else 'FAIL'}")
    print(f"  method/naive {ratio:.3f} ({verdict}), method/clip {cost:.2f}x, peak MiB "
          + ", ".join(f"{k} {fmt_mem(v)}" for k, v in memory.items()), flush=True)
    return result


def part_overrides(args, part: str) -> list[str]:
    """The composed set-up's ``method.<part>.key=value`` overrides as ``method.key=value``, for the part alone."""
    prefix = f"method.{part}."
    return [f"method.{o[len(prefix):]}" for o in args.overrides if o.startswith(prefix)]


def run_composed(name: str, batch_size: int, regions: int, args, device) -> dict:
    """``fineclip+detailclip`` against FineCLIP and DetailCLIP alone: same weights, heads, teacher and batch
    (FineCLIP's image, regions and crops; DetailCLIP's two views). Each set-up's text tower is frozen, as in
    the shipped recipe."""
    torch.manual_seed(args.seed)
    both = make_setup("composed", COMPOSED, name, args, device,
                      [f"method.fineclip.max_regions={regions}", "method.detailclip.lock_text=true", *args.overrides])
    state = both.trainer.model.clip.state_dict()
    setups = [both,
              make_setup("fineclip", "fineclip", name, args, device,
                         [f"method.max_regions={regions}", *part_overrides(args, "fineclip")], state),
              make_setup("detailclip", "detailclip", name, args, device,
                         ["method.lock_text=true", *part_overrides(args, "detailclip")], state)]
    setups[2].trainer.method.load_state_dict(both.trainer.method.state_dict())  # same heads, centres, teacher
    model = both.trainer.model
    generator = torch.Generator().manual_seed(args.seed)
    batch = synthetic_batch(model, "fineclip", batch_size, regions, generator)
    h, w = model.image_size
    views = torch.randint(0, 256, (batch_size, 2, 3, h, w), generator=generator, dtype=torch.uint8)
    batches = {"composed": {**batch, "views": views}, "fineclip": batch,
               "detailclip": {"image": views, "text": batch["text"]}}
    print(f"\n== {COMPOSED} {name}  batch {batch_size} x {regions} regions + 2 views  image {tuple(model.image_size)}  "
          f"device {device}  {args.precision}  warmup {args.warmup}  repeats {args.repeats}", flush=True)
    _, times, memory = time_setups(setups, batches, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["composed"] / (med["fineclip"] + med["detailclip"])
    result = {"method": COMPOSED, "model": name, "batch_size": batch_size, "regions": regions,
              "image_size": list(model.image_size), "device": str(device), "precision": args.precision,
              "repeats": args.repeats, "times_s": times, "median_s": med, "peak_memory_mib": memory,
              "relative_iqr": {k: relative_iqr(v) for k, v in times.items()},
              "ratio_vs_back_to_back": ratio, "pass": ratio < 1.0}
    print(f"  composed / (fineclip + detailclip) {ratio:.3f} ({'PASS' if ratio < 1 else 'FAIL'}: below 1), peak MiB "
          + ", ".join(f"{k} {fmt_mem(v)}" for k, v in memory.items()), flush=True)
    return result


def print_composed_table(results: list[dict]) -> None:
    headers = ["model", "batch", "prec", "composed ms", "fineclip ms", "detailclip ms", "composed/(both)",
               "composed MiB", "fineclip MiB", "detailclip MiB", "result"]
    rows = [[r["model"], f"{r['batch_size']} x {r['regions']} + 2v", r["precision"],
             *(f"{r['median_s'][k] * 1e3:.0f}" for k in ("composed", "fineclip", "detailclip")),
             f"{r['ratio_vs_back_to_back']:.3f}",
             *(fmt_mem(r["peak_memory_mib"][k]) for k in ("composed", "fineclip", "detailclip")),
             "PASS" if r["pass"] else "FAIL"] for r in results]
    print_rows(headers, rows, "(median step times over interleaved rounds; (both) = the FineCLIP and DetailCLIP "
               "steps back to back; MiB = peak memory one step adds)")


def print_table(results: list[dict]) -> None:
    headers = ["method", "model", "batch", "prec", "method ms", "naive ms", "clip ms", "method/naive", "bound",
               "method/clip", "method MiB", "naive MiB", "img/s", "result"]
    rows = [[r["method"], r["model"], f"{r['batch_size']} x {r['regions'] if r['method'] == 'fineclip' else '2v'}",
             r["precision"], f"{r['median_s']['method'] * 1e3:.0f}", f"{r['median_s']['naive'] * 1e3:.0f}",
             f"{r['median_s']['clip'] * 1e3:.0f}", f"{r['ratio_vs_naive']:.3f}",
             f"{r['flop_bound']:.3f}" if "flop_bound" in r else "-", f"{r['cost_multiple_vs_clip']:.2f}x",
             fmt_mem(r["peak_memory_mib"]["method"]), fmt_mem(r["peak_memory_mib"]["naive"]),
             f"{r['images_per_s']['method']:.1f}", "PASS" if r["pass"] else "FAIL"] for r in results]
    print_rows(headers, rows, "(median step times over interleaved rounds; MiB = peak memory one step adds; "
               "img/s = images per second of the method's step)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(DEFAULT_MODELS), default="fineclip", help="(default: %(default)s)")
    p.add_argument("--models", default=None, help="comma-separated (default: finegrain-tiny,ViT-B-16 for fineclip; "
                                                  "detailclip-tiny,detailclip-vit-b-16 for detailclip)")
    p.add_argument("--batch-sizes", default=None, help="one per model or one for all (default: 16 tiny, 4 others)")
    p.add_argument("--regions", default="4,20", help="fineclip: regions per image, comma-separated (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for the method and naive set-ups, e.g. method.out_dim=512 (composed: "
                        "method.detailclip.out_dim=512, applied to DetailCLIP alone too)")
    args = p.parse_args(argv)
    args.models = DEFAULT_MODELS[args.method] if args.models is None else [m for m in args.models.split(",") if m]
    sizes = ([DEFAULT_BATCH_SIZES.get(m, 4) for m in args.models] if args.batch_sizes is None
             else [int(b) for b in args.batch_sizes.split(",")])
    args.batch_sizes = sizes * len(args.models) if len(sizes) == 1 else sizes
    args.regions = [int(r) for r in args.regions.split(",")] if args.method != "detailclip" else [0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    def run(device) -> list[dict]:
        one = run_composed if args.method == COMPOSED else run_config
        results = [one(name, bs, r, args, device) for name, bs in zip(args.models, args.batch_sizes)
                   for r in args.regions]
        (print_composed_table if args.method == COMPOSED else print_table)(results)
        return results

    return run_benchmark(args, run)


if __name__ == "__main__":
    sys.exit(main())
