"""FlexPrefill: per head and input, a query-aware or a vertical-slash pattern, sized by cumulative
attention (Lai et al., arXiv:2502.20766).

For each head, the last query block's true block distribution (exact attention, summed per key
block) is compared with the distribution estimated from pooled queries and pooled keys. When they
agree (Jensen-Shannon distance below ``tau``) the pooled estimate is trusted and every query block
ranks key blocks by its own pooled scores (*query-aware*); otherwise the head falls back to the
*vertical-slash* pattern estimated from the last queries. Either way a query block keeps its best
blocks until their estimated mass, with the sinks and window, reaches ``gamma``: the budget adapts
per head and input; ``budget=``/``density=`` only cap it. The last query block, whose queries were
attended exactly for the estimate, ranks blocks by their own attention and fills its budget
(``scoring.last_block_exact``); in decode the one query is that block, so a decode step keeps its
budget's best blocks instead of stopping at ``gamma`` (``exact_last=false``: the paper's rule).

Simplifications: verticals and slashes are rounded to key blocks (see ``vslash``); in decode the one
query is the last block, so both patterns use its exact attention.
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
from .scoring import (
    block_sums,
    by_group,
    last_block_exact,
    last_query_probs,
    mean_queries,
    reduce_heads,
    sorted_count_to_reach,
)
from .vslash import vertical_slash_scores


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon distance (base 2, in [0, 1]) between distributions on the last dim."""
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp(min=1e-12) / b.clamp(min=1e-12)).log2()).sum(-1)  # noqa: E731
    return ((kl(p, m) + kl(q, m)) / 2).clamp(min=0).sqrt()


@register
@dataclass(frozen=True)
class FlexPrefill(BudgetedMethod):
    name: ClassVar[str] = "flexprefill"
    scores_attention: ClassVar[bool] = True
    summary: ClassVar[str] = "per head: query-aware or vertical-slash, blocks until mass gamma (FlexPrefill)"
    paper: ClassVar[str] = "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence " \
                           "Inference (arXiv:2502.20766)"
    block_stats: ClassVar[tuple[str, ...]] = ("mean",)
    default_budget: ClassVar[int | None] = None  # gamma decides; budget/density only cap

    gamma: float = param(0.9, "estimated attention mass each query block must reach, in (0, 1]")
    tau: float = param(0.1, "JS distance below which a head trusts the pooled (query-aware) estimate")
    exact_last: bool = param(True, "the last query block also ranks key blocks by its own queries' exact "
                             "attention (false: by the pattern estimate alone, as the paper does)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.gamma, float | int) and 0 < self.gamma <= 1):
            raise SpecError(f"flexprefill: gamma must be in (0, 1], got {self.gamma!r}")
        if not (isinstance(self.tau, float | int) and 0 <= self.tau <= 1):
            raise SpecError(f"flexprefill: tau must be in [0, 1], got {self.tau!r}")

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        n_kv, n_q = k.shape[1], q.shape[1]
        scale = ctx.softmax_scale(q)
        bk, dev = self.block_k, q.device
        k_mean = self.key_stats(k, ctx, ("mean",))["mean"].float()  # (B, Hkv, nKB, D)

        probs = last_query_probs(q, k, self.block, scale, ctx.key_mask)  # (B, Hq, n, Tk)
        true_dist = block_sums(probs.mean(2), bk)  # (B, Hq, nKB)
        q_last = q[:, :, -probs.shape[2]:].float().mean(2)  # (B, Hq, D) pooled last block
        est_logits = (by_group(q_last, n_kv).unsqueeze(-2) @ k_mean.unsqueeze(2).transpose(-1, -2)).squeeze(-2)
        est_dist = (est_logits.reshape(q.shape[0], n_q, -1) * scale).softmax(-1)  # (B, Hq, nKB)
        query_aware = js_distance(true_dist, est_dist) < self.tau  # (B, Hq)

        # query-aware: each query block's pooled query against pooled keys, softmax over causal blocks
        qm = by_group(mean_queries(q, self.block), n_kv)  # (B, Hkv, G, nQB, D)
        qa = (qm @ k_mean.unsqueeze(2).transpose(-1, -2)).reshape(q.shape[0], n_q, quota.n_qb, quota.n_kb) * scale
        causal = (torch.arange(quota.n_kb, device=dev) * bk)[None, :] <= quota.last[:, None]  # (nQB, nKB)
        qa = qa.masked_fill(~causal, float("-inf")).softmax(-1)
        vs = vertical_slash_scores(probs, quota, self.block, bk) * causal
        vs = vs / vs.sum(-1, keepdim=True).clamp(min=1e-12)
        mass = torch.where(query_aware[..., None, None], qa, vs)  # (B, Hq, nQB, nKB)
        # the last query block ranks by its own queries' exact attention too, and fills its budget: gamma of an
        # average would drop what only its final query needs (see last_block_exact)
        if self.exact_last:
            mass[:, :, -1] = torch.maximum(mass[:, :, -1], last_block_exact(probs, quota.t_q, self.block, bk))
        mass = reduce_heads(mass, n_kv, self.group, "mean")
        always = (mass * (causal & ~quota.candidate)).sum(-1)  # sinks' and window's blocks
        cand_mass = mass * quota.candidate
        need = sorted_count_to_reach(cand_mass, always, self.gamma)
        if self.exact_last:
            need[..., -1] = quota.n_take[-1]
        scores = cand_mass.masked_fill(cand_mass <= 0, float("-inf"))
        return self.top_blocks(scores, quota, ctx, n_take=need)
