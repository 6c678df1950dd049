"""AnchorAttention: keep key stripes whose score comes close to an anchor (Zhang et al., arXiv:2505.23520).

The largest scores of a query usually sit on the first tokens and its local window, which it attends
anyway; their maximum is the *anchor*. A key elsewhere matters only if its score comes within
``theta`` of the anchor. Each query block compares its pooled (mean) query with every key, takes the
anchor from the sinks and its window, and keeps the key stripes (``key_block`` tokens, default 16)
holding a key within ``theta`` of it, best first, up to the budget.

On a model whose softmax holds more than q.k (``SelectContext.extras``) the scores are the model's logits:
softcapped as its softmax sees them, and a head's learned sink logit, which sits in every denominator like
the sinks and window, is an anchor candidate too (a head with a strong sink keeps fewer stripes).

Simplifications: the anchor and the comparison use the block's mean query (the paper compares
per query against a per-query anchor); stripes are ``key_block`` tokens wide, not single tokens.
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
from .scoring import by_group, chunk_rows, grouped_sinks, mean_queries, reduce_heads


@register
@dataclass(frozen=True)
class Anchor(BudgetedMethod):
    name: ClassVar[str] = "anchor"
    summary: ClassVar[str] = "key stripes scoring within theta of the sink/window anchor (AnchorAttention)"
    paper: ClassVar[str] = "AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity " \
                           "(arXiv:2505.23520)"

    key_block: int | None = param(16, "stripe width in tokens")
    theta: float = param(4.0, "keep stripes whose best scaled score is within theta of the anchor")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.theta, float | int) or self.theta < 0:
            raise SpecError(f"anchor: theta must be a number >= 0, got {self.theta!r}")

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        batch, n_q = q.shape[:2]
        n_kv, t_k = k.shape[1], k.shape[2]
        bk, dev = self.block_k, q.device
        qm = by_group(mean_queries(q, self.block), n_kv) * ctx.softmax_scale(q)  # (B, Hkv, G, nQB, D)
        kf = k.float().unsqueeze(2)  # (B, Hkv, 1, Tk, D)
        j = torch.arange(t_k, device=dev)
        pad = quota.n_kb * bk - t_k
        step = chunk_rows(4 * batch * n_q * t_k * 2)
        extras = ctx.extras
        sink = None if extras.sinks is None else grouped_sinks(extras.sinks, n_kv).to(dev)[None, :, :, None, None]
        parts = []
        for b0 in range(0, quota.n_qb, step):
            b1 = min(b0 + step, quota.n_qb)
            s = extras.cap(qm[:, :, :, b0:b1] @ kf.transpose(-1, -2))  # (B, Hkv, G, nb, Tk)
            first, last = quota.first[b0:b1, None], quota.last[b0:b1, None]
            always = ((j < self.sinks) | (j > first - self.local_window)) & (j <= last)  # (nb, Tk)
            if ctx.key_mask is not None:
                s = s.masked_fill(~ctx.key_mask[:, None, None, None, :], float("-inf"))
            anchor = s.masked_fill(~always, float("-inf")).amax(-1, keepdim=True)
            if sink is not None:  # (1, Hkv, G, 1, 1): the learned sink logit is always in the softmax too
                anchor = torch.maximum(anchor, sink)
            gap = (s - anchor).masked_fill(j > last, float("-inf"))
            gap = torch.nn.functional.pad(gap, (0, pad), value=float("-inf"))
            parts.append(gap.view(*gap.shape[:-1], quota.n_kb, bk).amax(-1))  # (B, Hkv, G, nb, nKB)
        gap = torch.cat(parts, dim=3).reshape(batch, n_q, quota.n_qb, quota.n_kb)
        gap = reduce_heads(gap, n_kv, self.group, "max")
        close = (gap >= -self.theta) & quota.candidate
        return self.top_blocks(gap, quota, ctx, n_take=close.sum(-1))
