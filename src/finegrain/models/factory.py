"""``create_model``: any open_clip model name, a JSON config of ours or a user's, optional weights.

Importing this module registers finegrain's model configs (``finegrain-tiny``, ``finegrain-test``,
``detailclip-vit-b-16``, ``detailclip-tiny``) with open_clip, so ``open_clip.create_model("finegrain-tiny", ...)``
works after ``import finegrain.models``. open_clip model configs carry no image normalisation (open_clip takes
it from pretrained tags, else OpenAI's mean/std); ``model_configs/preprocess_cfg.json`` gives it for those of
ours that differ (the DetailCLIP configs: ImageNet's), and ``create_model`` applies it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import socket
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch

from ..errors import DataError
from .clip import FinegrainCLIP
from .released import convert_released, read_released
from .tower import UnsupportedModelError

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)
PREPROCESS_CFGS: dict[str, dict] = json.loads((CONFIG_DIR / "preprocess_cfg.json").read_text())

CONNECT_TIMEOUT_S = 2.5  # one connection attempt before open_clip's download retries
# what torch.load raises for a truncated or corrupt file (FileNotFoundError and other path errors pass)
CORRUPT_FILE_ERRORS = (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError)
# timm model names whose trunks are Eva / VisionTransformer (TimmTower checks the built trunk itself)
TIMM_DENSE_PREFIXES = ("eva02_", "eva_", "vit_")
# the FineCLIP / CLIPSelf releases' names (their EVA-CLIP fork's configs) for open_clip's models
RELEASED_MODEL_NAMES = {"EVA02-CLIP-B-16": "EVA02-B-16", "EVA02-CLIP-L-14": "EVA02-L-14",
                        "EVA02-CLIP-L-14-336": "EVA02-L-14-336"}
CUSTOM_BLOCK_KEYS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


class CheckpointError(DataError, RuntimeError):
    """A checkpoint file cannot be read; the message names it and an intact alternative."""


class PretrainedWeightsUnavailable(FileNotFoundError):
    """The weights of an open_clip pretrained tag are not cached and cannot be downloaded."""


def list_models() -> list[str]:
    """Model names ``create_model`` accepts (open_clip's and finegrain's, e.g. ``finegrain-tiny``)."""
    return open_clip.list_models()


def dense_support(model_cfg: dict) -> str | None:
    """Whether the dense API supports an open_clip model config, decided without building the model:
    None when it does (a ``VisionTransformer`` with default blocks and class-token pooling), else why not."""
    vision = model_cfg.get("vision_cfg", {})
    if "multimodal_cfg" in model_cfg:
        return "CoCa (multimodal decoder)"
    if vision.get("timm_model_name"):
        name = vision["timm_model_name"]
        if not name.startswith(TIMM_DENSE_PREFIXES):
            return f"timm trunk ({name}; only Eva / ViT trunks: {', '.join(TIMM_DENSE_PREFIXES)}...)"
        if "_mci" in name:
            return f"timm trunk ({name}: MobileCLIP's convolutional patch embedding)"
        if "_reg" in name:
            return f"timm trunk ({name}: register tokens)"
        if vision.get("timm_pool", "avg") != "token":
            return f"timm_pool={vision.get('timm_pool', 'avg')!r} (only 'token')"
        return None
    if isinstance(vision.get("layers"), (list, tuple)):
        return "ResNet tower"
    problems = []
    if vision.get("attentional_pool"):
        problems.append("attentional pooling")
    if vision.get("pool_type", "tok") != "tok":
        problems.append(f"pool_type={vision['pool_type']!r} (only 'tok')")
    if vision.get("final_ln_after_pool"):
        problems.append("final_ln_after_pool")
    block_type = vision.get("block_type")
    if block_type == "custom" or (block_type is None and any(vision.get(k) for k in CUSTOM_BLOCK_KEYS)):
        problems.append("custom attention blocks (qk_norm / scaled-cosine)")
    return "; ".join(problems) or None


def _blocks(layers: int, width: int, mlp_ratio: float, layer_scale: bool) -> int:
    """Parameters of ``layers`` open_clip residual attention blocks (two layer norms, attention, MLP)."""
    hidden = int(width * mlp_ratio)
    return layers * (4 * width + 4 * width * width + 4 * width + 2 * width * hidden + hidden + width
                     + (2 * width if layer_scale else 0))


def parameter_count(model_cfg: dict) -> int | None:
    """Parameters of an open_clip model config counted without building it: the standard ViT image tower and
    transformer text tower (open_clip's ``VisionTransformer`` / ``TextTransformer``); None for other towers
    (timm trunks, ResNets, Hugging Face text models, CoCa), which only a build can count."""
    vision, text, embed = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {}), model_cfg["embed_dim"]
    standard = ("multimodal_cfg" not in model_cfg and not vision.get("timm_model_name")
                and isinstance(vision.get("layers"), int) and not text.get("hf_model_name")
                and dense_support(model_cfg) is None and not text.get("embed_cls")
                and text.get("pool_type", "argmax") == "argmax" and not vision.get("output_tokens"))
    if not standard:
        return None
    w, patch, size = vision["width"], vision["patch_size"], vision["image_size"]
    grid = (size // patch) ** 2 if isinstance(size, int) else (size[0] // patch) * (size[1] // patch)
    image = (3 * patch * patch * w + w + (grid + 1) * w + (0 if vision.get("no_ln_pre") else 2 * w)
             + _blocks(vision["layers"], w, vision.get("mlp_ratio", 4.0), vision.get("ls_init_value") is not None)
             + 2 * w + w * embed)
    t = text.get("width", 512)
    words = (text.get("vocab_size", 49408) * t + text.get("context_length", 77) * t
             + _blocks(text.get("layers", 12), t, text.get("mlp_ratio", 4.0), text.get("ls_init_value") is not None)
             + 2 * t + t * embed + (embed if text.get("proj_bias") else 0))
    return image + words + 1 + (1 if model_cfg.get("init_logit_bias") is not None else 0)


def resolve_model_name(name: str) -> str:
    """Register a JSON config given by path and return its model name; the releases' names
    (``RELEASED_MODEL_NAMES``) become open_clip's; built-in names pass through."""
    name = RELEASED_MODEL_NAMES.get(name, name)
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"model config {path}: not valid JSON ({e.msg} at line {e.lineno} column "
                            f"{e.colno})") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise DataError(f"model config {path} lacks {missing}: an open_clip model config needs "
                            "embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(path)
        return path.stem
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if name not in open_clip.list_models():
        raise DataError(f"unknown model {name!r}; see `finegrain models` (open_clip names and finegrain "
                        "configs) or pass a path to an open_clip-style JSON config")
    return name


def create_model(name: str, pretrained: str | None = None, *, image_size: int | None = None,
                 precision: str = "fp32", device: str | torch.device = "cpu", **kwargs) -> FinegrainCLIP:
    """Build a :class:`FinegrainCLIP`.

    Args:
        name: an open_clip model name (``"ViT-B-16"``), a finegrain config name (``"finegrain-tiny"``), a
            released FineCLIP / CLIPSelf name (``"EVA02-CLIP-B-16"``: open_clip's ``EVA02-B-16``), a path to
            an open_clip-style JSON config, or ``local-dir:`` / ``hf-hub:`` as in open_clip.
        pretrained: an open_clip pretrained tag (``"openai"``, ``"laion2b_s34b_b88k"``; downloads) or a
            local checkpoint file (open_clip or finegrain format, or a released FineCLIP / CLIPSelf /
            DetailCLIP checkpoint, converted by key).
        image_size: the model's native input size (open_clip's ``force_image_size``). Position embeddings of
            a checkpoint are resized on load: by open_clip's own rule (antialiased bicubic, also that of the
            releases' copies of open_clip) for open_clip checkpoints, by plain bicubic (as the releases'
            loaders) for released files. Other sizes also work at run time (plain bicubic, as released).
        precision, device, kwargs: passed to ``open_clip.create_model``.
    """
    model_name = resolve_model_name(name)
    if name in RELEASED_MODEL_NAMES:
        logging.getLogger(__name__).warning("model %s (the FineCLIP / CLIPSelf releases' name) is open_clip's %s",
                                            name, model_name)
    if not model_name.startswith(("hf-hub:", "local-dir:")):  # refuse before any download
        reason = dense_support(model_config(model_name, image_size))
        if reason:
            raise UnsupportedModelError(f"model {model_name}: finegrain's dense API does not support it yet "
                                        f"({reason}); see `finegrain models --dense-only`")
    if pretrained is not None and Path(pretrained).suffix and not Path(pretrained).exists():
        raise FileNotFoundError(f"pretrained checkpoint {pretrained} does not exist")
    if pretrained is not None and Path(pretrained).is_file():
        check_checkpoint_file(pretrained)
    if pretrained is not None:
        check_pretrained_available(model_name, pretrained, kwargs.get("cache_dir"))
    random_init = pretrained is None and not model_name.startswith(("hf-hub:", "local-dir:"))
    released = _released_state_dict(pretrained)
    if model_name in PREPROCESS_CFGS:
        kwargs["force_preprocess_cfg"] = {**PREPROCESS_CFGS[model_name], **kwargs.get("force_preprocess_cfg", {})}
    with _drop_random_init_warning() if random_init or released else contextlib.nullcontext():
        try:
            clip = open_clip.create_model(model_name, pretrained=None if released else pretrained,
                                          precision=precision, device=device, force_image_size=image_size, **kwargs)
        except (RuntimeError, AssertionError) as e:
            held = checkpoint_model_name(pretrained) if pretrained else None
            if (held is None or held == model_name) and pretrained and Path(pretrained).is_file():
                # a weights file of another architecture (open_clip's loader fails on it)
                lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
                reason = (lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0])
                raise DataError(f"{pretrained}: its weights do not load into model {model_name} ({reason[:300]}); "
                                "set model.name to the model they were trained as") from None
            if held is None or held == model_name:
                raise
            raise DataError(f"{pretrained} holds a {held} model (its run's model.name), which does not load into "
                            f"model {model_name}; leave model.name to the checkpoint or set model.name={held}") from e
    if released:  # a released FineCLIP / CLIPSelf / DetailCLIP file: converted by key (models/released.py)
        clip.load_state_dict(convert_released(released, clip), strict=True)
    if random_init:
        logging.getLogger(__name__).info("model %s initialised randomly", model_name)
    model = FinegrainCLIP(clip, name=model_name)
    model.model_cfg = model_config(model_name, image_size)
    return model


