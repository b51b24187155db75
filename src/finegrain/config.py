"""Experiment configs: typed dataclasses loaded from YAML, with dotted command-line overrides.

``load_config("demo", ["optim.lr=1e-3", "train.steps=50"])`` reads a built-in config (or a YAML path),
applies the overrides and checks every key, type and allowed range (fields declared with :func:`bounded`),
naming the offending key in errors. A key given twice in one YAML mapping is an error. Method options
(``method.*`` besides ``name``) stay a mapping here: the method registry checks and completes them
(:func:`finegrain.objectives.complete_method_options`, called by the trainer, ``finegrain config`` and wherever
a method is built), so this module imports nothing of the layers above it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, non_utf8_text
from .param_rules import ParamRule

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Range:
    """The values a numeric config field allows (None: no bound); a field's value None is always allowed."""

    at_least: float | None = None
    above: float | None = None
    below: float | None = None
    at_most: float | None = None

    def check(self, value: Any, key: str) -> None:
        """Raise :class:`ConfigError` naming ``key`` and the range when ``value`` (or an item of it) is outside."""
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None:
                continue
            if not ((self.at_least is None or item >= self.at_least) and (self.above is None or item > self.above)
                    and (self.below is None or item < self.below) and (self.at_most is None or item <= self.at_most)):
                shown = f"{value:g}" if isinstance(value, float) else repr(value)
                raise ConfigError(f"{key} must be {self}, got {shown}")

    def __str__(self) -> str:
        bounds = [(">=", self.at_least), (">", self.above), ("<", self.below), ("<=", self.at_most)]
        return " and ".join(f"{op} {bound:g}" for op, bound in bounds if bound is not None)


def bounded(default: Any, **limits: float) -> Any:
    """A dataclass field with ``default`` whose values must lie in ``Range(**limits)`` (checked by
    :func:`from_dict`), e.g. ``batch_size: int = bounded(64, at_least=1)``."""
    return field(default=default, metadata={"range": Range(**limits)})


@dataclass
class ModelConfig:
    name: str = "finegrain-tiny"  # open_clip model name, finegrain config name, or JSON config path
    pretrained: str | None = None  # open_clip tag (downloads) or local checkpoint file
    # input normalisation (RGB in [0, 1]) instead of the model's own, e.g. ImageNet's for a release that used it
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = bounded(None, above=0)
    image_size: int | None = bounded(None, at_least=1)  # native input size override (open_clip force_image_size)
    grad_checkpointing: bool = False
    lock_image: bool = False  # freeze the vision tower but its last lock_image_unlocked_groups groups
    lock_image_unlocked_groups: int = bounded(0, at_least=0)
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False  # freeze the text tower (FineCLIP / CLIPSelf) but its last lock_text_unlocked_layers
    lock_text_unlocked_layers: int = bounded(0, at_least=0)
    lock_text_freeze_layer_norm: bool = True
    # which weights of a finegrain checkpoint `pretrained` loads: state_dict (what the run exports: e.g.
    # DetailCLIP's EMA teacher) or train_state_dict (the trained weights, e.g. DetailCLIP's student)
    checkpoint_weights: str = "state_dict"


@dataclass
class DataSourceConfig:
    path: str = ""  # .jsonl / .csv / .tsv / COCO .json / WebDataset shards (.tar, brace patterns) / "demo:train"
    root: str | None = None  # image root; default: the folder of `path`
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    samples_per_epoch: int | None = bounded(None, at_least=1)  # WebDataset: samples in one pass (for the epoch counter)
    # FineCLIP's COCO layout, with `path` = the COCO captions json: a COCO-format proposals/instances json
    # and the region-caption json ({"<file_name>_<x>_<y>_<w>_<h>.jpg": caption}); both or neither
    regions: str | None = None
    region_captions: str | None = None


