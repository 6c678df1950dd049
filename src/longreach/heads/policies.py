"""Head-aware policies: a saved HeadProfile decides which KV heads keep every key.

- ``duo`` (DuoAttention, arXiv:2410.10819): retrieval heads attend densely; streaming heads see only
  sinks + a recent window, in prefill and decode, and their other keys are freed from the cache.
- ``lserve`` (LServe, arXiv:2502.14866): the same streaming heads; the retrieval heads select blocks with
  a budgeted selector (``base``, Quest by default) instead of attending densely.
- ``razor`` (RazorAttention, arXiv:2407.15891): a press: the prefill is dense; afterwards the
  non-retrieval heads keep sinks + window + one compensation token (the mean of the keys and values they
  dropped), and keep merging what falls out of the window into it while decoding.
- ``ablate``: dense attention with the top (or random non-retrieval) heads' outputs zeroed: what they carry.

Retrieval heads are ranked per KV head (a KV head scores as its best query head) by the profile's
retrieval score, ties broken towards less local heads; ``ratio`` is the fraction of KV heads kept whole.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace
from functools import cache, cached_property
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..cache.press import Observation, top_keep
from ..cache.presses import window_votes
from ..configurable import param
from ..errors import SpecError
from ..methods.base import BudgetedMethod, Method, SelectContext, SelectionMethod, check_fraction, check_int
from ..methods.registry import method_class, register
from ..methods.scoring import causal_probs, with_sinks
from ..selection import Selection
from ..stages import PLAIN, SoftmaxExtras
from .profile import HeadProfile
from .split import SplitPolicy


@dataclass(frozen=True)
class HeadSplit:
    """One layer's split: ``long`` KV heads keep every key; the others keep sinks + window (+ compensation)."""

    long: Tensor  # (h,) long
    short: Tensor  # (Hkv - h,) long
    sinks: int
    window: int
    compensate: bool = False
    # headkv: the short heads keep the keys the prompt's last queries vote for (re-chosen after each prompt
    # chunk, then growing while decoding) instead of sinks + window
    keeper: HeadKV | None = None


@cache
def _load(path: str, mtime: float) -> HeadProfile:
    return HeadProfile.load(path)


def load_profile(path: str) -> HeadProfile:
    p = Path(path)
    return _load(str(p.resolve()), p.stat().st_mtime if p.exists() else 0.0)


def long_heads(profile: HeadProfile, ratio: float) -> list[Tensor]:
    """Per layer, the KV heads ranked retrieval-first whose count is ``ratio`` of all KV heads (model-wide)."""
    rank = profile.kv_scores("retrieval")
    if "locality" in profile.scores:
        rank = rank - 1e-6 * profile.kv_scores("locality")  # among equal retrieval scores, the less local heads
    n_keep = round(ratio * rank.numel())
    order = rank.flatten().argsort(descending=True)[:n_keep]
    chosen = torch.zeros(rank.numel(), dtype=torch.bool)
    chosen[order] = True
    chosen = chosen.view_as(rank)
    return [torch.nonzero(row).flatten() for row in chosen]


def top_heads(profile: HeadProfile, score: str, fraction: float) -> dict[int, list[int]]:
    """Layer -> query heads: the ``fraction`` of all query heads scoring highest on ``score``."""
    n = round(fraction * profile.layers * profile.heads)
    return by_layer(profile.tensor(score).flatten().argsort(descending=True, stable=True)[:n].tolist(), profile.heads)


