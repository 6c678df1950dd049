"""Spec strings <-> method dataclasses.

Grammar::

    spec   := item ('+' item)*
    item   := name [':' param (',' param)*]
    param  := key '=' value          value: int | float | true/false | none | word

Items compose left to right as *position* methods (context extension), at most one *select*
method (which keys each query sees), then *press* methods (KV-cache compression), e.g.
``selfextend:group=4+quest:density=0.1+snapkv:density=0.25``. A *procedure* (``homer``) replaces the prefill
itself; it composes only with a position method (``homer+yarn:factor=2``). ``str(spec)`` gives the canonical
form, and ``parse_spec(str(spec)) == spec``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .configurable import parse_item
from .errors import SpecError
from .methods.base import Method, SelectionMethod
from .methods.registry import method_class

KIND_ORDER = ("position", "procedure", "select", "press")


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

    @property
    def runs(self) -> int:
        """Copies of the prompt ``longreach.generate`` runs as a batch (``buckets-runs`` with several bases); 1:
        ordinary forwards."""
        return max((m.runs for m in self.methods), default=1)

    def reach(self, trained: int) -> int | None:
        """The longest prompt this spec keeps inside a model's ``trained`` positions (None: any length): the
        furthest its methods reach, ``trained`` when none moves positions."""
        reaches = [m.reach(trained) for m in self.methods]
        return None if None in reaches else max(reaches, default=trained)

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
    return parse_item(item, method_class)  # type: ignore[return-value]


def _compose(methods: list[Method]) -> Spec:
    by_kind: dict[str, list[Method]] = {k: [] for k in KIND_ORDER}
    for m in methods:
        if m.kind not in by_kind:
            raise SpecError(f"{m.name}: unknown method kind '{m.kind}'")
        by_kind[m.kind].append(m)
    for kind in ("select", "position", "procedure"):
        if len(by_kind[kind]) > 1:
            names = " and ".join(m.name for m in by_kind[kind])
            what = {"select": "choose which keys each query sees", "position": "re-map positions",
                    "procedure": "replace the prefill"}[kind]
            raise SpecError(f"cannot combine {names}: both {what}; keep one {kind} method per spec")
    others = [m.name for kind in ("select", "press") for m in by_kind[kind]]
    if by_kind["procedure"] and others:
        raise SpecError(f"cannot combine {by_kind['procedure'][0].name} with {', '.join(others)}: it builds the KV "
                        "cache itself with the model's own attention; combine it only with a position method "
                        "(e.g. homer+yarn:factor=2)")
    remaps = [m.name for m in by_kind["position"] if m.remaps_positions]
    if by_kind["procedure"] and remaps:
        name = by_kind["procedure"][0].name
        raise SpecError(f"cannot combine {remaps[0]} with {name}: {remaps[0]} re-maps positions by cache index, and "
                        f"{name} assigns its own; use a rope scaling method instead (e.g. {name}+yarn:factor=2)")
    parallel = [m.name for m in by_kind["position"] if m.runs > 1]
    if by_kind["procedure"] and parallel:
        raise SpecError(f"cannot combine {parallel[0]} with {by_kind['procedure'][0].name}: {parallel[0]} runs the "
                        "whole model once per RoPE base, and the procedure builds one cache with its own prefill; "
                        "use one of them")
    ordered = tuple(m for kind in KIND_ORDER for m in by_kind[kind])
    return Spec(ordered)