def _released_state_dict(pretrained: str | None) -> dict | None:
    """The state dict of a released-format checkpoint file (see models/released.py), else None (tags, other
    formats, unreadable files: open_clip's loader handles and reports those)."""
    if pretrained is None or not Path(pretrained).is_file():
        return None
    try:
        return read_released(pretrained)
    except CORRUPT_FILE_ERRORS:
        return None


class _RandomInitFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def _drop_random_init_warning():
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" (logged on the root logger)
    when random initialisation is what was asked for; other messages pass."""
    root, drop = logging.getLogger(), _RandomInitFilter()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _env_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _behind_proxy() -> bool:
    return any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=CONNECT_TIMEOUT_S).close()
        return True
    except OSError:
        return False


def network_unavailable(host: str, hub: bool = True) -> str | None:
    """Why a download from ``host`` cannot work now, or None when it may: ``HF_HUB_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE`` is set (``hub``: for Hugging Face downloads), or one connection within
    ``CONNECT_TIMEOUT_S`` fails. Behind a proxy a direct connection test says nothing: None."""
    if hub and _env_offline():
        return "HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set"
    if _behind_proxy() or _reachable(host):
        return None
    return f"{host} is unreachable"


def _weights_location(pretrained_cfg: dict, cache_dir: str | None) -> tuple[bool, Path, str]:
    """Where open_clip's ``download_pretrained`` looks for a tag's weights: ``(cached, cache folder, host)``.
    Like open_clip, the Hugging Face hub is preferred when the entry has one and huggingface_hub is installed."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import has_hf_hub

    if pretrained_cfg.get("hf_hub") and has_hf_hub():
        from huggingface_hub import constants, try_to_load_from_cache

        repo_id, filename = os.path.split(pretrained_cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_NAME
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        cached = any(isinstance(try_to_load_from_cache(repo_id, n, cache_dir=cache_dir), str) for n in names)
        return cached, Path(cache_dir or constants.HF_HUB_CACHE), urlparse(constants.ENDPOINT).hostname
    url = pretrained_cfg["url"]
    folder = Path(cache_dir or "~/.cache/clip").expanduser()
    return (folder / os.path.basename(url)).is_file(), folder, urlparse(url).hostname


def check_pretrained_available(name: str, tag: str, cache_dir: str | None = None) -> None:
    """Fail fast, in one line, when open_clip tag ``tag`` of ``name`` is neither cached nor downloadable.

    Looks where open_clip would (the Hugging Face hub cache for ``hf_hub`` entries, ``~/.cache/clip`` for
    URLs). When the weights are not cached, the network counts as unreachable if ``HF_HUB_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` is set (nothing is tried then) or one connection to the download host fails
    within ``CONNECT_TIMEOUT_S``; open_clip's own retries would take about a minute. Files and unknown
    tag that is neither a file nor one of the model's pretrained tags is an error listing them.
    """
    if Path(tag).is_file():
        return
    pretrained_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise DataError(f"pretrained {tag!r} is neither a file nor a pretrained tag of {name} (tags: "
                        f"{', '.join(tags) if tags else 'none; pass a checkpoint file'})")
    if not pretrained_cfg.get("hf_hub") and not pretrained_cfg.get("url"):
        return
    cached, folder, host = _weights_location(pretrained_cfg, cache_dir)
    if cached:
        return
    why = network_unavailable(host)
    if why is None:
        return
    raise PretrainedWeightsUnavailable(
        f"the weights of {name} / {tag} are not in the cache ({folder}) and the network is unavailable ({why}): "
        f"pass a local checkpoint file as pretrained, or download them first where there is network "
        f"(e.g. open_clip.create_model({name!r}, pretrained={tag!r}))")


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU. A truncated or corrupt file is a
    :class:`CheckpointError`, one line naming the newest older checkpoint beside it that loads."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except CORRUPT_FILE_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise CheckpointError(f"{path}: cannot be read, the file is truncated or corrupt ({reason}); "
                              f"{_intact_alternative(path)}") from None


