"""Released FineCLIP / CLIPSelf and DetailCLIP checkpoints, converted by key to open_clip state dicts.

Two source formats:

``eva-clip``
    FineCLIP's and CLIPSelf's EVA02-CLIP models (their EVA-CLIP fork): ``visual.*`` an EVA ViT with separate
    ``q_proj`` / ``k_proj`` / ``v_proj`` weights, ``q_bias`` / ``v_bias`` (no k bias), SwiGLU ``w1/w2/w3``
    with ``ffn_ln``, ``inner_attn_ln``, rope buffers ``freqs_cos`` / ``freqs_sin`` (at ``visual.rope`` and
    in every block), ``head``; ``text.*`` an open_clip-named text transformer; ``logit_scale``. Targets:
    open_clip's ``EVA02-B-16`` / ``EVA02-L-14-336`` (a timm ``Eva`` trunk under ``visual.trunk``). The visual
    part goes through timm's own ``eva.checkpoint_filter_fn`` (which renames original EVA-CLIP keys and
    drops the rope buffers: timm recomputes them); the text part keeps its names.
``detailclip``
    DetailCLIP's model: ``visual.*`` a timm 0.5.4 ``VisionTransformer`` without head, ``image_projection``
    (width, embed_dim), an OpenAI-style text transformer at the top level (``transformer.*``,
    ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection``), ``logit_scale``, plus
    training-only parts (EMA teacher, decoder, heads) that are dropped. Target: ``detailclip-timm-vit-b-16``
    (timm trunk under ``visual.trunk``, ``image_projection`` transposed into ``visual.head.proj.weight``).

A checkpoint may wrap its state dict in ``{"model": ...}``, ``{"module": ...}`` or ``{"state_dict": ...}`` (the
first present, in that order, as the release's loader looks) and prefix its keys with ``module.`` (DDP). Position
embeddings are resized to the target model's grid by plain bicubic interpolation, as the releases' loaders do
(:func:`~finegrain.models.vit_tower.interpolate_pos_embed`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from timm.models.eva import checkpoint_filter_fn as eva_filter
from torch import nn

from ..errors import DataError
from .vit_tower import interpolate_pos_embed

EVA_CLIP, DETAILCLIP = "eva-clip", "detailclip"
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
DETAILCLIP_TRAINING_ONLY = ("visual_ema.", "transformer_e.", "image_projection_e", "text_projection_e",
                            "decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.",
                            "reconstruction_pred.", "ibot_head.", "ibot_head_e.")
WRAPPER_KEYS = ("model", "module", "state_dict")  # where the release's loader looks for the state dict, in order


class ReleasedCheckpointError(DataError):
    """A released checkpoint does not match the target model; the message lists the keys."""


def unwrap(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The tensor state dict of a checkpoint: inside the first of ``WRAPPER_KEYS`` that holds a dict, else the
    checkpoint itself; ``module.`` prefixes removed."""
    state = next((checkpoint[k] for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def detect_format(state_dict: dict) -> str | None:
    """``"eva-clip"``, ``"detailclip"`` or None (any other layout, e.g. open_clip's own) from the keys."""
    if "visual.blocks.0.attn.q_proj.weight" in state_dict and "text.token_embedding.weight" in state_dict:
        return EVA_CLIP
    if "image_projection" in state_dict and "visual.blocks.0.attn.qkv.weight" in state_dict:
        return DETAILCLIP
    return None


def read_released(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The unwrapped state dict of a checkpoint file in a released format, else None. Loaded with
    ``weights_only=True`` (``argparse.Namespace`` allowed: training scripts save their args) and memory-mapped
    when the file allows, so probing a large checkpoint of another format costs little."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        return None
    state = unwrap(checkpoint)
    return state if isinstance(state, dict) and detect_format(state) else None


def convert_eva_clip(state_dict: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """EVA-CLIP keys -> an open_clip ``CustomTextCLIP`` with a timm ``Eva`` trunk. Returns the converted state
    dict and the source keys no rule consumed."""
    visual = {k: v for k, v in state_dict.items() if k.startswith("visual.")}
    if "visual.pos_embed" in visual:  # resized here: timm's filter would resize with antialiasing
        visual["visual.pos_embed"] = _resized_pos_embed(visual["visual.pos_embed"], model)
    out = {"visual.trunk." + k: v for k, v in eva_filter(visual, model.visual.trunk).items()}
    unused = []
    for k, v in state_dict.items():
        if k.startswith("text.") or k == "logit_scale":
            out[k] = v
        elif not k.startswith("visual."):
            unused.append(k)
    return out, unused


def convert_detailclip(state_dict: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """DetailCLIP keys -> an open_clip ``CLIP`` with a timm ``VisionTransformer`` trunk and a bias-free linear
    projection. Training-only parts (``DETAILCLIP_TRAINING_ONLY``) are dropped. Returns the converted state
    dict and the source keys no rule consumed."""
    out, unused = {}, []
    for k, v in state_dict.items():
        if k.startswith(DETAILCLIP_TRAINING_ONLY):  # first: text_projection_e also starts like a text key
            continue
        if k == "visual.pos_embed":  # resized when the model is built at another size (1 prefix token: CLS)
            out["visual.trunk.pos_embed"] = _resized_pos_embed(v, model)
        elif k.startswith("visual."):
            out["visual.trunk." + k[len("visual."):]] = v
        elif k == "image_projection":  # x @ P (width, embed) == Linear with weight P.T
            out["visual.head.proj.weight"] = v.t()
        elif k.startswith(TEXT_KEYS) or k == "logit_scale":
            out[k] = v
        else:
            unused.append(k)
    return out, unused


def _resized_pos_embed(pos_embed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A released ``(1, 1 + g*g, W)`` position embedding (CLS first, square grid) resized to the grid of
    ``model``'s timm trunk; other shapes are left for :func:`check_keys` to report."""
    patches = pos_embed.shape[1] - 1 if pos_embed.ndim == 3 else 0
    grid = math.isqrt(max(patches, 0))
    if grid == 0 or grid * grid != patches:
        return pos_embed
    return interpolate_pos_embed(pos_embed, (grid, grid), tuple(model.visual.trunk.patch_embed.grid_size))


CONVERTERS = {EVA_CLIP: convert_eva_clip, DETAILCLIP: convert_detailclip}


def check_keys(converted: dict, model: nn.Module, unused: list[str], fmt: str) -> None:
    """Raise :class:`ReleasedCheckpointError` listing the source keys no rule consumed, the model keys the
    conversion did not produce, those it produced that the model lacks, and shape mismatches."""
    target = model.state_dict()
    problems = {
        "unknown source keys": unused,
        "missing (in the model, not produced)": sorted(set(target) - set(converted)),
        "unexpected (produced, not in the model)": sorted(set(converted) - set(target)),
        "shape mismatches": [f"{k} {tuple(converted[k].shape)} vs {tuple(target[k].shape)}"
                             for k in sorted(set(converted) & set(target)) if converted[k].shape != target[k].shape],
    }
    listed = "; ".join(f"{what}: {', '.join(keys)}" for what, keys in problems.items() if keys)
    if listed:
        raise ReleasedCheckpointError(f"{fmt} checkpoint does not match {type(model).__name__} "
                                      f"({type(model.visual).__name__} vision tower): {listed}")


def convert_released(state_dict: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Convert a released state dict (either format, detected from its keys) into ``model``'s open_clip keys;
    every source key must be consumed and every model key produced (else :class:`ReleasedCheckpointError`)."""
    fmt = detect_format(state_dict)
    if fmt is None:
        raise ReleasedCheckpointError("not a released FineCLIP / CLIPSelf (EVA-CLIP) or DetailCLIP checkpoint: "
                                      "expected visual.blocks.0.attn.q_proj.weight and text.token_embedding.weight "
                                      "(EVA-CLIP) or image_projection and visual.blocks.0.attn.qkv.weight (DetailCLIP)")
    if not hasattr(model.visual, "trunk"):
        raise ReleasedCheckpointError(f"{fmt} checkpoint needs a model with a timm vision trunk (EVA02-B-16, "
                                      "EVA02-L-14-336, detailclip-timm-vit-b-16), got "
                                      f"{type(model.visual).__name__}")
    converted, unused = CONVERTERS[fmt](state_dict, model)
    check_keys(converted, model, unused, fmt)
    return converted
