"""Attention Buckets: attend the context under several RoPE bases at once, against lost-in-the-middle.

RoPE's attention to a key waves with its distance (the "attention waveform"); information sitting in a
trough is overlooked. Another base puts its troughs elsewhere, so averaging attention computed under
several bases fills one base's trough with another's peak (Chen et al., arXiv:2312.04455).

The paper runs one full forward per base (a batch of parallel runs) and combines the runs' next-token
logits (the authors' code weights each run by a softmax of its largest logit): that is ``buckets-runs``
(``bucketruns``). Here the bases meet in
*every attention call* instead, training-free and in one forward: the queries and keys transformers rotated
at the model's base are re-rotated to each base (RoPE angles are ``position x frequency``, so moving from
frequency ``f`` to ``f'`` is one more rotation by ``position x (f' - f)``), each base's attention is computed
with the same Selection, and the outputs are **averaged with equal weights**. Equal weights are the
attention-level counterpart of averaging parallel runs: every base contributes a whole attention
distribution, so a key in one base's trough keeps ``1/n`` of the weight another base's peak gives it; the
rule needs only the kernels' outputs (no log-sum-exp), so it runs on every kernel and under every selector.
The alternative (weights ``softmax_b(lse_b)``, one softmax over all (base, key) pairs, closer to the
authors' confidence weighting) would need each kernel to return its log-sum-exp.

Cost per extra base, per full-attention layer and forward: one more attention over the same selected keys,
and a re-rotation of every query and cached key (the cache holds keys rotated at the model's base, so each
decode step re-rotates the whole cache per base: O(T x D) work and a K-sized temporary, like any re-mapping
method). The alternative, a key cache per base, would trade that work for ``n - 1`` more K caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..configurable import param
from ..errors import SpecError, UnsupportedModelError
from ..methods.registry import register
from .base import PositionView, RemapPositions
from .rotary import RopeInfo, rerotate, rope_info

PAPER = ("Fortify the Shortest Stave in Attention: Enhancing Context Awareness of Large Language Models for Effective "
         "Tool Use (arXiv:2312.04455)")
DEFAULT_BASES = "1x|1.75x|1.8x|1.9x"  # the paper's 10000|17500|18000|19000 on a base-10000 model


def parse_bases(text: str, owner: str = "buckets") -> tuple[tuple[float, bool], ...]:
    """``'10000|1.75x'`` -> ((10000.0, False), (1.75, True)): a base, or (with ``x``) a multiple of the model's."""
    out = []
    for raw in (part.strip().lower() for part in text.split("|")):
        relative = raw.endswith("x")
        try:
            value = float(raw[:-1] if relative else raw)
        except ValueError:
            raise SpecError(f"{owner}: bases are numbers joined by '|', each a base (17500) or a multiple of the "
                            f"model's base (1.75x); got '{raw}' in '{text}'") from None
        if not value > 0 or value == float("inf"):
            raise SpecError(f"{owner}: every base must be a positive number, got '{raw}'")
        if (value, relative) in out:
            raise SpecError(f"{owner}: base '{raw}' is listed twice")
        out.append((value, relative))
    return tuple(out)


def base_frequencies(rope: RopeInfo, base: float) -> Tensor:
    """(D_rot / 2,) float64: the model's frequencies with its base ``rope.theta`` changed to ``base``.

    ``inv_freq[i] = theta ** (-i / half)``, so a new base multiplies frequency ``i`` by ``(theta / base) **
    (i / half)``; on a model that already scales its frequencies (llama3, yarn) the scaling stays applied.
    """
    half = rope.inv_freq.shape[0]
    exponent = torch.arange(half, dtype=torch.float64) / half
    return rope.inv_freq.double() * (rope.theta / base) ** exponent


@register
@dataclass(frozen=True)
class Buckets(RemapPositions):
    """Attention under each RoPE base of ``bases``, outputs averaged (see the module docstring). A base equal
    to the model's own keeps q/k as transformers rotated them, so ``bases=1x`` is exactly dense. The first
    base's q/k are the ones a select method stacked after it scores."""

    name: ClassVar[str] = "buckets"
    summary: ClassVar[str] = "Attention Buckets: attention under several RoPE bases per layer, outputs averaged"
    paper: ClassVar[str] = PAPER

    bases: str = param(DEFAULT_BASES, "RoPE bases joined by '|': absolute (17500) or multiples of the "
                                             "model's own base (1.75x)")

    def __post_init__(self) -> None:
        parse_bases(self.bases)

    def check_model(self, model: torch.nn.Module) -> None:
        try:
            rope_info(model)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"buckets re-rotates queries and keys to other RoPE bases: {err}") from None

    def base_values(self, theta: float) -> list[float]:
        return [value * theta if relative else value for value, relative in parse_bases(self.bases)]

    def view(self, q: Tensor, k: Tensor, rope: RopeInfo, state: dict) -> PositionView:
        t_q, t_k = q.shape[2], k.shape[2]
        pq = torch.arange(t_k - t_q, t_k, device=q.device)
        pk = torch.arange(t_k, device=q.device)
        views = []
        for base in self.base_values(rope.theta):
            if base == rope.theta:  # the model's own rotation, untouched: exactly dense
                views.append(PositionView(q, k))
                continue
            step = base_frequencies(rope, base) - rope.inv_freq.double()  # angle change per position
            views.append(PositionView(rerotate(q, pq, step), rerotate(k, pk, step)))
        first, *rest = views
        return PositionView(first.q, first.k, branches=tuple(rest))
