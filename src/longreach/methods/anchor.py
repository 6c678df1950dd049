"""AnchorAttention: keep key stripes whose score comes close to an anchor (Zhang et al., arXiv:2505.23520).

The largest scores of a query usually sit on the first tokens and its local window, which it attends
anyway; their maximum is the *anchor*. A key elsewhere matters only if its score comes within
``theta`` of the anchor. Each query block compares its pooled (mean) query with every key, takes the
anchor from the sinks and its window, and keeps the key stripes (``key_block`` tokens, default 16)
holding a key within ``theta`` of it, best first, up to the budget.

On a model whose softmax holds more than q.k (``SelectContext.extras``) the scores are the model's logits:
softcapped as its softmax sees them, and a head's learned sink logit, which sits in every denominator like
the sinks and window, is an anchor candidate too (a head with a strong sink keeps fewer stripes).

The query blocks of the last ``block`` queries also compare each of those queries with its own anchor and keep
a stripe any of them finds close (``exact_last``): they write the answer, and a needle only the question reads
is diluted in the block's mean query, as in the averaged estimates of vslash and flexprefill
(docs/template-free.md). ``exact_last=false`` is the mean-query rule alone.

Simplifications: the anchor and the comparison use the block's mean query (the paper compares
per query against a per-query anchor), except in the blocks of the last queries; stripes are ``key_block``
tokens wide, not single tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import SpecError
from ..selection import Selection
from .base import BlockQuota, BudgetedMethod, SelectContext, param
from .registry import register
from .scoring import by_group, chunk_rows, grouped_scores, grouped_sinks, last_rows_max, mean_queries, reduce_heads


@register
@dataclass(frozen=True)
class Anchor(BudgetedMethod):
    name: ClassVar[str] = "anchor"
    summary: ClassVar[str] = "key stripes scoring within theta of the sink/window anchor (AnchorAttention)"
    paper: ClassVar[str] = "AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity " \
                           "(arXiv:2505.23520)"

    key_block: int | None = param(16, "stripe width in tokens")
    theta: float = param(4.0, "keep stripes whose best scaled score is within theta of the anchor")
    exact_last: bool = param(True, "the query blocks of the last queries also compare each of those queries with "
                             "its own anchor (false: the block's mean query alone)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.theta, float | int) or self.theta < 0:
            raise SpecError(f"anchor: theta must be a number >= 0, got {self.theta!r}")

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        kf = k.float()
        qm = by_group(mean_queries(q, self.block), k.shape[1]) * ctx.softmax_scale(q)  # (B, Hkv, G, nQB, D)
        gap = self.stripe_gaps(qm, kf, quota.first, quota.last, quota.n_kb, ctx).flatten(1, 2)  # (B, Hq, nQB, nKB)
        if self.exact_last and q.shape[2] > 1:  # (one query is its own mean)
            own = self.last_gaps(q, kf, quota.n_kb, ctx)
            gap[:, :, -own.shape[2]:] = torch.maximum(gap[:, :, -own.shape[2]:], own)
        gap = reduce_heads(gap, k.shape[1], self.group, "max")
        close = (gap >= -self.theta) & quota.candidate
        return self.top_blocks(gap, quota, ctx, n_take=close.sum(-1))

    def last_gaps(self, q: Tensor, kf: Tensor, n_kb: int, ctx: SelectContext) -> Tensor:
        """(B, Hq, m, nKB): for the m query blocks the last ``block`` queries fall in, each stripe's best gap among
        those queries, each query against its own anchor."""
        t_q, t_k = q.shape[2], kf.shape[2]
        rows = torch.arange(t_q - min(self.block, t_q), t_q, device=q.device)
        pos = (t_k - t_q) + rows  # the queries' key positions (a chunk's queries follow the cached keys)
        qs = by_group(q[:, :, rows].float(), kf.shape[1]) * ctx.softmax_scale(q)  # (B, Hkv, G, n, D)
        return last_rows_max(self.stripe_gaps(qs, kf, pos, pos, n_kb, ctx).flatten(1, 2), t_q, self.block)

    def stripe_gaps(self, qs: Tensor, kf: Tensor, first: Tensor, last: Tensor, n_kb: int,
                    ctx: SelectContext) -> Tensor:
        """Each stripe's best score minus the anchor, for query rows qs (B, Hkv, G, R, D), already scaled, that
        sit at key positions first..last (R,) (a block's mean query spans its block; one query, its own position),
        over keys kf (B, Hkv, Tk, D) fp32: (B, Hkv, G, R, nKB), -inf where a stripe holds no key the row may
        see."""
        batch, n_kv, group, n_rows = qs.shape[:4]
        t_k, bk = kf.shape[2], self.block_k
        j = torch.arange(t_k, device=qs.device)
        extras = ctx.extras
        sink = None if extras.sinks is None else grouped_sinks(extras.sinks, n_kv).to(qs.device)[None, :, :, None, None]
        step = chunk_rows(4 * batch * n_kv * group * t_k * 2)
        parts = []
        for r0 in range(0, n_rows, step):
            r1 = min(r0 + step, n_rows)
            s = extras.cap(grouped_scores(qs[:, :, :, r0:r1], kf))  # (B, Hkv, G, r, Tk)
            lo, hi = first[r0:r1, None], last[r0:r1, None]
            always = ((j < self.sinks) | (j > lo - self.local_window)) & (j <= hi)  # (r, Tk)
            if ctx.key_mask is not None:
                s = s.masked_fill(~ctx.key_mask[:, None, None, None, :], float("-inf"))
            anchor = s.masked_fill(~always, float("-inf")).amax(-1, keepdim=True)
            if sink is not None:  # (1, Hkv, G, 1, 1): the learned sink logit is always in the softmax too
                anchor = torch.maximum(anchor, sink)
            gap = torch.nn.functional.pad((s - anchor).masked_fill(j > hi, float("-inf")), (0, n_kb * bk - t_k),
                                          value=float("-inf"))
            parts.append(gap.view(*gap.shape[:-1], n_kb, bk).amax(-1))  # (B, Hkv, G, r, nKB)
        return torch.cat(parts, dim=3)