@dataclass
class DataConfig:
    train: DataSourceConfig = field(default_factory=lambda: DataSourceConfig(path="demo:train"))
    val: DataSourceConfig | None = None
    batch_size: int = bounded(64, at_least=1)  # per process and per micro-step
    num_workers: int = bounded(2, at_least=0)
    max_bad_fraction: float = bounded(0.01, at_least=0, at_most=1)  # stop when more than this fraction of records fail to load
    strict: bool = False  # refuse the data at the first malformed record instead of skipping it
    pin_memory: bool | None = None  # None: on CUDA
    persistent_workers: bool = True
    prefetch_factor: int = bounded(4, at_least=1)  # batches each loader worker prepares ahead
    min_records_before_bad_check: int = bounded(200, at_least=0)


SCHEDULES = ("cosine", "poly", "step", "constant")


@dataclass
class OptimConfig:
    lr: float = bounded(5e-4, at_least=0)
    weight_decay: float = bounded(0.2, at_least=0)
    betas: tuple[float, float] = bounded((0.9, 0.98), at_least=0, below=1)
    eps: float = bounded(1e-6, above=0)
    warmup_steps: int | None = bounded(100, at_least=0)  # null with warmup_epochs: derived from it (see build_config)
    warmup_epochs: float | None = bounded(None, at_least=0)  # warmup length in (fractional) epochs instead of steps
    warmup_start_lr: float | None = bounded(None, at_least=0)  # linear warmup from this lr to lr; None: from lr / warmup_steps
    min_lr: float = bounded(0.0, at_least=0)  # cosine / poly schedule floor
    # after warmup: cosine | poly ((1 - t)^poly_power) | step (x step_gamma at each step_milestones fraction of
    # train.steps) | constant; see finegrain.train.optim.learning_rate
    schedule: str = "cosine"
    poly_power: float = bounded(1.0, above=0)
    step_milestones: list[float] = field(default_factory=list, metadata={"range": Range(above=0, below=1)})
    step_gamma: float = bounded(0.1, above=0)
    warmup_ratio: float | None = bounded(None, above=0, at_most=1)  # mmcv's linear warmup (see learning_rate)
    clip_grad_norm: float | None = bounded(None, above=0)
    # weight decay on every trainable parameter, norms, biases and scalars included (mmcv / mmengine optimizers
    # without paramwise_cfg: F-ViT, CLIM, iBOT's linear protocol); false: none on those (open_clip's rule)
    decay_all: bool = False
    # scale the scheduled lr by (global batch / lr_base_batch) (mmdet's auto_scale_lr); null: lr as given
    lr_base_batch: int | None = bounded(None, at_least=1)
    # freeze / per-module lr and weight decay by parameter-name prefix, after the method's own rules, e.g.
    # [{prefix: model.clip.visual.conv1, trainable: false}, {prefix: method.decoder, lr_scale: 2.0}]
    param_groups: list[ParamRule] = field(default_factory=list)


@dataclass
class WandbConfig:
    """Weights & Biases logging (the ``wandb`` extra): on when ``project`` is set; rank 0 logs the scalars of
    metrics.jsonl and a table of each evaluation. A resumed run continues the same W&B run (its id is kept
    in ``train.output_dir/wandb_id.txt``)."""

    project: str | None = None
    name: str | None = None  # default: the run folder's name
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None  # online | offline | disabled; None: wandb's default (WANDB_MODE)


