"""Procedures: methods that replace how the prompt becomes the KV cache (the prefill), not the attention.

A procedure (HOMER) builds the cache for decoding itself, so the cache may hold fewer tokens than the prompt and
its positions are the procedure's own. ``longreach.generate`` runs ``prefill`` instead of the model's forward
when one is applied; ``apply`` refuses plain forwards of prompts the procedure would have changed, so
``model.generate()`` cannot silently run the dense prefill instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from ..methods.base import Method


@dataclass(frozen=True, eq=False)
class Prefilled:
    """What a procedure's prefill leaves: the next-token logits of the prompt; the cache it was given is filled."""

    logits: Tensor  # (1, 1, V)
    length: int  # tokens in every layer of the cache
    tokens: Tensor  # (length,) prompt index of each cached row, in cache order
    positions: Tensor  # (length,) position id each cached row was rotated at
    trace: tuple = field(default=())  # procedure-specific record of what it did (HOMER: its reductions)


@dataclass(frozen=True)
class ProcedurePlan:
    """A procedure's memory, in tokens (``longreach plan`` multiplies by bytes per token)."""

    kv_peak: int  # token-layers of KV at the worst moment of the prefill
    kv_final: int  # token-layers of the cache decoding starts from
    waiting_rows: int  # most hidden-state rows held besides the chunk being run
    forward_max: int  # the longest sequence one layer forward sees
    notes: tuple[str, ...] = ()
    ranking_rows: int = 1  # rows whose float32 attention over the longest chunk, per head, ranks its tokens


@dataclass(frozen=True)
class Procedure(Method):
    kind: ClassVar[str] = "procedure"

    def prefill(self, model: nn.Module, input_ids: Tensor, cache: object) -> Prefilled:
        """Read ``input_ids`` (1, n) into ``cache`` (a transformers cache, filled with ``update``)."""
        raise NotImplementedError

    def replaces(self, model: nn.Module, tokens: int) -> bool:
        """Whether a prompt of ``tokens`` would differ from the model's own prefill under this procedure."""
        raise NotImplementedError

    def plan(self, model: nn.Module, tokens: int) -> ProcedurePlan:
        raise NotImplementedError
