"""Full causal attention through longreach's path: the baseline every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..selection import Selection
from .base import SelectContext, SelectionMethod
from .registry import register


@register
@dataclass(frozen=True)
class Dense(SelectionMethod):
    name: ClassVar[str] = "dense"
    summary: ClassVar[str] = "every causal key (exact baseline)"

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        return Selection.dense(q.shape[0], q.shape[2], k.shape[2], key_mask=ctx.key_mask, device=q.device)
