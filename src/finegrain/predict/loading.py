"""One way to load a checkpoint for prediction: a finegrain run's checkpoint (its model, and a fine-tuning task's
heads), an open_clip model and pretrained tag or file, or a released FineCLIP / CLIPSelf / DetailCLIP file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ExperimentConfig, build_config, yaml_layout
from ..devices import pick_device
from ..errors import DataError
from ..models import FinegrainCLIP, create_model, model_from_checkpoint
from ..models.factory import check_checkpoint_file, read_checkpoint
from ..objectives import Method, create_method


@dataclass
class LoadedCheckpoint:
    """A model in eval mode and, for a fine-tuning checkpoint, its task (heads loaded) and run config."""

    model: FinegrainCLIP
    task: Method | None = None
    config: ExperimentConfig | None = None

    @property
    def method_name(self) -> str | None:
        return None if self.config is None else self.config.method.name


def load_model(checkpoint: str | Path | None = None, name: str | None = None, pretrained: str | None = None,
               device: str | torch.device = "cpu") -> FinegrainCLIP:
    """The model of a finegrain checkpoint, or ``name`` with ``pretrained`` (an open_clip tag, a file, a released
    checkpoint; None: random weights), on ``device``, in eval mode."""
    device = pick_device(device)
    if checkpoint:
        return model_from_checkpoint(checkpoint, device=device).eval()
    if not name:
        raise DataError("say which model: a finegrain checkpoint, or a model name (and pretrained weights)")
    return create_model(name, pretrained, device=device).eval()


def is_run_checkpoint(spec: str | Path) -> bool:
    """Whether ``spec`` is a file to read as a finegrain run's checkpoint (``*.pt`` / ``*.pth``)."""
    return Path(spec).suffix in (".pt", ".pth") and Path(spec).is_file()


def parse_model_spec(spec: str, device: str | torch.device = "cpu") -> FinegrainCLIP:
    """``CHECKPOINT.pt`` | ``NAME:PRETRAINED`` | ``NAME`` -> a model (see :func:`load_model`)."""
    if is_run_checkpoint(spec):
        return load_model(spec, device=device)
    name, _, pretrained = str(spec).partition(":")
    return load_model(None, name, pretrained or None, device)


def load_checkpoint(spec: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """What :func:`finegrain.load_predictor` runs: a finegrain checkpoint (``*.pt``; a fine-tuning run's brings its
    task with its heads), else ``NAME:PRETRAINED`` / ``NAME`` as :func:`parse_model_spec`."""
    if not is_run_checkpoint(spec):
        if str(spec).endswith((".pt", ".pth")) and not Path(spec).exists():
            raise FileNotFoundError(f"{spec}: no such checkpoint file")
        return LoadedCheckpoint(parse_model_spec(str(spec), device))
    check_checkpoint_file(spec)
    state = read_checkpoint(spec)
    if not isinstance(state, dict) or "model_name" not in state:
        raise DataError(f"{spec} is not a finegrain checkpoint (no 'model_name'): for an open_clip or released "
                        f"checkpoint name its model, e.g. ViT-B-16:{spec}")
    config = build_config(yaml_layout(state["config"])) if state.get("config") else None
    model = model_from_checkpoint(spec, pick_device(device), state).eval()
    if config is None or not config.method.name.startswith("finetune-"):
        return LoadedCheckpoint(model, None, config)
    task = create_method(config.method.name, config.method.options, model)
    task.load_state_dict(state["method"])
    return LoadedCheckpoint(model, task.to(model.logit_scale.device).eval(), config)
