"""Loki: rank keys by scores in a low-rank PCA subspace of key space (Singhania et al., arXiv:2406.02542).

Keys of a head lie close to a low-dimensional subspace, so q.k projected onto the top ``rank``
principal directions ranks keys almost as the full product does, at rank/D of the cost. Each query
block keeps the key blocks holding its highest approximate scores (best query, best key of the
block), then attends to them exactly.

Simplification: Loki computes the principal directions offline on a calibration set; here they are
computed per layer and KV head from the prompt's own keys at prefill and reused for every decode
step of that sequence. Prefill selection is still O(T^2 * rank) (1/(D/rank) of the attention FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..selection import Selection
from .base import BlockQuota, BudgetedMethod, SelectContext, check_int, param
from .registry import register
from .scoring import by_group, chunk_rows, group_heads, grouped_scores, query_blocks


def principal_directions(keys: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors of each head's key second-moment matrix: (B, H, T, D) -> (B, H, D, rank)."""
    kf = keys.float()
    moment = kf.transpose(-1, -2) @ kf / max(keys.shape[2], 1)
    _, vecs = torch.linalg.eigh(moment)  # ascending eigenvalues
    return vecs[..., -rank:].flip(-1)


@register
@dataclass(frozen=True)
class Loki(BudgetedMethod):
    name: ClassVar[str] = "loki"
    summary: ClassVar[str] = "q.k in the keys' top PCA directions -> top blocks (Loki)"
    paper: ClassVar[str] = "Loki: Low-rank Keys for Efficient Sparse Attention (arXiv:2406.02542)"

    rank: int = param(16, "principal directions the keys are scored in")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "rank", self.rank, minimum=1)

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        batch, n_q, t_q, dim = q.shape
        n_kv, t_k = k.shape[1], k.shape[2]
        rank = min(self.rank, dim)
        basis = ctx.state.get("loki")
        if t_q > 1 or basis is None or basis.shape != (batch, n_kv, dim, rank):
            basis = principal_directions(k, rank)
            ctx.state["loki"] = basis
        k_low = k.float() @ basis  # (B, Hkv, Tk, r)
        qb, q_valid = query_blocks(q, self.block)
        q_low = by_group(qb, n_kv) @ basis[:, :, None, None]  # (B, Hkv, G, nQB, bq, r)
        bs, bk = q_valid.shape[1], self.block_k  # rows per query block as scored (fewer than block in decode)
        pad = quota.n_kb * bk - t_k
        j = torch.arange(t_k, device=q.device)
        step = chunk_rows(4 * batch * n_q * bs * t_k * 2)
        parts = []
        for b0 in range(0, quota.n_qb, step):
            b1 = min(b0 + step, quota.n_qb)
            s = grouped_scores(q_low[:, :, :, b0:b1], k_low)  # (B, Hkv, G, nb, bq, Tk)
            pos = (t_k - t_q) + torch.arange(b0 * bs, b1 * bs, device=q.device).view(b1 - b0, bs, 1)
            s = s.masked_fill((j > pos) | ~q_valid[b0:b1, :, None], float("-inf")).amax(-2)  # (B,Hkv,G,nb,Tk)
            s = torch.nn.functional.pad(s, (0, pad), value=float("-inf"))
            parts.append(s.view(*s.shape[:-1], quota.n_kb, bk).amax(-1))
        scores = torch.cat(parts, dim=3)  # (B, Hkv, G, nQB, nKB)
        scores = group_heads(scores, self.group, "max")
        return self.top_blocks(scores, quota, ctx)
