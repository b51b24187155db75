"""Method registry: names in configs map to :class:`~finegrain.objectives.base.Method` classes; a name
joining methods and terms with ``+`` (``fineclip+detailclip``, ``fineclip+ibot_cls``) is their composition, and a
term's name a method of that term alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..config import ExperimentConfig, from_dict, to_dict
from ..errors import ConfigError
from ..plugins import method_entry_points, registrar
from .base import Method
from .term import get_term_class, list_terms, load_declared

_METHODS: dict[str, type[Method]] = {}
_COMPOSED: dict[str, type[Method]] = {}  # built on first use by name, not listed


register_method = registrar(_METHODS, "method", "Class decorator: make a method available to configs as "
                                                   "``method.name: <name>``.")


def list_methods() -> list[str]:
    """Registered methods and those installed packages declare as ``finegrain.methods`` entry points."""
    return sorted(set(_METHODS) | set(method_entry_points()))


def get_method_class(name: str) -> type[Method]:
    """The method class named ``name``; an entry point's class is imported (and registered) on first use;
    a ``+``-joined name (or a term's) builds the composition of its parts (methods or terms) once."""
    if "+" in name or (name not in _METHODS and name not in method_entry_points() and get_term_class(name)):
        if name not in _COMPOSED:
            from .term_method import composed_method

            _COMPOSED[name] = composed_method(name, _part_class)
            _COMPOSED[name].method_name = name
        return _COMPOSED[name]
    if name not in _METHODS:
        declared = method_entry_points()
        if name not in declared:
            raise ConfigError(f"method.name: unknown method {name!r}; available: {list_methods()}")
        cls = load_declared(declared[name], Method, repr(name))
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


def _part_class(name: str) -> type:
    """A part of a composed method: a method or a term."""
    if name in _METHODS or name in method_entry_points():
        return get_method_class(name)
    term = get_term_class(name)
    if term is None:
        raise ConfigError(f"method.name: unknown method or term {name!r}; methods: {list_methods()}, "
                          f"terms: {list_terms()}")
    return term


def create_method(name: str, options, model: nn.Module) -> Method:
    """Instantiate method ``name`` for ``model`` with its options (see :func:`method_options`)."""
    return get_method_class(name)(method_options(name, options), model)
