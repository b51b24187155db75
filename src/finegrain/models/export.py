"""Export to open_clip's ``local-dir:`` layout, loadable by ``open_clip.create_model("local-dir:DIR")`` and
by CLIP_benchmark (``--model local-dir:DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
from safetensors.torch import save_file

from .clip import FinegrainCLIP


def export_local_dir(model: FinegrainCLIP, out_dir: str | Path) -> Path:
    """Write ``open_clip_config.json`` (model and preprocess config) and ``open_clip_model.safetensors``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pp = open_clip.get_model_preprocess_cfg(model.clip)
    preprocess = {k: pp[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pp}
    config = {"model_cfg": model.model_cfg, "preprocess_cfg": preprocess}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    weights = out_dir / "open_clip_model.safetensors"
    save_file(state, str(weights))
    weights.chmod(0o644)  # readable like the config beside it (the writer creates it owner-only)
    return out_dir
