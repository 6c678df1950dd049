"""Names -> method classes (never instances: methods are immutable values built per spec).

A family registers its classes when imported; ``longreach.builtin`` imports every family that ships with
longreach (the package imports it), so the registry never imports the families back."""

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
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown method '{name}': {did_you_mean(name, list(_REGISTRY))}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)
