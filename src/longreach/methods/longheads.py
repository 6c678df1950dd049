"""LongHeads: every head picks its own chunks, so the heads jointly cover the input (Lu et al.,
arXiv:2402.10685).

Each query head scores every chunk (``block`` tokens) by its queries against one representative key
of the chunk and attends to its best chunks plus the first chunk and the local one; different heads
pick different chunks, so together they read far more than any one of them. The representative is
the chunk's keys averaged with the attention weights of their own mean (a cheap version of
LongHeads' attention-pooled chunk key), kept incrementally for decode.

Simplifications: chunks are chosen per query block (best query of the block), not per token; keys
keep their original positions (LongHeads also re-maps positions into the trained window, which is
context extension, see the position methods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .base import SelectContext, param
from .blocktopk import BlockTopK
from .registry import register


@register
@dataclass(frozen=True)
class LongHeads(BlockTopK):
    name: ClassVar[str] = "longheads"
    summary: ClassVar[str] = "each query head picks its own top chunks by a pooled chunk key (LongHeads)"
    paper: ClassVar[str] = "LongHeads: Multi-Head Attention is Secretly a Long Context Processor (arXiv:2402.10685)"
    block_stats: ClassVar[tuple[str, ...]] = ("pooled",)

    sinks: int = param(64, "first tokens every query sees (LongHeads always keeps the first chunk)")
    group: str = param("q", "q: each query head picks its chunks (LongHeads); kv: heads of a KV group agree")

    def score(self, q: Tensor, stats: dict[str, Tensor], q_valid: Tensor, candidate: Tensor, ctx: SelectContext
              ) -> Tensor:
        rep = stats["pooled"][:, :, None, None]  # (B, Hkv, 1, 1, nKB, D)
        s = q @ rep.transpose(-1, -2)  # (B, Hkv, G, nb, bq, nKB)
        return s.masked_fill(~q_valid[:, :, None], float("-inf")).amax(dim=-2)
