"""Squeezed Attention: cluster the keys once, let queries look up centroids first (Hooper et al.,
arXiv:2411.09688).

At prefill the keys of each KV head are grouped by k-means into fine clusters, and the fine centroids
into coarse clusters (``fanout`` fine per coarse). A query block scores the coarse centroids, keeps
the best coarse clusters holding twice its block budget, scores the fine centroids inside them, and
keeps the key blocks of the best fine clusters up to the budget. The clustering is stored in the
layer's state and reused for every decode step; blocks completed during decode join their nearest
fine centroid.

Simplification: the paper clusters single keys; here the clustered items are key blocks (their mean
key), since a Selection addresses keys in blocks. The last chosen cluster may be cut by the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..selection import Selection
from .base import BlockQuota, BudgetedMethod, SelectContext, check_int, param
from .kmeans import kmeans, nearest
from .registry import register
from .scoring import by_group, group_heads, query_blocks


@register
@dataclass(frozen=True)
class Squeezed(BudgetedMethod):
    name: ClassVar[str] = "squeezed"
    summary: ClassVar[str] = "k-means of key blocks, coarse then fine centroid lookup (Squeezed Attention)"
    paper: ClassVar[str] = "Squeezed Attention: Accelerating Long Context Length LLM Inference (arXiv:2411.09688)"
    block_stats: ClassVar[tuple[str, ...]] = ("mean",)

    cluster_blocks: int = param(4, "key blocks per fine cluster, on average")
    fanout: int = param(4, "fine clusters per coarse cluster, on average")
    iters: int = param(10, "k-means iterations (at most)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("cluster_blocks", "fanout", "iters"):
            check_int(self, name, getattr(self, name), minimum=1)

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        batch, n_q = q.shape[:2]
        n_kv, dim = k.shape[1], k.shape[-1]
        means = self.key_stats(k, ctx, ("mean",))["mean"].float()  # (B, Hkv, nKB, D)
        flat = means.reshape(batch * n_kv, quota.n_kb, dim)
        tree = ctx.state.get("squeezed")
        if q.shape[2] > 1 or tree is None or tree[0].shape[0] != batch * n_kv or tree[2] > quota.n_kb:
            tree = self._cluster(flat)
            ctx.state["squeezed"] = tree
        fine_c, coarse_c, n_done, fine_of, coarse_of_fine = tree
        if n_done < quota.n_kb:  # blocks completed since prefill join their nearest fine centroid
            fine_of = torch.cat([fine_of, nearest(flat[:, n_done:], fine_c)], dim=1)

        qb, q_valid = query_blocks(q, self.block)  # (B, Hq, nQB, bq, D)
        qg = by_group(qb, n_kv)  # (B, Hkv, G, nQB, bq, D)
        fine_s = self._centroid_scores(qg, fine_c.view(batch, n_kv, -1, dim), q_valid)
        coarse_s = self._centroid_scores(qg, coarse_c.view(batch, n_kv, -1, dim), q_valid)
        heads = fine_s.shape[1]
        fine_of = fine_of.view(batch, n_kv, -1)
        coarse_of_fine = coarse_of_fine.view(batch, n_kv, -1)
        if heads != n_kv:  # group=q: every query head scores its KV head's clusters
            fine_of = fine_of.repeat_interleave(n_q // n_kv, dim=1)
            coarse_of_fine = coarse_of_fine.repeat_interleave(n_q // n_kv, dim=1)
        # coarse clusters, best first, until they hold twice the block budget of choosable blocks
        coarse_of_block = coarse_of_fine.gather(-1, fine_of).unsqueeze(2).expand(-1, -1, quota.n_qb, -1)
        size = torch.zeros_like(coarse_s).scatter_add_(  # (B, H, nQB, C2): candidate blocks per cluster
            -1, coarse_of_block, quota.candidate.float().expand(batch, heads, -1, -1))
        order = coarse_s.sort(dim=-1, descending=True).indices  # (B, H, nQB, C2)
        held = size.gather(-1, order)
        before = held.cumsum(-1) - held
        keep_sorted = before < 2 * quota.n_take.view(1, 1, -1, 1)
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        fine_s = fine_s.masked_fill(~keep.gather(-1, coarse_of_fine.unsqueeze(2).expand(-1, -1, quota.n_qb, -1)),
                                    float("-inf"))
        scores = fine_s.gather(-1, fine_of.unsqueeze(2).expand(-1, -1, quota.n_qb, -1))  # (B, H, nQB, nKB)
        return self.top_blocks(scores, quota, ctx)

    def _cluster(self, flat: Tensor) -> tuple[Tensor, Tensor, int, Tensor, Tensor]:
        n_blocks = flat.shape[1]
        n_fine = max(1, math.ceil(n_blocks / self.cluster_blocks))
        fine_c, fine_of = kmeans(flat, n_fine, self.iters)
        coarse_c, coarse_of_fine = kmeans(fine_c, max(1, math.ceil(n_fine / self.fanout)), self.iters)
        return fine_c, coarse_c, n_blocks, fine_of, coarse_of_fine

    def _centroid_scores(self, qg: Tensor, centroids: Tensor, q_valid: Tensor) -> Tensor:
        """Best query of each block against each centroid: (B, Hkv, G, nQB, bq, D) -> (B, H, nQB, C)."""
        s = qg @ centroids[:, :, None, None].transpose(-1, -2)  # (B, Hkv, G, nQB, bq, C)
        s = s.masked_fill(~q_valid[..., None], float("-inf")).amax(-2)  # (B, Hkv, G, nQB, C)
        return group_heads(s, self.group, "max")
