"""Method registry: names in configs map to :class:`~finegrain.objectives.base.Method` classes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..config import ExperimentConfig, from_dict, to_dict
from ..errors import ConfigError
from ..plugins import method_entry_points
from .base import Method

_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: make a method available to configs as ``method.name: <name>``."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = cls
        cls.method_name = name
        return cls

    return wrap


def list_methods() -> list[str]:
    """Registered methods and those installed packages declare as ``finegrain.methods`` entry points."""
    return sorted(set(_METHODS) | set(method_entry_points()))


def get_method_class(name: str) -> type[Method]:
    """The method class named ``name``; an entry point's class is imported (and registered) on first use."""
    if name not in _METHODS:
        declared = method_entry_points()
        if name not in declared:
            raise ConfigError(f"method.name: unknown method {name!r}; available: {list_methods()}")
        cls = declared[name].load()
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ConfigError(f"method.name: the entry point {declared[name].value!r} of {name!r} is not a "
                              "finegrain Method subclass")
        if name not in _METHODS:  # its module did not register it with @register_method
            register_method(name)(cls)
    return _METHODS[name]


def method_options(name: str, options: Mapping[str, Any] | Any = None) -> Any:
    """The options dataclass of method ``name`` from a config's ``method`` options (a mapping: each key checked,
    errors naming ``method.<key>``); an instance of that dataclass as it is; None: the defaults."""
    cls = get_method_class(name).Options
    return options if isinstance(options, cls) else from_dict(cls, dict(options or {}), "method")


def complete_method_options(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with its method options checked and completed with the method's defaults (as a run's
    ``config.yaml`` and checkpoints hold them); raises :class:`ConfigError` naming a bad key."""
    options = to_dict(method_options(cfg.method.name, cfg.method.options))
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, options=options))


def create_method(name: str, options, model: nn.Module) -> Method:
    """Instantiate method ``name`` for ``model`` with its options (see :func:`method_options`)."""
    return get_method_class(name)(method_options(name, options), model)
