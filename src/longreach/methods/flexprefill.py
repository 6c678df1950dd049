"""FlexPrefill: per head and input, a query-aware or a vertical-slash pattern, sized by cumulative
attention (Lai et al., arXiv:2502.20766).

For each head, the last query block's true block distribution (exact attention, summed per key
block) is compared with the distribution estimated from pooled queries and pooled keys. When they
agree (Jensen-Shannon distance below ``tau``) the pooled estimate is trusted and every query block
ranks key blocks by its own pooled scores (*query-aware*); otherwise the head falls back to the
*vertical-slash* pattern estimated from the last queries. Either way a query block keeps its best
blocks until their estimated mass, with the sinks and window, reaches ``gamma``: the budget adapts
per head and input; ``budget=``/``density=`` only cap it. The query blocks of the last queries, which were
attended exactly for the estimate, rank blocks by those queries' own attention and fill their budget
(``scoring.last_blocks_exact``; two blocks when the prompt ends just past a block boundary, the question then
sitting in the one before the last); in decode the one query is the last block, so a decode step keeps its
budget's best blocks instead of stopping at ``gamma`` (``exact_last=false``: the paper's rule; ``decode=dense``
attends every key in decode, as the paper does: ``base.PhaseGated``). Without
``budget=``/``density=`` there is no budget to fill: ``gamma`` sizes every block, the last one included.

On a model whose softmax holds more than q.k (``SelectContext.extras``) the estimates use the model's
softmax: the pooled logits are softcapped as the model's are, and the last queries' exact attention includes
the learned sinks, so a query whose sink takes most of its attention weighs little in the vertical-slash
estimate. ``gamma`` is a fraction of the keys' own mass: the sink's share belongs to no key (with a sink the
keys' true mass sums to less than 1, and a gamma above it would be unreachable and keep every block). The
pattern estimates are distributions over key blocks already, and the exact block distribution is rescaled
to the keys' total before the JS comparison.

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
from .base import BlockQuota, PrefillPattern, SelectContext, param
from .registry import register
from .scoring import (
    block_sums,
    by_group,
    grouped_scores,
    keys_share,
    last_blocks_exact,
    last_query_probs,
    mean_queries,
    reduce_heads,
    sorted_count_to_reach,
)
from .vslash import vertical_slash_scores

PASS_BYTES = 16 * 2**20  # the last queries' probabilities held at once (the rest of the heads wait their turn)


def js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon distance (base 2, in [0, 1]) between distributions on the last dim."""
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp(min=1e-12) / b.clamp(min=1e-12)).log2()).sum(-1)  # noqa: E731
    return ((kl(p, m) + kl(q, m)) / 2).clamp(min=0).sqrt()


