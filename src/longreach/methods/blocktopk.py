"""Block top-k selectors: score each key block by a summary, keep the best blocks per query block.

- ``quest``: per-channel min/max of each key block give an upper bound of q.k over the block
  (Quest, arXiv:2406.10774); a query block scores a key block by its best query's bound.
- ``moba``: the mean key of each block against the mean query of the block (MoBA, arXiv:2502.13189;
  InfLLM's representative keys are the same idea).

Both keep the sinks and the local window, which count toward the budget. With ``group=kv`` (default)
the query heads that share a KV head choose together (their scores are combined), so the kernel
gathers each chosen block once per KV head; ``group=q`` lets every query head choose its own blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..cache.summaries import block_stats
from ..errors import SpecError
from ..selection import Selection
from .base import BudgetedMethod, SelectContext, param
from .registry import register

SCORE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class BlockTopK(BudgetedMethod):
    group: str = param("kv", "kv: heads sharing a KV head choose together; q: each query head chooses")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group not in ("kv", "q"):
            raise SpecError(f"{self.name}: group must be 'kv' or 'q', got {self.group!r}")

    def score(self, q: Tensor, stats: dict[str, Tensor], q_valid: Tensor) -> Tensor:
        """q (B, Hkv, G, nb, bq, D) for nb query blocks -> (B, Hkv, G, nb, nKB) block scores."""
        raise NotImplementedError

    def combine_group(self, scores: Tensor) -> Tensor:
        """(B, Hkv, G, nQB, nKB) -> (B, Hkv, nQB, nKB) when the group chooses together."""
        return scores.amax(dim=2)

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        batch, n_q, t_q, _dim = q.shape
        n_kv, t_k = k.shape[1], k.shape[2]
        bs, window, sinks = self.block, self.local_window, self.sinks
        n_qb, n_kb = math.ceil(t_q / bs), math.ceil(t_k / bs)
        dev = q.device

        first = (t_k - t_q) + torch.arange(n_qb, device=dev) * bs  # first query position per block
        last = torch.clamp(first + bs - 1, max=t_k - 1)
        budget = self.token_budget(last + 1)  # (nQB,)
        dense_block = budget >= last + 1
        if bool(dense_block.all()):
            return Selection.dense(batch, t_q, t_k, key_mask=ctx.key_mask, block=bs, device=dev)

        k_lo = torch.arange(n_kb, device=dev) * bs
        k_hi = torch.clamp(k_lo + bs, max=t_k)
        # a block is worth choosing if some of its keys lie behind the window of some query, past the sinks
        candidate = (k_lo[None, :] <= (last - window)[:, None]) & (k_hi[None, :] > sinks)  # (nQB, nKB)
        n_take = torch.div(budget - sinks - window, bs, rounding_mode="floor").clamp(min=0)
        n_take = torch.where(dense_block, candidate.sum(-1), torch.minimum(n_take, candidate.sum(-1)))
        k_max = int(n_take.max().item()) if n_qb else 0
        heads = n_kv if self.group == "kv" else n_q
        if k_max == 0:
            idx = torch.full((batch, heads, n_qb, 0), -1, dtype=torch.long, device=dev)
            return Selection(idx, t_q, t_k, bs, bs, sinks, window, ctx.key_mask)

        stats = self._stats(k, ctx)
        scores = self._block_scores(q, n_kv, stats)  # (B, heads, nQB, nKB)
        scores = scores.masked_fill(~candidate, float("-inf"))
        top_val, top_idx = scores.topk(k_max, dim=-1)
        keep = torch.isfinite(top_val) & (torch.arange(k_max, device=dev) < n_take[:, None])
        idx = torch.where(keep, top_idx, torch.full_like(top_idx, -1))
        return Selection(idx, t_q, t_k, bs, bs, sinks, window, ctx.key_mask)

    def _stats(self, k: Tensor, ctx: SelectContext) -> dict[str, Tensor]:
        summ = ctx.summaries
        if summ is not None and getattr(summ, "block", None) == self.block:
            return summ.get(k)
        return block_stats(k, self.block, self.block_stats)

    def _block_scores(self, q: Tensor, n_kv: int, stats: dict[str, Tensor]) -> Tensor:
        batch, n_q, t_q, dim = q.shape
        group, bs = n_q // n_kv, self.block
        n_qb = math.ceil(t_q / bs)
        n_kb = next(iter(stats.values())).shape[2]
        pad = n_qb * bs - t_q
        qg = q.float().reshape(batch, n_kv, group, t_q, dim)
        if pad:
            qg = torch.nn.functional.pad(qg, (0, 0, 0, pad))
        qg = qg.view(batch, n_kv, group, n_qb, bs, dim)
        q_valid = (torch.arange(n_qb * bs, device=q.device) < t_q).view(n_qb, bs)
        stats = {s: t.float() for s, t in stats.items()}
        per_block = 4 * batch * n_q * bs * n_kb * 2
        step = max(1, SCORE_BYTES // max(per_block, 1))
        chunks = []
        for b0 in range(0, n_qb, step):
            b1 = min(b0 + step, n_qb)
            chunks.append(self.score(qg[:, :, :, b0:b1], stats, q_valid[b0:b1]))
        scores = torch.cat(chunks, dim=3)  # (B, Hkv, G, nQB, nKB)
        if self.group == "kv":
            return self.combine_group(scores)
        return scores.reshape(batch, n_q, n_qb, n_kb)


@register
@dataclass(frozen=True)
class Quest(BlockTopK):
    name: ClassVar[str] = "quest"
    summary: ClassVar[str] = "per-channel key min/max bounds -> top-k blocks (Quest)"
    paper: ClassVar[str] = "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference (arXiv:2406.10774)"
    block_stats: ClassVar[tuple[str, ...]] = ("min", "max")

    def score(self, q: Tensor, stats: dict[str, Tensor], q_valid: Tensor) -> Tensor:
        # upper bound of q.k over a block: sum_c max(q_c * min_c, q_c * max_c)
        kmin, kmax = stats["min"][:, :, None, None], stats["max"][:, :, None, None]  # (B, Hkv, 1, 1, nKB, D)
        pos, neg = q.clamp(min=0), q.clamp(max=0)  # (B, Hkv, G, nb, bq, D)
        bound = pos @ kmax.transpose(-1, -2) + neg @ kmin.transpose(-1, -2)  # (B, Hkv, G, nb, bq, nKB)
        bound = bound.masked_fill(~q_valid[:, :, None], float("-inf"))
        return bound.amax(dim=-2)


@register
@dataclass(frozen=True)
class MoBA(BlockTopK):
    name: ClassVar[str] = "moba"
    summary: ClassVar[str] = "mean-pooled block keys vs mean query -> top-k blocks (MoBA / InfLLM)"
    paper: ClassVar[str] = "MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv:2502.13189)"
    block_stats: ClassVar[tuple[str, ...]] = ("mean",)

    def score(self, q: Tensor, stats: dict[str, Tensor], q_valid: Tensor) -> Tensor:
        weights = q_valid.float() / q_valid.sum(-1, keepdim=True).clamp(min=1)  # (nb, bq)
        q_mean = (q * weights[..., None]).sum(dim=-2)  # (B, Hkv, G, nb, D)
        return q_mean @ stats["mean"][:, :, None].transpose(-1, -2)  # (B, Hkv, G, nb, nKB)

    def combine_group(self, scores: Tensor) -> Tensor:
        return scores.mean(dim=2)
