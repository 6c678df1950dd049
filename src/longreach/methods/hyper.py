"""HyperAttention-style selection: LSH buckets plus uniformly sampled columns (Han et al., arXiv:2310.05869).

Queries and keys are hashed with ``bits`` random hyperplanes (angular LSH), so a query and a key
with a large inner product likely share a bucket. A query block scores each key block by how many
(query, key) pairs collide, keeps the most colliding blocks (the heavy entries), and fills a
``sample`` share of its budget with key blocks drawn uniformly at random (HyperAttention's sampled
columns). Hashing is O(T * bits * D) and scoring O(T^2 / block^2 * 2^bits).

Simplifications: HyperAttention sorts by hash and attends within equal-size blocks of the sorted
order and uses the samples to estimate the residual; here collisions are counted per (query block,
key block) pair and sampled blocks are attended exactly. Hyperplanes and samples are seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import SpecError
from ..selection import Selection
from .base import BlockQuota, BudgetedMethod, SelectContext, check_int, param
from .registry import register
from .scoring import block_sums, by_group, group_heads, grouped_scores, query_blocks


def bucket_histograms(x: Tensor, planes: Tensor, block: int, valid: Tensor | None = None) -> Tensor:
    """Bucket counts per block: x (B, H, T, D) -> (B, H, ceil(T/block), 2^bits)."""
    bits = planes.shape[-1]
    codes = ((x.float() @ planes) > 0).long() @ (2 ** torch.arange(bits, device=x.device))  # (B, H, T)
    onehot = torch.nn.functional.one_hot(codes, 2**bits).float()  # (B, H, T, 2^bits)
    if valid is not None:
        onehot = onehot * valid[..., None]
    return block_sums(onehot.transpose(-1, -2), block).transpose(-1, -2)


@register
@dataclass(frozen=True)
class Hyper(BudgetedMethod):
    name: ClassVar[str] = "hyper"
    summary: ClassVar[str] = "LSH collisions between query and key blocks + sampled blocks (HyperAttention)"
    paper: ClassVar[str] = "HyperAttention: Long-context Attention in Near-Linear Time (arXiv:2310.05869)"

    bits: int = param(6, "random hyperplanes per hash (2^bits buckets)")
    sample: float = param(0.25, "share of the block budget filled with uniformly sampled key blocks")
    seed: int = param(0, "seed of the hyperplanes and the samples")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "bits", self.bits, minimum=1)
        if self.bits > 12:
            raise SpecError(f"hyper: bits must be <= 12 (2^bits buckets), got {self.bits}")
        if not (isinstance(self.sample, float | int) and 0 <= self.sample <= 1):
            raise SpecError(f"hyper: sample must be in [0, 1], got {self.sample!r}")
        check_int(self, "seed", self.seed, minimum=0)

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        t_q, dim = q.shape[2], q.shape[3]
        n_kv = k.shape[1]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx)
        planes = torch.randn(dim, self.bits, generator=gen).to(q.device)
        _, q_valid = query_blocks(q, self.block)
        hq = bucket_histograms(q, planes, self.block, q_valid.flatten()[:t_q].float())  # (B, Hq, nQB, nb)
        hk = bucket_histograms(k, planes, self.block_k)  # (B, Hkv, nKB, nb)
        if ctx.key_mask is not None:
            hk = hk * block_sums(ctx.key_mask.float(), self.block_k)[:, None, :, None].clamp(max=1)
        collide = grouped_scores(by_group(hq, n_kv), hk)  # (B, Hkv, G, nQB, nKB)
        collide = group_heads(collide, self.group, "sum")
        collide = collide.masked_fill(~quota.candidate, 0)

        n_heavy = (quota.n_take.double() * (1 - self.sample)).ceil().long()  # (nQB,)
        heavy = self.top_blocks(collide.masked_fill(collide <= 0, float("-inf")), quota, ctx, n_take=n_heavy)
        slot = torch.where(heavy.indices >= 0, heavy.indices, quota.n_kb)  # empty slots land in a spare column
        chosen = torch.zeros(*collide.shape[:-1], quota.n_kb + 1, device=q.device)
        chosen = chosen.scatter_(-1, slot, 1.0)[..., : quota.n_kb]
        noise = torch.rand(collide.shape, generator=gen).to(q.device)  # uniform samples fill the rest
        return self.top_blocks(chosen * 2 + noise, quota, ctx)
