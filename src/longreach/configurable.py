"""Small frozen dataclasses named by strings like ``quest:density=0.1,block=32``.

Methods and evaluation tasks share this: typed parameters with defaults and help, a canonical
string that omits defaults, and a parser whose every error says how to fix the string.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .errors import SpecError


@dataclass(frozen=True)
class Configurable:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    @classmethod
    def params(cls) -> list[tuple[str, object, object, str]]:
        """(name, type, default, help) for every parameter, in declaration order."""
        hints = typing.get_type_hints(cls)
        return [(f.name, hints[f.name], f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]

    def spec(self) -> str:
        """Canonical string: the name plus every parameter that differs from its default."""
        parts = [f"{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self)
                 if getattr(self, f.name) != f.default]
        return self.name + (":" + ",".join(parts) if parts else "")

    def __str__(self) -> str:
        return self.spec()


def param(default: object, help: str) -> object:
    return dataclasses.field(default=default, metadata={"help": help})


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_item(item: str, lookup: Callable[[str], type[Configurable]]) -> Configurable:
    """``name[:key=value,...]`` -> an instance of ``lookup(name)``, values coerced to the field types."""
    name, _, rest = item.partition(":")
    name = name.strip().lower()
    cls = lookup(name)
    kwargs: dict[str, object] = {}
    if rest.strip():
        fields = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for part in rest.split(","):
            key, eq, raw = part.partition("=")
            key = key.strip()
            if not eq or not key or not raw.strip():
                raise SpecError(f"{name}: parameter '{part.strip()}' must look like key=value (e.g. budget=2048)")
            if key not in fields:
                raise SpecError(f"{name}: unknown parameter '{key}'; it takes: {', '.join(fields) or 'none'}")
            if key in kwargs:
                raise SpecError(f"{name}: parameter '{key}' given twice")
            kwargs[key] = _coerce(name, key, raw.strip(), hints[key])
    elif item.endswith(":"):
        raise SpecError(f"{name}: nothing after ':'; drop it or add key=value parameters")
    return cls(**kwargs)


def split_items(text: str) -> list[str]:
    """Split a list of specs on ';' or ',' — a ',' followed by ``key=value`` continues the previous spec.

    So ``dense,quest:density=0.1,block=32,moba`` is three specs.
    """
    out: list[str] = []
    for group in text.split(";"):
        items: list[str] = []
        for part in group.split(","):
            part = part.strip()
            head = part.split("+")[0]
            if not part:
                continue
            if items and "=" in head and ":" not in head:
                items[-1] += "," + part
            else:
                items.append(part)
        out.extend(items)
    return out


def _coerce(owner: str, key: str, raw: str, typ: object) -> object:
    options = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) else (typ,)
    if raw.lower() == "none":
        if type(None) in options:
            return None
        raise SpecError(f"{owner}: {key} cannot be none")
    for opt in options:
        if opt is type(None):
            continue
        try:
            return _convert(raw, opt)
        except ValueError:
            continue
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise SpecError(f"{owner}: {key}={raw} is not a valid {names}")


def _convert(raw: str, typ: object) -> object:
    if typ is bool:
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(raw)
    if typ is int:
        text = raw.lower().replace("_", "")
        mult = 1
        if text.endswith("k"):
            text, mult = text[:-1], 1024
        return int(text) * mult
    if typ is float:
        return float(raw)
    if typ is str:
        return raw
    raise ValueError(f"unsupported parameter type {typ}")
