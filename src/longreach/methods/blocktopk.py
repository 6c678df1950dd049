"""Block top-k selectors: score each key block by a summary, keep the best blocks per query block.

- ``quest``: per-channel min/max of each key block give an upper bound of q.k over the block
  (Quest, arXiv:2406.10774); a query block scores a key block by the largest share of its own bounded
  attention any of its queries gives it (``share``; see ``Quest``).
- ``moba``: the mean key of each block against the mean query of the block (MoBA, arXiv:2502.13189;
  InfLLM's representative keys are the same idea).

Both keep the sinks and the local window, which count toward the budget; ``group`` is described in
``BudgetedMethod``. Both select in prefill and decode by default; ``prefill=dense`` selects in decode only, as
Quest's paper and code run it (with ``dense_layers=2``: its code leaves the first two layers dense); see
``PhaseGated``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..selection import Selection
from ..stages import PLAIN, SoftmaxExtras
from .base import BlockQuota, PhaseGated, SelectContext, param
from .registry import register
from .scoring import by_group, chunk_rows, grouped_sinks, query_blocks


@dataclass(frozen=True)
class BlockTopK(PhaseGated):
    def score(self, q: Tensor, stats: dict[str, Tensor], q_valid: Tensor, candidate: Tensor, ctx: SelectContext
              ) -> Tensor:
        """q (B, Hkv, G, nb, bq, D) for nb query blocks -> (B, Hkv, G, nb, nKB) block scores; ``candidate``
        (nb, nKB) marks the blocks each query block may choose; ``ctx`` gives the model's softmax (scale, extras)."""
        raise NotImplementedError

    def combine_group(self, scores: Tensor) -> Tensor:
        """(B, Hkv, G, nQB, nKB) -> (B, Hkv, nQB, nKB) when the group chooses together."""
        return scores.amax(dim=2)

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        stats = self.key_stats(k, ctx, self.block_stats)
        scores = self._block_scores(q, k.shape[1], stats, quota, ctx)  # (B, H, nQB, nKB)
        return self.top_blocks(scores, quota, ctx)

    def _block_scores(self, q: Tensor, n_kv: int, stats: dict[str, Tensor], quota: BlockQuota, ctx: SelectContext
                      ) -> Tensor:
        """Scores of every (query block, key block); only candidate key blocks are computed (a chunk of
        query blocks scores the key blocks up to its last candidate: half the work of a causal prefill),
        the rest are -inf."""
        batch, n_q = q.shape[:2]
        qb, q_valid = query_blocks(q, self.block)
        qg = by_group(qb, n_kv)  # (B, Hkv, G, nQB, bq, D)
        n_qb = qg.shape[3]
        n_kb = next(iter(stats.values())).shape[2]
        stats = {s: t.float() for s, t in stats.items()}
        step = chunk_rows(4 * batch * n_q * self.block * n_kb * 2)  # bytes of one query block's scores
        chunks = []
        for b0 in range(0, n_qb, step):
            b1 = min(b0 + step, n_qb)
            width = quota.width(b0, b1)
            if width == n_kb:  # decode, or the last chunk of a prefill: nothing to pad
                part = self.score(qg[:, :, :, b0:b1], stats, q_valid[b0:b1], quota.candidate[b0:b1], ctx)
            else:
                part = qg.new_full((*qg.shape[:3], b1 - b0, n_kb), float("-inf"))
                if width:
                    part[..., :width] = self.score(qg[:, :, :, b0:b1], {s: t[:, :, :width] for s, t in stats.items()},
                                                   q_valid[b0:b1], quota.candidate[b0:b1, :width], ctx)
            chunks.append(part)
        scores = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=3)  # (B, Hkv, G, nQB, nKB)
        return self.combine_group(scores) if self.group == "kv" else scores.flatten(1, 2)