def _intact_alternative(path: Path) -> str:
    """The newest other ``.pt`` file beside ``path``, not written after it, that loads (each is loaded to check)."""
    written = path.stat().st_mtime_ns
    older = sorted((p for p in path.parent.glob("*.pt") if p.name != path.name and p.stat().st_mtime_ns <= written),
                   key=lambda p: p.stat().st_mtime_ns, reverse=True)
    intact = next((p for p in older if _loads(p)), None)
    if intact is None:
        return f"no older checkpoint in {path.parent} loads"
    return f"the newest older checkpoint in the folder that loads is {intact} (resume with --resume {intact})"


def _loads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except CORRUPT_FILE_ERRORS:
        return False
    return True


def model_config(name: str, image_size: int | None = None) -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) of a resolved model name."""
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    if cfg is None:
        raise DataError(f"no model config found for {name!r}")
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    return cfg


def check_checkpoint_file(path: str | Path) -> None:
    """A :class:`CheckpointError` naming ``path`` and what it holds when it is not a file ``torch.load`` reads (an
    empty file, text, a truncated archive), before a loader fails on it with a bare error."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    if zipfile.is_zipfile(path):
        return  # torch.save's format; a damaged member still fails in the loader, which names the file
    with path.open("rb") as f:
        head = f.read(64)
    try:
        torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except (*CORRUPT_FILE_ERRORS, OSError):
        text = head.decode("utf-8", "replace").splitlines()[0][:40] if head else ""
        shown = ("a truncated or damaged archive" if head.startswith(b"PK") else
                 f"text starting {text!r}" if head.isascii() and text.isprintable() else "no PyTorch archive")
        raise CheckpointError(f"{path} is not a checkpoint (it holds {shown}): pretrained weights are a finegrain "
                              "run's step_*.pt / best.pt, an open_clip checkpoint, a released FineCLIP / CLIPSelf / "
                              "DetailCLIP file, or an open_clip tag") from None