def by_layer(flat: list[int], heads: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i in flat:
        out.setdefault(i // heads, []).append(i % heads)
    return out


@dataclass(frozen=True)
class Profiled(Method):
    """A method driven by a saved head profile, checked against the model at ``apply`` time."""

    profile: str = param("", "head profile JSON from `longreach heads profile`")

    def __post_init__(self) -> None:
        if not self.profile:
            raise SpecError(f"{self.name}: give profile=PATH (make one with `longreach heads profile`)")
        load_profile(self.profile)  # a missing or malformed profile fails now, before any model work

    def check_model(self, model: nn.Module) -> None:
        load_profile(self.profile).check_model(model, where=f"{self.name}: profile {self.profile}")


@dataclass(frozen=True)
class HeadPolicy(Profiled):
    """How many KV heads count as retrieval heads, and what the others keep."""

    ratio: float = param(0.25, "fraction of KV heads kept whole (the top retrieval heads), in [0, 1]")
    sinks: int = param(4, "first tokens the other heads keep")
    window: int = param(256, "recent tokens the other heads keep")

    compensate: ClassVar[bool] = False
    split_prefill: ClassVar[bool] = False  # True: split from the first forward (duo, lserve); else after prefill

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.ratio, float | int) and 0 <= self.ratio <= 1):
            raise SpecError(f"{self.name}: ratio must be in [0, 1], got {self.ratio!r}")
        check_int(self, "sinks", self.sinks, minimum=0)
        check_int(self, "window", self.window, minimum=1)

    @cached_property
    def _long(self) -> list[Tensor]:
        return long_heads(load_profile(self.profile), self.ratio)

    @cached_property
    def _splits(self) -> dict[tuple[int, int], HeadSplit | None]:
        return {}

    def head_split(self, layer_idx: int, n_kv: int) -> HeadSplit | None:
        """None when every KV head of the layer is long (nothing to split). Built once per layer: every
        attention call of the layer asks."""
        key = (layer_idx, n_kv)
        if key not in self._splits:
            long = self._long[layer_idx].to(torch.long)
            short = torch.tensor([h for h in range(n_kv) if h not in set(long.tolist())], dtype=torch.long)
            self._splits[key] = None if len(short) == 0 else HeadSplit(long, short, self.sinks, self.window,
                                                                        self.compensate, self.keeper)
        return self._splits[key]

    @property
    def keeper(self) -> HeadKV | None:
        """What chooses the short heads' keys; None: they keep sinks + window."""
        return None

    def long_select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        """What the long heads attend: every key (lserve selects blocks instead)."""
        return Selection.dense(q.shape[0], q.shape[2], k.shape[2], key_mask=ctx.key_mask, device=q.device)

    def cache_policy(self, owner: object) -> SplitPolicy:
        return SplitPolicy(self, owner)


@dataclass(frozen=True)
class StreamingHeads(HeadPolicy, SelectionMethod):
    """Streaming heads see sinks + window in every phase; ``long_select`` picks keys for the others."""

    split_prefill: ClassVar[bool] = True

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        """The whole layer as one Selection (what diagnostics and density accounting read): block granularity
        for the long heads' choice, the shared sinks + window for the streaming ones."""
        split = self.head_split(ctx.layer_idx, k.shape[1])
        if split is None:
            return self.long_select(q, k, ctx)
        block = 64
        t_q, t_k = q.shape[2], k.shape[2]
        n_qb, n_kb = -(-t_q // block), -(-t_k // block)
        long_sel = self.long_select(q, k, ctx)
        idx = torch.full((q.shape[0], k.shape[1], n_qb, n_kb), -1, dtype=torch.long, device=q.device)
        if len(split.long):
            if long_sel.full:
                chosen = torch.arange(n_kb, device=q.device).expand(q.shape[0], len(split.long), n_qb, n_kb)
            else:
                chosen = _blocks_of(long_sel, block, n_kb)[:, split.long.to(q.device)]
            idx[:, split.long.to(q.device), :, : chosen.shape[-1]] = chosen
        return Selection(idx, t_q, t_k, block, block, self.sinks, self.window, ctx.key_mask)


def _blocks_of(sel: Selection, block: int, n_kb: int) -> Tensor:
    """A block selection re-expressed at ``block`` granularity per KV head (union of what it shows)."""
    mask = sel.to_mask()  # (B, H, Tq, Tk)
    b, h, t_q, t_k = mask.shape
    pad_q, pad_k = -t_q % block, -t_k % block
    mask = torch.nn.functional.pad(mask, (0, pad_k, 0, pad_q))
    hit = mask.view(b, h, -1, block, n_kb, block).any(dim=(3, 5))  # (B, H, nQB, nKB)
    ids = torch.arange(n_kb, device=mask.device).expand_as(hit)
    return torch.where(hit, ids, -1).sort(dim=-1, descending=True).values


@register
@dataclass(frozen=True)
class Duo(StreamingHeads):
    name: ClassVar[str] = "duo"
    summary: ClassVar[str] = "retrieval heads dense, streaming heads sinks + window; their KV freed (DuoAttention)"
    paper: ClassVar[str] = "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming " \
                           "Heads (arXiv:2410.10819)"


@register
@dataclass(frozen=True)
class LServe(StreamingHeads):
    name: ClassVar[str] = "lserve"
    summary: ClassVar[str] = "streaming heads sinks + window; retrieval heads pick blocks (LServe)"
    paper: ClassVar[str] = "LServe: Efficient Long-sequence LLM Serving with Unified Sparse Attention " \
                           "(arXiv:2502.14866)"

    base: str = param("quest", "budgeted selector for the retrieval heads (quest, moba, hip, ...)")
    density: float = param(0.1, "the retrieval heads' density (fraction of causal keys)")
    block: int = param(64, "the retrieval heads' block size")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.base_method  # noqa: B018  (validates base now)

    @cached_property
    def base_method(self) -> BudgetedMethod:
        cls = method_class(self.base)
        if not issubclass(cls, BudgetedMethod):
            raise SpecError(f"lserve: base must be a budgeted selector such as quest or moba, got '{self.base}'")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {"density": self.density, "block": self.block}.items() if k in known})

    @property
    def block_stats(self) -> tuple[str, ...]:  # type: ignore[override]
        return ()  # the long heads are a subset: they compute their own block statistics

    def long_select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        # its own scratch and no shared summaries (the long heads are a subset); the heads' softmax extras stay
        return self.base_method.select(q, k, replace(ctx, summaries=None, state={}))


