"""Method registry: names in configs map to :class:`~finegrain.objectives.base.Method` classes."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
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
    return sorted(_METHODS)


def get_method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; available: {list_methods()}")
    return _METHODS[name]


def create_method(name: str, options, model: nn.Module) -> Method:
    """Instantiate a registered method with its (validated) options for ``model``."""
    cls = get_method_class(name)
    return cls(options if options is not None else cls.Options(), model)