def checkpoint_model_name(path: str | Path) -> str | None:
    """The model name of a finegrain training checkpoint (its run's ``model.name``), read without loading its
    tensors; None for anything else (an open_clip tag or file, a released checkpoint, a file that does not load)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (*CORRUPT_FILE_ERRORS, OSError):
        return None
    if not isinstance(state, dict) or "model_name" not in state:
        return None
    return (state.get("config") or {}).get("model", {}).get("name") or state["model_name"]


def preprocess_override(model_cfg) -> dict:
    """``create_model`` keyword arguments for a config's ``image_mean`` / ``image_std`` (``model.*``, as a
    :class:`~finegrain.config.ModelConfig` or its dict): open_clip's ``force_preprocess_cfg``, or none."""
    get = model_cfg.get if isinstance(model_cfg, dict) else lambda key: getattr(model_cfg, key, None)
    override = {key: list(get(f"image_{key}")) for key in ("mean", "std") if get(f"image_{key}") is not None}
    return {"force_preprocess_cfg": override} if override else {}


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                          state: dict | None = None) -> FinegrainCLIP:
    """Rebuild the model of a finegrain training checkpoint (``step_*.pt`` / ``best.pt``); ``state``: its
    contents when already read (:func:`read_checkpoint`), so that they are not read twice."""
    state = read_checkpoint(path) if state is None else state
    if not isinstance(state, dict) or "model_name" not in state:
        raise DataError(f"{path} is not a finegrain training checkpoint (no 'model_name'); for an open_clip "
                        "checkpoint use create_model(name, pretrained=path)")
    model_cfg = state.get("config", {}).get("model", {})
    name = model_cfg.get("name", state["model_name"])
    return create_model(name, pretrained=str(path), image_size=model_cfg.get("image_size"), device=device,
                        **preprocess_override(model_cfg))


def get_tokenizer(name: str, context_length: int | None = None):
    """open_clip's tokenizer for a model name or JSON config path: ``tokenizer(list[str]) -> (N, L)``."""
    return open_clip.get_tokenizer(resolve_model_name(name), context_length=context_length)
