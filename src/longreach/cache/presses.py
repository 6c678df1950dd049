"""The presses: each is its scoring rule (and budget rule) on top of ``Press``.

Papers: SnapKV (arXiv:2404.14469), PyramidKV (arXiv:2406.02069), H2O (arXiv:2306.14048),
TOVA (arXiv:2401.06104), StreamingLLM (arXiv:2309.17453), FINCH (TACL 2024, doi:10.1162/tacl_a_00716).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..configurable import param
from ..errors import SpecError
from ..methods.base import check_int
from ..methods.registry import register
from .press import Observation, Press, top_keep, window_probs


@dataclass(frozen=True)
class WindowVotePress(Press):
    """Keys the last ``window`` queries (the question, for a prompt) attend to, pooled so neighbours of a
    chosen key come with it; the window itself is kept."""

    pool: int = param(7, "width of the average pooling over neighbouring keys' votes (1: none)")
    vote: str = param("sum", "how the window's queries vote: sum (SnapKV: a key's attention summed over them) or "
                             "max (its largest share from any one query, so the prompt's last query, which writes "
                             "the first answer token, weighs as much as all the others)")
    default_window: ClassVar[int] = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "pool", self.pool, minimum=1)
        if self.vote not in ("sum", "max"):
            raise SpecError(f"{self.name}: vote must be sum or max, got {self.vote!r}")
        if self.recent < 1:
            raise SpecError(f"{self.name}: window must be >= 1: the observation window's queries do the voting")

    @property
    def observe(self) -> int:  # type: ignore[override]
        return self.recent

    def scores(self, obs: Observation) -> Tensor:
        return window_votes(obs, self.pool, self.vote)


def window_votes(obs: Observation, pool: int, vote: str = "sum") -> Tensor:
    """(B, Hkv, n): attention the observed queries pay each key (summed over them, or the largest share any one
    pays with ``vote="max"``; averaged over the group), average-pooled over ``pool`` neighbouring keys so a
    chosen token keeps its neighbours (SnapKV).

    Two deliberate departures from SnapKV's reference code, both measured with (docs/kv-presses.md): the pooling
    runs over every key, so the last ``pool // 2`` prefix keys also average in the observation window's own
    votes (the reference pools ``votes[..., :-window]``), and edge padding is not counted in the average
    (the reference's default counts it; it matters only when ``sinks < pool // 2``)."""
    probs = window_probs(obs)
    votes = (probs.amax(dim=3) if vote == "max" else probs.sum(dim=3)).mean(dim=2)
    if pool > 1:
        b, h, n = votes.shape
        votes = F.avg_pool1d(votes.view(b * h, 1, n), pool, stride=1, padding=pool // 2,
                             count_include_pad=False)[..., :n].view(b, h, n)
    return votes


@register
@dataclass(frozen=True)
class SnapKV(WindowVotePress):
    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "keep keys the prompt's last queries vote for, pooled (SnapKV)"
    paper: ClassVar[str] = "SnapKV: LLM Knows What You are Looking for Before Generation (arXiv:2404.14469)"


@register
@dataclass(frozen=True)
class PyramidKV(WindowVotePress):
    name: ClassVar[str] = "pyramidkv"
    summary: ClassVar[str] = "SnapKV votes, budgets shrinking from the first layer to the last (PyramidKV)"
    paper: ClassVar[str] = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling " \
                           "(arXiv:2406.02069)"

    beta: float = param(20.0, "first layer's budget over the last's, roughly (pyramid steepness)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.beta, float | int) and self.beta >= 1):
            raise SpecError(f"pyramidkv: beta must be >= 1, got {self.beta!r}")

    def capacity(self, layer_idx: int, n_layers: int, seen: int) -> int:
        """Linear from ~2x the mean to ~mean/beta, so the layers' average is the flat budget."""
        flat = super().capacity(layer_idx, n_layers, seen)
        free = flat - self.sinks - self.recent
        if n_layers < 2 or free <= 0:
            return flat
        low = free / self.beta
        high = 2 * free - low
        share = high - layer_idx * (high - low) / (n_layers - 1)
        return self.sinks + self.recent + max(0, round(share))


@register
@dataclass(frozen=True)
class H2O(Press):
    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "heavy hitters (attention summed over every query) + recent tokens, evicting each step"
    paper: ClassVar[str] = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference (arXiv:2306.14048)"

    default_every: ClassVar[int] = 1
    wants_history: ClassVar[bool] = True

    def keep_indices(self, obs: Observation, capacity: int) -> Tensor | None:
        if capacity >= obs.keys.shape[2]:
            return None
        assert obs.history is not None
        recent = self.window if self.window is not None else (capacity - self.sinks) // 2
        return top_keep(obs.per_cache_head(obs.history), capacity, self.sinks, recent)


@register
@dataclass(frozen=True)
class TOVA(Press):
    name: ClassVar[str] = "tova"
    summary: ClassVar[str] = "evict the keys the newest query attends least (heads averaged), every step"
    paper: ClassVar[str] = "Transformers are Multi-State RNNs (TOVA, arXiv:2401.06104)"

    default_every: ClassVar[int] = 1

    def scores(self, obs: Observation) -> Tensor:
        probs = window_probs(obs)[:, :, :, -1]  # (B, Hkv, G, n): the newest query
        return probs.mean(dim=(1, 2), keepdim=True)[:, :, 0].expand(-1, obs.keys.shape[1], -1)


@register
@dataclass(frozen=True)
class StreamingKV(Press):
    name: ClassVar[str] = "streamingkv"
    summary: ClassVar[str] = "dense prefill, then keep only sinks + the most recent tokens (StreamingLLM as a press)"
    paper: ClassVar[str] = "Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"

    default_every: ClassVar[int] = 1

    def scores(self, obs: Observation) -> Tensor:
        b, h, n, _ = obs.keys.shape
        return torch.arange(n, device=obs.keys.device, dtype=torch.float32).expand(b, h, n)


@register
@dataclass(frozen=True)
class Finch(WindowVotePress):
    name: ClassVar[str] = "finch"
    summary: ClassVar[str] = "the prompt's question votes; the budget is spread over chunks of the context (FINCH)"
    paper: ClassVar[str] = "FINCH: Prompt-guided Key-Value Cache Compression (TACL 2024)"

    chunk: int = param(1024, "context chunk size: each chunk keeps its share of the budget")
    pool: int = param(1, "width of the average pooling over neighbouring keys' votes (1: none)")
    default_window: ClassVar[int] = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "chunk", self.chunk, minimum=1)

    def keep_indices(self, obs: Observation, capacity: int) -> Tensor | None:
        n = obs.keys.shape[2]
        if capacity >= n:
            return None
        scores = obs.per_cache_head(self.scores(obs).float())
        lo, hi = min(self.sinks, n), max(n - self.recent, self.sinks)
        free = capacity - lo - (n - hi)
        edges = [*range(lo, hi, self.chunk), hi]
        picks = [torch.arange(lo, device=scores.device).expand(*scores.shape[:2], lo)]
        for a, b in itertools.pairwise(edges):
            # cumulative rounding: the chunks' quotas sum exactly to the free budget
            quota = math.floor(free * (b - lo) / (hi - lo)) - math.floor(free * (a - lo) / (hi - lo))
            if quota > 0:
                picks.append(a + scores[..., a:b].topk(quota, dim=-1).indices.sort(dim=-1).values)
        picks.append(torch.arange(hi, n, device=scores.device).expand(*scores.shape[:2], n - hi))
        return torch.cat(picks, dim=-1)