@register
@dataclass(frozen=True)
class Quest(BlockTopK):
    name: ClassVar[str] = "quest"
    summary: ClassVar[str] = "per-channel key min/max bounds -> top-k blocks (Quest)"
    paper: ClassVar[str] = "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (arXiv:2406.10774)"
    block_stats: ClassVar[tuple[str, ...]] = ("min", "max")

    share: bool = param(True, "rank a key block by the largest share of its own bounded attention any query gives "
                              "it; false: by the largest raw bound (before the change; for ablations)")

    def score(self, q: Tensor, stats: dict[str, Tensor], q_valid: Tensor, candidate: Tensor, ctx: SelectContext
              ) -> Tensor:
        # upper bound of q.k over a block: sum_c max(q_c * min_c, q_c * max_c), i.e. [q+, q-] . [max, min]:
        # one GEMM per KV head with inner size 2D (a broadcast matmul would copy the bounds per query block)
        batch, n_kv, group, nb, bq, dim = q.shape
        rows = q.reshape(batch * n_kv, group * nb * bq, dim)
        rows = torch.cat([rows.clamp(min=0), rows.clamp(max=0)], dim=-1)
        bounds = torch.cat([stats["max"], stats["min"]], dim=-1).reshape(batch * n_kv, -1, 2 * dim)
        bound = rows @ bounds.transpose(-1, -2)  # (B*Hkv, rows, nKB)
        bound = bound.view(batch, n_kv, group, nb, bq, -1)  # (B, Hkv, G, nb, bq, nKB)
        if self.share:
            bound = bounded_shares(bound, candidate, ctx.softmax_scale(q), ctx.extras)
        if not bool(q_valid.all()):
            bound = bound.masked_fill(~q_valid[:, :, None], float("-inf"))
        return bound.amax(dim=-2)


@register
@dataclass(frozen=True)
class MoBA(BlockTopK):
    name: ClassVar[str] = "moba"
    summary: ClassVar[str] = "mean-pooled block keys vs mean query -> top-k blocks (MoBA / InfLLM)"
    paper: ClassVar[str] = "MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv:2502.13189)"
    block_stats: ClassVar[tuple[str, ...]] = ("mean",)

    def score(self, q: Tensor, stats: dict[str, Tensor], q_valid: Tensor, candidate: Tensor, ctx: SelectContext
              ) -> Tensor:
        # padding rows are zeros (query_blocks), so a sum over the block is the sum over its valid queries; q *
        # weights would make a copy the size of q (38 MiB per layer at 16k, SmolLM2)
        q_mean = q.sum(dim=-2) / q_valid.sum(-1).clamp(min=1)[:, None]  # (B, Hkv, G, nb, D)
        batch, n_kv, group, nb, dim = q_mean.shape
        # one GEMM per KV head over the group's rows (a broadcast matmul would copy the means per query head)
        scores = q_mean.reshape(batch * n_kv, group * nb, dim) @ stats["mean"].reshape(batch * n_kv, -1, dim).mT
        return scores.view(batch, n_kv, group, nb, -1)  # (B, Hkv, G, nb, nKB)

    def combine_group(self, scores: Tensor) -> Tensor:
        return scores.mean(dim=2)


def bounded_shares(bound: Tensor, candidate: Tensor, scale: float, extras: SoftmaxExtras = PLAIN) -> Tensor:
    """Each query's bounds as log-shares over the blocks its query block may choose: the log-softmax of the scaled
    bounds as the model's softmax sees them (softcapped; a learned sink logit joins the denominator), in place;
    bound (B, Hkv, G, nb, bq, nKB) with ``candidate`` (nb, nKB). Other blocks get -inf.

    Why: a query block shares one choice, and raw bounds compare across queries in logit units, so a query
    with large norms outbids the rest on every block. Without a chat template the answer-writing query is the
    last of a block of queries that read the question around it; on one SmolLM2 prompt at 4k (seed 1001) the
    needle's block fell to 13th and 46th of 63 in two needle heads, where 5 are kept, and is 3rd in both by
    shares (docs/template-free.md).
    """
    bound = extras.cap(bound.mul_(scale)).masked_fill_(~candidate[:, None, :], float("-inf"))
    norm = bound.logsumexp(dim=-1, keepdim=True)
    if extras.sinks is not None:
        sinks = grouped_sinks(extras.sinks, norm.shape[1]).to(norm.device)[None, :, :, None, None, None]
        norm = torch.logaddexp(norm, sinks)
    return bound.sub_(norm.masked_fill_(norm == float("-inf"), 0.0))  # a row with no candidate stays -inf