@register
@dataclass(frozen=True)
class Razor(HeadPolicy):
    name: ClassVar[str] = "razor"
    kind: ClassVar[str] = "press"
    summary: ClassVar[str] = "after a dense prefill, non-retrieval heads keep sinks + window + 1 compensation token"
    paper: ClassVar[str] = "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads " \
                           "(arXiv:2407.15891)"

    ratio: float = param(0.15, "fraction of KV heads kept whole (the top retrieval heads), in [0, 1]")
    compensate: ClassVar[bool] = True
    split_prefill: ClassVar[bool] = False


@register
@dataclass(frozen=True)
class HeadKV(HeadPolicy):
    """Head-level budgets: the top retrieval heads keep every key, and the other KV heads share what is left
    of the ``density`` budget, each keeping the keys the prompt's last ``window`` queries vote for (SnapKV
    votes, pooled) plus sinks and that window. Razor's short heads keep only sinks + window, so a number the
    answer must copy survives only in the retrieval heads; here the other heads keep it too if the question
    points at it.

    Simplification of HeadKV's per-head budgets (proportional to each head's score): two tiers, whole or
    voted, so each tier is one real tensor per layer and the bytes are really freed.
    """

    name: ClassVar[str] = "headkv"
    kind: ClassVar[str] = "press"
    summary: ClassVar[str] = "retrieval heads keep every key; the others share the rest of the budget by SnapKV " \
                             "votes (head-level budgets, HeadKV / Task-KV)"
    paper: ClassVar[str] = "Not All Heads Matter: A Head-Level KV Cache Compression Method with Integrated " \
                           "Retrieval and Reasoning (arXiv:2410.19258)"

    density: float = param(0.25, "fraction of the tokens seen kept over all KV heads, the whole heads included")
    ratio: float = param(0.1, "fraction of KV heads kept whole (the top retrieval heads); below density")
    window: int = param(32, "recent tokens every head keeps; their queries vote for the other keys")
    pool: int = param(7, "width of the average pooling over neighbouring keys' votes (1: none)")
    split_prefill: ClassVar[bool] = False

    @property
    def keeper(self) -> HeadKV:
        return self

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "pool", self.pool, minimum=1)
        check_fraction(self, "density", self.density)
        if self.whole_share >= self.density and self.whole_share < 1:
            raise SpecError(f"headkv: ratio={self.ratio} keeps {self.whole_share:.3f} of the KV heads whole, which "
                            f"already spends density={self.density}; lower ratio or raise density")

    @cached_property
    def whole_share(self) -> float:
        """Fraction of the model's KV heads kept whole (``ratio`` rounded to whole heads)."""
        long = self._long
        kv_heads = load_profile(self.profile).kv_scores("retrieval").numel()
        return sum(len(x) for x in long) / kv_heads

    def short_capacity(self, seen: int) -> int:
        """Keys each voted head keeps so that all heads together hold ``density`` of the ``seen`` tokens."""
        share = (self.density - self.whole_share) / (1 - self.whole_share)
        return max(math.floor(share * seen), self.sinks + self.window, 1)

    def short_keep(self, q: Tensor, k: Tensor, scale: float, seen: int, extras: SoftmaxExtras = PLAIN
                   ) -> Tensor | None:
        """Positions (B, h, capacity) the short heads keep, ascending; None when all fit. ``q`` holds the
        short heads' query heads (grouped per KV head, as ``k``); its last queries are the voters, with the
        model's softmax (``extras``: those query heads' sinks)."""
        n = k.shape[2]
        capacity = self.short_capacity(seen)
        if capacity >= n:
            return None
        w = min(self.window, q.shape[2])
        obs = Observation(0, 0, seen, q[:, :, -w:], k, k, scale, extras=extras)
        return top_keep(window_votes(obs, self.pool).float(), capacity, self.sinks, self.window)


