"""A new selection method in one file: the key blocks whose keys have the smallest mean L2 norm.

Devoto et al. found that cached keys with a low L2 norm tend to receive high attention, and kept those
(arXiv:2406.11430, a KV press). Here the same idea chooses key blocks for every query block: query-agnostic,
so it costs one norm per key. Sinks, the local window and the budget come from ``BudgetedMethod``; the
runtime, the kernels and the eval harness need no change. ``docs/architecture.md`` walks through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from longreach import Selection, register
from longreach.methods.base import BlockQuota, BudgetedMethod, SelectContext


@register
@dataclass(frozen=True)
class KNormBlocks(BudgetedMethod):
    name: ClassVar[str] = "knormblocks"
    summary: ClassVar[str] = "key blocks with the smallest mean key norm (query-agnostic)"
    paper: ClassVar[str] = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (arXiv:2406.11430)"

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        norms = F.pad(k.float().norm(dim=-1), (0, quota.n_kb * self.block_k - k.shape[2]), value=float("nan"))
        block_norm = norms.unflatten(-1, (quota.n_kb, self.block_k)).nanmean(-1)  # (B, Hkv, nKB)
        scores = (-block_norm)[:, :, None].expand(-1, -1, quota.n_qb, -1)  # every query block ranks alike
        if self.group == "q":  # each query head reads its KV head's ranking
            scores = scores.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return self.top_blocks(scores, quota, ctx)