@dataclass
class TrainConfig:
    steps: int | None = bounded(1000, at_least=1)  # optimizer steps; null with train.epochs: derived (build_config)
    epochs: float | None = bounded(None, above=0)  # train this many (fractional) passes over data.train instead of train.steps
    grad_accum: int = bounded(1, at_least=1)  # micro-batches per optimizer step
    accum_features: bool = True  # with grad_accum > 1: negatives span the accumulated batch (cached features)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 uses a grad scaler)
    eval_precision: str | None = None  # the evaluations' autocast: fp32 | bf16 | fp16; null: train.precision
    compile: bool = False  # torch.compile each transformer block (regional compilation)
    compile_backend: str = "inductor"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    output_dir: str = "runs/run"
    overwrite: bool = False  # a fresh run may replace an earlier run's checkpoints and metrics
    save_every: int = bounded(500, at_least=1)
    keep_last: int = bounded(2, at_least=1)
    eval_every: int | None = bounded(0, at_least=0)  # 0 or null: evaluate only at the end (when data.val is set)
    eval_tasks: list[str] = field(default_factory=lambda: ["retrieval"])
    best_metric: str | None = None  # e.g. "retrieval/text_retrieval_recall@1" (higher is better); keeps best.pt
    log_every: int = bounded(10, at_least=1)  # progress-bar refresh; metrics.jsonl gets every step
    # without a progress bar (--no-progress, not a terminal's job logs): a status line every this many steps
    # (a multiple of log_every); null: about 20 lines a run
    print_every: int | None = bounded(None, at_least=1)
    tensorboard: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)
    find_unused_parameters: bool | None = None  # DDP; None: the method's choice


