"""Spec strings <-> method dataclasses.

Grammar::

    spec   := item ('+' item)*
    item   := name [':' param (',' param)*]
    param  := key '=' value          value: int | float | true/false | none | word

Items compose left to right as *position* methods (context extension), at most one *select*
method (which keys each query sees), then *press* methods (KV-cache compression), e.g.
``selfextend:group=4+quest:density=0.1+snapkv:density=0.25``. ``str(spec)`` gives the canonical
form, and ``parse_spec(str(spec)) == spec``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from .errors import SpecError
from .methods.base import Method, SelectionMethod
from .methods.registry import method_class

KIND_ORDER = ("position", "select", "press")


@dataclass(frozen=True)
class Spec:
    methods: tuple[Method, ...]

    @property
    def selector(self) -> SelectionMethod:
        """The method choosing keys; ``dense`` when the spec has none."""
        for m in self.methods:
            if isinstance(m, SelectionMethod):
                return m
        return method_class("dense")()  # type: ignore[return-value]

    def of_kind(self, kind: str) -> tuple[Method, ...]:
        return tuple(m for m in self.methods if m.kind == kind)

    def __str__(self) -> str:
        return "+".join(m.spec() for m in self.methods)


def parse_spec(spec: str | Spec | Method) -> Spec:
    """Parse and validate a spec before any model work; every problem is a SpecError saying how to fix it."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, Method):
        return _compose([spec])
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty method spec: give e.g. 'dense', 'quest:density=0.1' or 'streaming:window=1024'")
    items = [s.strip() for s in spec.split("+")]
    if any(not s for s in items):
        raise SpecError(f"empty item in spec '{spec}': items are joined by a single '+'")
    return _compose([_parse_item(s) for s in items])


def _parse_item(item: str) -> Method:
    name, _, rest = item.partition(":")
    name = name.strip().lower()
    cls = method_class(name)
    kwargs: dict[str, object] = {}
    if rest.strip():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for part in rest.split(","):
            key, eq, raw = part.partition("=")
            key = key.strip()
            if not eq or not key or not raw.strip():
                raise SpecError(f"{name}: parameter '{part.strip()}' must look like key=value (e.g. budget=2048)")
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise SpecError(f"{name}: unknown parameter '{key}'; it takes: {known}")
            if key in kwargs:
                raise SpecError(f"{name}: parameter '{key}' given twice")
            kwargs[key] = _coerce(name, key, raw.strip(), hints[key])
    elif item.endswith(":"):
        raise SpecError(f"{name}: nothing after ':'; drop it or add key=value parameters")
    return cls(**kwargs)


def _coerce(method: str, key: str, raw: str, typ: object) -> object:
    options = typing.get_args(typ) if isinstance(typ, types.UnionType) or typing.get_origin(typ) else (typ,)
    if raw.lower() == "none":
        if type(None) in options:
            return None
        raise SpecError(f"{method}: {key} cannot be none")
    errors = []
    for opt in options:
        if opt is type(None):
            continue
        try:
            return _convert(raw, opt)
        except ValueError as err:
            errors.append(str(err))
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise SpecError(f"{method}: {key}={raw} is not a valid {names}")


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


def _compose(methods: list[Method]) -> Spec:
    by_kind: dict[str, list[Method]] = {k: [] for k in KIND_ORDER}
    for m in methods:
        if m.kind not in by_kind:
            raise SpecError(f"{m.name}: unknown method kind '{m.kind}'")
        by_kind[m.kind].append(m)
    for kind in ("select", "position"):
        if len(by_kind[kind]) > 1:
            names = " and ".join(m.name for m in by_kind[kind])
            what = "choose which keys each query sees" if kind == "select" else "re-map positions"
            raise SpecError(f"cannot combine {names}: both {what}; keep one {kind} method per spec")
    ordered = tuple(m for kind in KIND_ORDER for m in by_kind[kind])
    return Spec(ordered)
