"""``create_model``: any open_clip model name, a JSON config of ours or a user's, optional weights."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import open_clip
import torch

from .clip import FinegrainCLIP

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)


def list_models() -> list[str]:
    """Model names ``create_model`` accepts (open_clip's and finegrain's, e.g. ``finegrain-tiny``)."""
    return open_clip.list_models()


def resolve_model_name(name: str) -> str:
    """Register a JSON config given by path and return its model name; built-in names pass through."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        cfg = json.loads(path.read_text())
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ValueError(f"model config {path} lacks {missing}: an open_clip model config needs "
                             "embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(path)
        return path.stem
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if name not in open_clip.list_models():
        raise ValueError(f"unknown model {name!r}; see `finegrain models` (open_clip names and finegrain "
                         "configs) or pass a path to an open_clip-style JSON config")
    return name


def create_model(name: str, pretrained: str | None = None, *, image_size: int | None = None,
                 precision: str = "fp32", device: str | torch.device = "cpu", **kwargs) -> FinegrainCLIP:
    """Build a :class:`FinegrainCLIP`.

    Args:
        name: an open_clip model name (``"ViT-B-16"``), a finegrain config name (``"finegrain-tiny"``),
            a path to an open_clip-style JSON config, or ``local-dir:`` / ``hf-hub:`` as in open_clip.
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``; downloads) or a
            local checkpoint file (open_clip or finegrain format).
        image_size: the model's native input size (open_clip's ``force_image_size``; position embeddings
            of a checkpoint are resized on load). Other sizes also work at run time.
        precision, device, kwargs: passed to ``open_clip.create_model``.
    """
    model_name = resolve_model_name(name)
    if pretrained is not None and Path(pretrained).suffix and not Path(pretrained).exists():
        raise FileNotFoundError(f"pretrained checkpoint {pretrained} does not exist")
    clip = open_clip.create_model(model_name, pretrained=pretrained, precision=precision, device=device,
                                  force_image_size=image_size, **kwargs)
    if pretrained is None and not model_name.startswith(("hf-hub:", "local-dir:")):
        logging.getLogger(__name__).info("model %s initialised randomly", model_name)
    model = FinegrainCLIP(clip, name=model_name)
    model.model_cfg = model_config(model_name, image_size)
    return model


def model_config(name: str, image_size: int | None = None) -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of a resolved model name."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    if cfg is None:
        raise ValueError(f"no model config found for {name!r}")
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    return cfg


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> FinegrainCLIP:
    """Rebuild the model of a finegrain training checkpoint (``step_*.pt`` / ``best.pt``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model_name" not in state:
        raise ValueError(f"{path} is not a finegrain training checkpoint (no 'model_name'); for an open_clip "
                         "checkpoint use create_model(name, pretrained=path)")
    model_cfg = state.get("config", {}).get("model", {})
    name = model_cfg.get("name", state["model_name"])
    return create_model(name, pretrained=str(path), image_size=model_cfg.get("image_size"), device=device)


def get_tokenizer(name: str, context_length: int | None = None):
    """open_clip's tokenizer for a model name or JSON config path: ``tokenizer(list[str]) -> (N, L)``."""
    return open_clip.get_tokenizer(resolve_model_name(name), context_length=context_length)