@dataclass
class MethodConfig:
    name: str = "clip"
    options: dict[str, Any] = field(default_factory=dict)  # the method's options as given: checked by its registry


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to type ``tp`` (dataclasses, Optional/Union, list, tuple, scalars)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-3" as a string
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the list of valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; valid keys here: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
        if "range" in fields[name].metadata:
            fields[name].metadata["range"].check(kwargs[name], key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """A config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def apply_override(data: dict, override: str) -> None:
    """Apply ``a.b.c=value`` to nested ``data``; the value is parsed as YAML (``1e-3``, ``[1, 2]``, ``null``)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a built-in config (``demo`` -> ``finegrain/configs/demo.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        return path
    builtin = CONFIG_DIR / f"{name_or_path}.yaml"
    if not builtin.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config {name_or_path!r}: give a .yaml path or one of {names}")
    return builtin


# (section, step count, epoch count that replaces it)
EPOCH_COUNTS = (("train", "steps", "epochs"), ("optim", "warmup_steps", "warmup_epochs"))


def _check_epoch_counts(cfg: ExperimentConfig, data: dict) -> None:
    """Counts by epoch: ``train.epochs`` replaces ``train.steps`` and ``optim.warmup_epochs`` replaces
    ``optim.warmup_steps``. A step count not given alongside its epoch count becomes None, which the trainer
    derives once the size of an epoch is known (``finegrain.train.optim.derive_epoch_schedule``); one given
    (a run's config.yaml holds both) must agree with it there."""
    for section, steps_key, epochs_key in EPOCH_COUNTS:
        part, given = getattr(cfg, section), data.get(section) or {}
        if getattr(part, epochs_key) is not None:
            if given.get(steps_key) is None:
                setattr(part, steps_key, None)
        elif getattr(part, steps_key) is None:
            raise ConfigError(f"{section}.{steps_key} is null: set it, or {section}.{epochs_key}")


def build_config(data: dict) -> ExperimentConfig:
    """Validate nested ``data`` into an :class:`ExperimentConfig` (method options aside: see the module
    docstring)."""
    data = dict(data)
    options = data.pop("method", None) or {}
    if not isinstance(options, dict):
        raise ConfigError(f"method: expected a mapping (name and the method's options), got {options!r}")
    cfg = from_dict(ExperimentConfig, data)
    options = dict(options)
    cfg.method = MethodConfig(name=_convert(options.pop("name", "clip"), str, "method.name"), options=options)
    _check_epoch_counts(cfg, data)
    if cfg.data.val is None and (cfg.train.eval_every or cfg.train.best_metric):
        raise ConfigError("train.eval_every / train.best_metric need a held-out set: set data.val.path")
    for split in ("train", "val"):
        src = getattr(cfg.data, split)
        if src is not None and not src.path:
            given = f"data.{split}.root is set but " if src.root else ""
            raise ConfigError(f"{given}data.{split}.path is empty: set it to a records file, shards or demo:{split}")
        if src is not None and (src.regions is None) != (src.region_captions is None):
            raise ConfigError(f"data.{split}.regions and data.{split}.region_captions go together (the COCO "
                              "proposals json and the region-caption json): set both or neither")
        if src is not None and src.regions is not None and not src.path.lower().endswith(".json"):
            raise ConfigError(f"data.{split}.regions needs data.{split}.path to be the COCO captions .json, "
                              f"got {src.path!r}")
    task = (cfg.train.best_metric or "").split("/")[0]
    if cfg.train.best_metric is not None and task not in cfg.train.eval_tasks:
        raise ConfigError(f"train.best_metric={cfg.train.best_metric!r} names task {task!r}, which is not in "
                          f"train.eval_tasks={cfg.train.eval_tasks}: add it there or pick a metric of those tasks")
    if cfg.model.checkpoint_weights not in ("state_dict", "train_state_dict"):
        raise ConfigError(f"model.checkpoint_weights must be state_dict or train_state_dict, got "
                          f"{cfg.model.checkpoint_weights!r}")
    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {SCHEDULES}, got {cfg.optim.schedule!r}")
    for key in ("precision", "eval_precision"):
        value = getattr(cfg.train, key)
        if value not in ("fp32", "bf16", "fp16") and not (key == "eval_precision" and value is None):
            raise ConfigError(f"train.{key} must be fp32, bf16 or fp16, got {value!r}")
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in first_lines:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping (first on line {first_lines[key]}); "
                    "YAML would keep only the last: merge them", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    """A YAML mapping from ``path``, UTF-8 (with or without BOM), each key at most once per mapping; errors are
    one line naming file, line, column."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, problem = non_utf8_text(raw, e)
        raise ConfigError(f"{path}:{line}: {problem}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        kind = "" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error: "
        raise ConfigError(f"{where}: {kind}{e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {' '.join(str(e).split())}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, method, data, optim, train) at the top, "
                          f"got {type(data).__name__}")
    return data or {}


DATA_PLACEHOLDER = "{data}"


def fill_data_root(data: dict, data_root: str | None) -> None:
    """Replace :data:`DATA_PLACEHOLDER` in ``data.train`` / ``data.val`` paths and roots by ``data_root`` (the
    recipes name their data relative to it); a placeholder left without one is a :class:`ConfigError`."""
    for split in ("train", "val"):
        source = (data.get("data") or {}).get(split) or {}
        for key in ("path", "root", "regions", "region_captions"):
            value = source.get(key)
            if isinstance(value, str) and DATA_PLACEHOLDER in value:
                if data_root is None:
                    raise ConfigError(f"data.{split}.{key}={value!r} is relative to the data root {DATA_PLACEHOLDER}: "
                                      f"give --data DIR, or set data.{split}.{key}")
                source[key] = value.replace(DATA_PLACEHOLDER, data_root.rstrip("/") or "/")


def load_config(name_or_path: str | None = None, overrides: list[str] = (),
                data_root: str | None = None) -> ExperimentConfig:
    """Load a YAML config (or the defaults if None), apply dotted overrides, fill in the data root
    (:func:`fill_data_root`), validate."""
    data: dict = {}
    if name_or_path is not None:
        data = read_yaml(resolve_config_path(name_or_path))
    for override in overrides:
        apply_override(data, override)
    fill_data_root(data, data_root)
    return build_config(data)


def yaml_layout(data: dict) -> dict:
    """:func:`to_dict` data in the layout YAML configs use (the method's options beside its name), which
    :func:`build_config` reads: e.g. the ``config`` stored in a checkpoint."""
    data = dict(data)
    method = data.pop("method")
    return {"model": data.pop("model"), "method": {"name": method["name"], **method["options"]}, **data}


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(yaml_layout(to_dict(cfg)), sort_keys=False)
