"""Attention Buckets as the paper runs it: one run of the whole model per RoPE base, their next-token logits combined.

Chen et al. (arXiv:2312.04455) process the input in parallel runs, each with the RoPE base changed in every layer,
so one run's attention trough is another's peak, and combine the runs' outputs at each generated token. Here the
runs are one batch: row ``i`` of the batch is the prompt, rotated at base ``i`` by the model's own rotary code (its
rotary modules are swapped for ones that compute row ``i``'s cos/sin at base ``i``, so every cached key stays
rotated at its run's base and decoding re-rotates nothing). At each step the runs' last logits are combined as
*we read the authors' code*: run ``i`` weighted by ``softmax_i(max_v logit_i,v)`` (a more confident run counts
more), and the weighted logits summed; every run is then fed the combined token.

Cost: ``n`` bases are ``n`` runs, so prefill and decode compute and the KV cache are ``n`` times one run's (the
rows share nothing but the weights). The one-forward variant, ``buckets``, averages the bases' attention outputs in
every layer instead and keeps one cache. Generation must go through ``longreach.generate`` (the CLI's generate and
eval do), which batches the runs and combines their logits; a plain forward of a batch that is not those runs is
refused with that reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..configurable import param
from ..errors import InputError, SpecError, UnsupportedModelError
from ..methods.registry import register
from .base import PositionMethod
from .buckets import DEFAULT_BASES, PAPER, parse_bases
from .rotary import global_rope_parameters, rotary_modules, text_config

_RUNS: ContextVar[int] = ContextVar("longreach_parallel_runs", default=1)


@contextmanager
def running(n: int):
    """Mark the forwards inside as ``n`` parallel runs of one prompt (``longreach.generate`` enters it)."""
    token = _RUNS.set(n)
    try:
        yield
    finally:
        _RUNS.reset(token)


def combine_runs(logits: Tensor) -> Tensor:
    """(n, V) next-token logits of the runs -> (V,): each run weighted by the softmax, over runs, of its largest
    logit, then summed (in float32)."""
    logits = logits.float()
    weights = torch.softmax(logits.max(dim=-1).values, dim=0)
    return (weights[:, None] * logits).sum(dim=0)


class RowBases(nn.Module):
    """A rotary module whose batch row ``i`` gets the cos/sin of ``rotaries[i]`` (the model's own class, built at
    base ``i``); a single run passes straight through."""

    def __init__(self, rotaries: list[nn.Module]) -> None:
        super().__init__()
        self.rotaries = nn.ModuleList(rotaries)

    def forward(self, x: Tensor, position_ids: Tensor, *args: object, **kwargs: object
                ) -> Tensor | tuple[Tensor, ...]:
        n = len(self.rotaries)
        if n == 1:
            return self.rotaries[0](x, position_ids, *args, **kwargs)
        if x.shape[0] != n or _RUNS.get() != n:
            raise InputError(
                f"buckets-runs runs the prompt once per RoPE base ({n} bases: a batch of {n} copies) and combines the "
                "runs' next-token logits at every step: generate with longreach.generate (or the CLI's generate and "
                f"eval), which does both; this forward had a batch of {x.shape[0]} outside such a generation")
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, n):
            raise InputError(f"buckets-runs gives each batch row its own RoPE base and needs position ids shaped "
                             f"(1 or {n}, tokens), got {tuple(position_ids.shape)} (multi-axis RoPE is not supported)")
        if position_ids.shape[0] == 1:
            position_ids = position_ids.expand(n, -1)
        rows = [rot(x[i:i + 1], position_ids[i:i + 1], *args, **kwargs) for i, rot in enumerate(self.rotaries)]
        if isinstance(rows[0], Tensor):  # one tensor (Llama 4's complex freqs_cis), not (cos, sin)
            return torch.cat(rows, dim=0)
        return tuple(torch.cat(parts, dim=0) for parts in zip(*rows, strict=True))


def config_at_base(config: object, base: float) -> object:
    """A copy of ``config`` whose global layers' RoPE base is ``base`` (Gemma 3's sliding layers keep theirs)."""
    new = copy.copy(config)
    new.rope_parameters = copy.deepcopy(config.rope_parameters)  # type: ignore[attr-defined]  # check_model: a dict
    global_rope_parameters(new)["rope_theta"] = base
    return new


@register
@dataclass(frozen=True)
class BucketRuns(PositionMethod):
    """One run of the model per RoPE base of ``bases``, as a batch; their next-token logits combined by confidence
    (see the module docstring). ``bases=1x`` is exactly the model."""

    name: ClassVar[str] = "buckets-runs"
    summary: ClassVar[str] = "Attention Buckets as parallel runs: the model once per RoPE base, logits combined"
    paper: ClassVar[str] = PAPER

    bases: str = param(DEFAULT_BASES, "RoPE bases joined by '|', one run each: absolute (17500) or multiples "
                                             "of the model's own base (1.75x)")

    def __post_init__(self) -> None:
        parse_bases(self.bases, self.name)

    @property
    def runs(self) -> int:
        """How many copies of the prompt ``longreach.generate`` runs in a batch (one per base)."""
        return len(parse_bases(self.bases, self.name))

    def combine(self, logits: Tensor) -> Tensor:
        """(n, V) -> (V,): the runs' next-token logits combined (``combine_runs``)."""
        return combine_runs(logits)

    def check_model(self, model: nn.Module) -> None:
        mods = rotary_modules(model)
        if not mods:
            raise UnsupportedModelError(f"buckets-runs changes the RoPE base of each run, and {type(model).__name__} "
                                        "has no rotary embedding module: it needs a RoPE model (Llama, Qwen2, "
                                        "Mistral, Gemma 3)")
        if not isinstance(global_rope_parameters(text_config(model)).get("rope_theta"), int | float):
            raise UnsupportedModelError(f"buckets-runs: {type(model).__name__}'s config has no rope_theta (in "
                                        "rope_parameters, or its full_attention entry) to set each run's base in")
        bases = self.base_values(model)
        if len(set(bases)) < len(bases):
            raise SpecError(f"buckets-runs: bases '{self.bases}' name the same base twice on this model (its own "
                            f"base is {own_theta(model):g}): the runs would be identical; list each base once")

    def base_values(self, model: nn.Module) -> list[float]:
        own = own_theta(model)
        return [value * own if relative else value for value, relative in parse_bases(self.bases, self.name)]

    def install(self, model: nn.Module) -> Callable[[], None]:
        config, own, bases = text_config(model), own_theta(model), self.base_values(model)
        swapped = []
        for parent, attr, old in rotary_modules(model):
            buffer = next(iter(old.buffers()))  # new modules match its device and dtype (a bf16 model's inv_freq)
            runs = [old if base == own else type(old)(config_at_base(config, base)).to(buffer.device, buffer.dtype)
                    for base in bases]
            setattr(parent, attr, RowBases(runs))
            swapped.append((parent, attr, old))

        def undo() -> None:
            for parent, attr, old in swapped:
                setattr(parent, attr, old)
        return undo


def own_theta(model: nn.Module) -> float:
    """The model's (global layers') RoPE base, from its config (``check_model`` made sure it is there)."""
    return float(global_rope_parameters(text_config(model))["rope_theta"])