@register
@dataclass(frozen=True)
class Ablate(Profiled, SelectionMethod):
    name: ClassVar[str] = "ablate"
    rewrites_output: ClassVar[bool] = True
    summary: ClassVar[str] = "dense attention with chosen heads' outputs zeroed (what do retrieval heads carry?)"

    top: float = param(0.05, "fraction of query heads to zero")
    by: str = param("retrieval", "which heads: retrieval (the top scorers) or random")
    seed: int = param(0, "seed for by=random")
    exclude: float = param(0.1, "by=random draws only heads whose retrieval score is below this (the Retrieval "
                                "Head paper's non-retrieval heads); 0 draws from every head")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.by not in ("retrieval", "random"):
            raise SpecError(f"ablate: by must be 'retrieval' or 'random', got {self.by!r}")
        if not (isinstance(self.top, float | int) and 0 <= self.top <= 1):
            raise SpecError(f"ablate: top must be in [0, 1], got {self.top!r}")
        if not (isinstance(self.exclude, float | int) and 0 <= self.exclude <= 1):
            raise SpecError(f"ablate: exclude must be in [0, 1], got {self.exclude!r}")
        self.zeroed  # noqa: B018  (too few heads to draw from fails now)

    @cached_property
    def zeroed(self) -> dict[int, list[int]]:
        """Layer -> query heads to zero."""
        prof = load_profile(self.profile)
        if self.by == "retrieval":
            return top_heads(prof, "retrieval", self.top)
        n = round(self.top * prof.layers * prof.heads)
        scores = prof.tensor("retrieval").flatten()
        pool = [i for i in range(len(scores)) if self.exclude == 0 or scores[i] < self.exclude]
        if len(pool) < n:
            raise SpecError(f"ablate: only {len(pool)} heads score below exclude={self.exclude}, {n} asked; "
                            "raise exclude (0 draws from every head) or lower top")
        return by_layer(random.Random(self.seed).sample(pool, n), prof.heads)

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        return Selection.dense(q.shape[0], q.shape[2], k.shape[2], key_mask=ctx.key_mask, device=q.device)

    def postprocess(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: SelectContext) -> Tensor:
        """out (B, Tq, Hq, D): the zeroed heads contribute nothing to the layer's output projection."""
        heads = self.zeroed.get(ctx.layer_idx)
        if heads:
            out = out.clone()
            out[:, :, heads] = 0
        return out


