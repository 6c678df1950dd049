"""Vertical-slash: attention mass sits on a few key columns and a few diagonals (MInference,
Jiang et al., arXiv:2407.02490).

The exact attention of the last ``last_q`` queries over all keys is cheap (O(last_q * T) per head)
and shows both: summed per key it gives *vertical* column mass, summed per offset (query - key) it
gives *slash* diagonal mass. Every query block then scores each key block by the vertical mass in it
plus the mass of the diagonals that cross it, and keeps the best blocks under the budget (with the
sinks and local window). The query blocks of the last queries, which the estimate attended exactly, also
rank blocks by those queries' own attention (``scoring.last_blocks_exact``): a needle only the question reads
is kept for it, wherever the block boundary falls in the question. In decode the one query is its own
estimate, so decode keeps the blocks with the most true attention mass (selection costs one pass of q over the
keys); ``decode=dense`` attends every key instead, as the paper decodes (``base.PhaseGated``).

Simplification: MInference's kernel takes verticals per token and slashes per diagonal; here both
are rounded to blocks (``key_block`` tokens), since a Selection addresses keys in blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..selection import Selection
from .base import BlockQuota, PrefillPattern, SelectContext, check_int, param
from .registry import register
from .scoring import block_sums, last_blocks_exact, last_query_probs, reduce_heads, slash_sums


def keep_top(x: Tensor, n: int | None) -> Tensor:
    """Zero all but the n largest entries of the last dim (None keeps all)."""
    if n is None or n >= x.shape[-1]:
        return x
    top = x.topk(n, dim=-1)
    return torch.zeros_like(x).scatter_(-1, top.indices, top.values)


def vertical_slash_scores(probs: Tensor, quota: BlockQuota, block_q: int, block_k: int,
                          vertical: int | None = None, slash: int | None = None) -> Tensor:
    """Estimated attention mass of each (query block, key block) pair from the last queries' probs.

    probs (B, H, n, Tk) -> (B, H, nQB, nKB): vertical mass inside the key block plus the mass of the
    diagonals crossing the (query block, key block) square; both normalised per query.
    """
    n, t_k = probs.shape[2], probs.shape[3]
    dev = probs.device
    v = keep_top(probs.sum(2) / n, vertical)  # (B, H, Tk) column mass
    s = keep_top(slash_sums(probs, t_k) / n, slash)  # (B, H, Tk) mass per offset o = query - key
    v_blk = block_sums(v, block_k)  # (B, H, nKB)
    cum = torch.nn.functional.pad(s.cumsum(-1), (1, 0))  # cum[o] = mass of offsets < o
    k_lo = torch.arange(quota.n_kb, device=dev) * block_k
    k_hi = torch.clamp(k_lo + block_k, max=t_k) - 1
    o_lo = (quota.first[:, None] - k_hi[None, :]).clamp(0, t_k)  # (nQB, nKB) offsets touching the square
    o_hi = (quota.last[:, None] - k_lo[None, :] + 1).clamp(0, t_k)
    flat = lambda o: o.flatten().expand(*cum.shape[:2], -1)  # noqa: E731
    crossing = (cum.gather(-1, flat(o_hi)) - cum.gather(-1, flat(o_lo))).clamp(min=0)
    return v_blk.unsqueeze(2) + crossing.view(*cum.shape[:2], quota.n_qb, quota.n_kb)


@register
@dataclass(frozen=True)
class VerticalSlash(PrefillPattern):
    name: ClassVar[str] = "vslash"
    summary: ClassVar[str] = "key columns + diagonals estimated from the last queries (MInference)"
    paper: ClassVar[str] = "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse " \
                           "Attention (arXiv:2407.02490)"

    last_q: int = param(64, "last queries whose exact attention estimates the pattern")
    vertical: int | None = param(None, "key columns kept in the estimate (default: all, weighted by mass)")
    slash: int | None = param(None, "diagonals kept in the estimate (default: all, weighted by mass)")
    exact_last: bool = param(True, "the query blocks of the last queries also rank key blocks by those "
                             "queries' exact attention (false: by the pattern estimate alone, as the paper does)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "last_q", self.last_q, minimum=1)
        for name in ("vertical", "slash"):
            if getattr(self, name) is not None:
                check_int(self, name, getattr(self, name), minimum=1)

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        probs = last_query_probs(q, k, self.last_q, ctx.softmax_scale(q), ctx.key_mask, ctx.extras)
        scores = vertical_slash_scores(probs, quota, self.block, self.block_k, self.vertical, self.slash)
        # the last queries' blocks rank key blocks by those queries' exact attention too (see last_blocks_exact)
        if self.exact_last:
            own = last_blocks_exact(probs, quota.t_q, self.block, self.block_k)
            scores[:, :, -own.shape[2]:] = torch.maximum(scores[:, :, -own.shape[2]:], own)
        return self.top_blocks(reduce_heads(scores, k.shape[1], self.group, "sum"), quota, ctx)
