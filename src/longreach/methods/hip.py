"""HiP: hierarchical top-k pruning of key ranges (Lee et al., arXiv:2406.09827).

Per query block, the candidate keys (behind the local window, past the sinks) are cut into k equal
ranges, k being the number of key blocks the budget allows. Each round splits every range in two,
scores each half by one representative key (the key at its centre) against the block's queries
(best query, best head of the group) and keeps the best k halves. After log2(T / k) rounds every
range is one key block: those k blocks are the selection. Cost per query block is O(k log T) key
reads, so selection is O(T log T) over a prefill and O(log T) per decode step; memory is O(T).

Simplification: HiP descends to a few tokens per leaf; here leaves are ``key_block`` tokens (default
16) so the result is a block Selection the kernels can gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..selection import Selection
from .base import BlockQuota, BudgetedMethod, SelectContext, param
from .registry import register
from .scoring import by_group, chunk_rows, expand_kv, grouped_scores, query_blocks


@register
@dataclass(frozen=True)
class HiP(BudgetedMethod):
    name: ClassVar[str] = "hip"
    summary: ClassVar[str] = "tree search: halve k key ranges per round, keep the best k halves (HiP)"
    paper: ClassVar[str] = "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning " \
                           "(arXiv:2406.09827)"

    key_block: int | None = param(16, "leaf size of the tree search in tokens")

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        n_kv, n_q = k.shape[1], q.shape[1]
        qb, q_valid = query_blocks(q, self.block)  # (B, Hq, nQB, bq, D)
        keys = k.float() if self.group == "kv" else expand_kv(k, n_q).float()  # (B, H, Tk, D)
        k_max = quota.k_max
        step = chunk_rows(4 * q.shape[0] * n_q * self.block * 2 * k_max)
        parts = [self._search(qb[:, :, b0 : b0 + step], q_valid[b0 : b0 + step], keys, n_kv, quota, b0)
                 for b0 in range(0, quota.n_qb, step)]
        return self.selection(torch.cat(parts, dim=2), quota, ctx)

    def _search(self, qb: Tensor, q_valid: Tensor, keys: Tensor, n_kv: int, quota: BlockQuota, b0: int) -> Tensor:
        """Tree search for query blocks [b0, b0 + nb): returns (B, H, nb, k_max) key-block ids (-1 = empty)."""
        batch, heads, t_k = keys.shape[0], keys.shape[1], keys.shape[2]
        nb = qb.shape[2]
        bk, dev = self.block_k, qb.device
        k_max = quota.k_max
        cand = quota.candidate[b0 : b0 + nb]  # (nb, nKB), a contiguous range per row
        n_cand = cand.sum(-1)
        c0 = torch.where(n_cand > 0, cand.float().argmax(-1), torch.zeros_like(n_cand))
        take = quota.n_take[b0 : b0 + nb]  # (nb,)
        # k equal ranges [lo, hi) of candidate blocks; slots past `take` stay empty
        slot = torch.arange(k_max, device=dev)
        share = lambda i: c0[:, None] + torch.div(i * n_cand[:, None], take.clamp(min=1)[:, None],  # noqa: E731
                                                  rounding_mode="floor")
        lo, hi = share(slot), share(slot + 1)
        live = slot[None, :] < take[:, None]
        lo, hi = torch.where(live, lo, 0), torch.where(live, hi, 0)
        lo = lo.expand(batch, heads, nb, k_max).clone()
        hi = hi.expand(batch, heads, nb, k_max).clone()

        queries = by_group(qb, n_kv) if self.group == "kv" else qb.unsqueeze(2)  # (B, H, G, nb, bq, D)
        while bool(((hi - lo) > 1).any()):
            mid = lo + torch.div(hi - lo + 1, 2, rounding_mode="floor")
            c_lo = torch.cat([lo, mid], dim=-1)  # (B, H, nb, 2k): left halves, then right halves
            c_hi = torch.cat([mid, hi], dim=-1)
            rep = torch.div(c_lo * bk + torch.clamp(c_hi * bk, max=t_k), 2, rounding_mode="floor")
            rep = rep.clamp(max=t_k - 1)
            rep_k = keys.gather(2, rep.flatten(2)[..., None].expand(-1, -1, -1, keys.shape[-1]))
            rep_k = rep_k.view(batch, heads, nb, 2 * k_max, -1)  # (B, H, nb, 2k, D)
            s = grouped_scores(queries, rep_k)  # (B, H, G, nb, bq, 2k)
            s = s.masked_fill(~q_valid[:, :, None], float("-inf")).amax(dim=(2, 4))  # (B, H, nb, 2k)
            s = s.masked_fill(c_hi <= c_lo, float("-inf"))
            best = s.topk(k_max, dim=-1).indices  # sorted: the first `take` are the row's keepers
            lo, hi = c_lo.gather(-1, best), c_hi.gather(-1, best)
            lo, hi = torch.where(live, lo, 0), torch.where(live, hi, 0)
        return torch.where(hi - lo == 1, lo, torch.full_like(lo, -1))
