"""Names -> method classes (never instances: methods are immutable values built per spec)."""

from __future__ import annotations

from ..errors import SpecError, did_you_mean
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute 'name'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"method name '{cls.name}' is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[Method]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown method '{name}': {did_you_mean(name, list(_REGISTRY))}") from None


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from ..cache import presses  # noqa: F401
    from ..heads import policies  # noqa: F401
    from ..position import remap, rescale  # noqa: F401
    from . import (  # noqa: F401  (registers on import)
        anchor,
        blocktopk,
        dense,
        flexprefill,
        hip,
        hyper,
        loki,
        longheads,
        recycled,
        squeezed,
        streaming,
        twilight,
        vslash,
    )
