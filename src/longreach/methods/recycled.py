"""Recycled Attention: decode with a full step every N tokens, reusing its top keys in between
(Xu et al., arXiv:2411.05787).

A full-attention decode step also tells which key blocks received the most attention; the next
``every - 1`` steps attend only to those blocks (plus sinks and the local window, which moves with
the new tokens). Prefill is dense, as in the paper. The key set is per layer and per head group and
lives in the layer's state, so it is dropped when a new sequence starts.

Simplification: the recycled set is chosen per key block (``key_block`` tokens), not per token; the
paper's query-similarity schedule for full steps is not implemented (fixed stride).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..selection import Selection
from .base import BudgetedMethod, SelectContext, check_int, param
from .registry import register
from .scoring import block_sums, last_query_probs, reduce_heads


@register
@dataclass(frozen=True)
class Recycled(BudgetedMethod):
    name: ClassVar[str] = "recycled"
    summary: ClassVar[str] = "decode: full attention every N steps, its top blocks reused in between"
    paper: ClassVar[str] = "Recycled Attention: Efficient inference for long-context language models " \
                           "(arXiv:2411.05787)"
    phases: ClassVar[tuple[str, ...]] = ("decode",)

    every: int = param(8, "decode steps per full-attention step (1 = always full)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "every", self.every, minimum=1)

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        batch, t_q, t_k = q.shape[0], q.shape[2], k.shape[2]
        full = Selection.dense(batch, t_q, t_k, key_mask=ctx.key_mask, block=self.block, device=q.device)
        if t_q > 1:  # prefill (or a multi-token extension): dense, and the next decode step starts full
            ctx.state.pop("recycled", None)
            return full
        quota = self.quota(q, k)
        if quota.dense:
            return full
        step, blocks = ctx.state.get("recycled", (0, None))
        heads = self.heads(q, k)
        if blocks is None or step % self.every == 0 or blocks.shape[:2] != (batch, heads):
            probs = last_query_probs(q, k, 1, ctx.softmax_scale(q), ctx.key_mask, ctx.extras)  # (B, Hq, 1, Tk)
            mass = reduce_heads(block_sums(probs, self.block_k), k.shape[1], self.group, "sum")
            blocks = self.top_blocks(mass, quota, ctx).indices
            ctx.state["recycled"] = (step + 1, blocks)
            return full
        ctx.state["recycled"] = (step + 1, blocks)
        return self.selection(blocks, quota, ctx)