@register
@dataclass(frozen=True)
class FlexPrefill(PrefillPattern):
    name: ClassVar[str] = "flexprefill"
    summary: ClassVar[str] = "per head: query-aware or vertical-slash, blocks until mass gamma (FlexPrefill)"
    paper: ClassVar[str] = "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence " \
                           "Inference (arXiv:2502.20766)"
    block_stats: ClassVar[tuple[str, ...]] = ("mean",)
    default_budget: ClassVar[int | None] = None  # gamma decides; budget/density only cap

    gamma: float = param(0.9, "estimated attention mass each query block must reach, in (0, 1]")
    tau: float = param(0.1, "JS distance below which a head trusts the pooled (query-aware) estimate")
    exact_last: bool = param(True, "the query blocks of the last queries also rank key blocks by those "
                             "queries' exact attention (false: by the pattern estimate alone, as the paper does)")

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

        extras = ctx.extras
        causal = (torch.arange(quota.n_kb, device=dev) * bk)[None, :] <= quota.last[:, None]  # (nQB, nKB)
        true_dist, vs, own_last = self.last_query_estimates(q, k, quota, ctx)  # own_last: (B, Hq, m, nKB)
        q_last = q[:, :, -min(self.block, q.shape[2]):].float().mean(2)  # (B, Hq, D) pooled last block
        est_logits = grouped_scores(by_group(q_last, n_kv).unsqueeze(-2), k_mean).squeeze(-2)
        est_dist = extras.cap(est_logits.reshape(q.shape[0], n_q, -1) * scale).softmax(-1)  # (B, Hq, nKB)
        query_aware = js_distance(true_dist, est_dist) < self.tau  # (B, Hq)

        # query-aware: each query block's pooled query against pooled keys, softmax over causal blocks
        qm = by_group(mean_queries(q, self.block), n_kv)  # (B, Hkv, G, nQB, D)
        qa = grouped_scores(qm, k_mean).reshape(q.shape[0], n_q, quota.n_qb, quota.n_kb) * scale
        qa = extras.cap(qa)
        qa = qa.masked_fill(~causal, float("-inf")).softmax(-1)
        vs = keys_share(vs * causal)  # sink-weighted rows, then a distribution over the key blocks
        mass = torch.where(query_aware[..., None, None], qa, vs)  # (B, Hq, nQB, nKB)
        # the last queries' blocks rank by those queries' exact attention too, and fill their budget: gamma of an
        # average would drop what only the question needs (see last_blocks_exact)
        m = own_last.shape[2]  # the query blocks the last queries fall in (1, or 2 past a block boundary)
        if self.exact_last:
            mass[:, :, -m:] = torch.maximum(mass[:, :, -m:], own_last)
        mass = reduce_heads(mass, n_kv, self.group, "mean")
        always = (mass * (causal & ~quota.candidate)).sum(-1)  # sinks' and window's blocks
        cand_mass = mass * quota.candidate
        need = sorted_count_to_reach(cand_mass, always, self.gamma)
        if self.exact_last and self.capped:  # without a budget there is none to fill: gamma sizes it too
            need[..., -m:] = quota.n_take[-m:]
        scores = cand_mass.masked_fill(cand_mass <= 0, float("-inf"))
        return self.top_blocks(scores, quota, ctx, n_take=need)

    def last_query_estimates(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext
                             ) -> tuple[Tensor, Tensor, Tensor]:
        """From the last block's exact attention: its block distribution (B, Hq, nKB), the vertical-slash
        pattern (B, Hq, nQB, nKB) and the last queries' own ranking of the m query blocks they fall in
        (B, Hq, m, nKB), all in the keys' shares.
        A few KV heads at a time when the probabilities are large: (queries x keys) per head is 38 MiB a layer
        for SmolLM2 at 16k with all heads at once, which put flexprefill's peak memory above dense's; a decode
        step's one query takes all heads in one pass (a loop per head cost it a quarter of its speed)."""
        n_kv, n_q, bk = k.shape[1], q.shape[1], self.block_k
        group, sinks, scale = n_q // n_kv, ctx.extras.sinks is not None, ctx.softmax_scale(q)
        last = q[:, :, -min(self.block, q.shape[2]):]  # a view: only the last block's queries are read
        per_kv_head = 4 * q.shape[0] * group * last.shape[2] * k.shape[2]  # bytes of one KV head's probabilities
        step = max(1, min(n_kv, PASS_BYTES // max(per_kv_head, 1)))
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        for h0 in range(0, n_kv, step):
            h1 = min(h0 + step, n_kv)
            heads = slice(h0 * group, h1 * group)
            # the tail of q alone: causal_probs places queries from the last key backwards, so positions hold
            probs = last_query_probs(last[:, heads], k[:, h0:h1], last.shape[2], scale, ctx.key_mask,
                                     ctx.extras.heads(heads))  # (B, G, n, Tk)
            true_dist = block_sums(probs.mean(2), bk)
            vs = vertical_slash_scores(probs, quota, self.block, bk)
            own = keys_share(probs) if sinks else probs  # in the estimates' unit: the keys' shares
            ranked = last_blocks_exact(own, quota.t_q, self.block, bk) if self.exact_last else true_dist[:, :, None]
            parts.append((keys_share(true_dist) if sinks else true_dist, vs, ranked))
            del probs, own
        return tuple(torch.cat(p, dim=1) for p in zip(*parts, strict=True))  # type: ignore[return-value]