@register
@dataclass(frozen=True)
class ACT(Profiled, SelectionMethod):
    """Attention calibration: in the heads most prone to hidden sinks, attention to the sinks this input
    actually shows is scaled by ``damp`` and the freed mass flows back to the other keys in proportion.

    Scaling a key's softmax weight by ``damp`` and renormalising is adding log(damp) to its logit, so the
    calibrated heads are recomputed exactly with that bias. Sinks are detected per call and head from the
    last ``observe`` queries: keys past the first ``sinks`` that draw ``alpha`` x their uniform share. On a
    model with a logit softcap or learned sinks, detection and recomputation use the model's softmax (the bias
    is added after the cap; the sink logit stays in the denominator, uncalibrated).
    """

    name: ClassVar[str] = "act"
    rewrites_output: ClassVar[bool] = True
    summary: ClassVar[str] = "damp attention to hidden sinks in the heads that have them (ACT, training-free)"
    paper: ClassVar[str] = "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models " \
                           "without Training through Attention Calibration (arXiv:2406.15765)"

    heads: float = param(0.1, "fraction of query heads calibrated (highest hidden_sink scores in the profile)")
    damp: float = param(0.5, "factor on the attention a calibrated head pays a detected hidden sink, in (0, 1]")
    alpha: float = param(10.0, "a key is a hidden sink when it draws alpha x the uniform share")
    observe: int = param(64, "recent queries that detect the sinks")
    sinks: int = param(1, "leading tokens never calibrated (the real attention sink)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.damp, float | int) and 0 < self.damp <= 1):
            raise SpecError(f"act: damp must be in (0, 1], got {self.damp!r}")
        if not (isinstance(self.heads, float | int) and 0 <= self.heads <= 1):
            raise SpecError(f"act: heads must be in [0, 1], got {self.heads!r}")
        check_int(self, "observe", self.observe, minimum=1)
        check_int(self, "sinks", self.sinks, minimum=0)

    @cached_property
    def calibrated(self) -> dict[int, list[int]]:
        return top_heads(load_profile(self.profile), "hidden_sink", self.heads)

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        return Selection.dense(q.shape[0], q.shape[2], k.shape[2], key_mask=ctx.key_mask, device=q.device)

    def postprocess(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: SelectContext) -> Tensor:
        heads = self.calibrated.get(ctx.layer_idx)
        if not heads or self.damp == 1:
            return out
        hq = torch.tensor(heads, device=q.device)
        hk = hq // (q.shape[1] // k.shape[1])
        qc, kc, vc = q[:, hq].float(), k[:, hk].float(), v[:, hk].float()
        t_q, t_k = q.shape[2], k.shape[2]
        cols = torch.arange(t_k, device=q.device)
        rows = (t_k - t_q) + torch.arange(t_q, device=q.device)
        hidden = (cols[None, :] > rows[:, None])[None]  # (1 or B, Tq, Tk): keys a query may not see
        if ctx.key_mask is not None:
            hidden = hidden | ~ctx.key_mask[:, None, :]
        scale = ctx.softmax_scale(q)
        n_obs = min(self.observe, t_q)
        obs_hidden = hidden[:, t_q - n_obs:]
        rows = torch.arange(t_q - n_obs, t_q, device=q.device)
        extras = ctx.extras.heads(hq)
        share = causal_probs(qc, kc, scale, rows, ctx.key_mask, extras=extras)[:, :, 0].mean(-2)  # (B, h, Tk)
        visible = (~obs_hidden).sum(-1).float().mean(-1).reshape(-1, 1, 1)
        sink = (share > self.alpha / visible) & (cols >= self.sinks)
        bias = sink.float() * math.log(self.damp)  # scaling a softmax weight = adding its log to the logit
        fixed = out.clone()
        for lo in range(0, t_q, 1024):
            hi = min(lo + 1024, t_q)
            logits = extras.cap(qc[:, :, lo:hi] @ kc.transpose(-1, -2) * scale) + bias[:, :, None, :]
            logits = logits.masked_fill(hidden[:, None, lo:hi], -torch.inf)
            probs = logits.softmax(-1) if extras.sinks is None else with_sinks(logits, extras.sinks.float()[:, None])
            fixed[:, lo:hi, hq] = (probs @ vc).transpose(1, 2).to(out.dtype)
        return fixed
