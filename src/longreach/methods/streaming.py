"""StreamingLLM: attention sinks plus a sliding window of recent tokens (Xiao et al., 2023)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..errors import SpecError
from ..selection import Selection
from .base import SelectContext, SelectionMethod, check_fraction, check_int, param
from .registry import register


@register
@dataclass(frozen=True)
class Streaming(SelectionMethod):
    name: ClassVar[str] = "streaming"
    summary: ClassVar[str] = "attention sinks + sliding window (StreamingLLM)"
    paper: ClassVar[str] = "Efficient Streaming Language Models with Attention Sinks (arXiv:2309.17453)"

    sinks: int = param(4, "first tokens every query sees")
    window: int | None = param(None, "most recent tokens every query sees (default 1024)")
    budget: int | None = param(None, "sinks + window in tokens (alternative to window)")
    density: float | None = param(None, "sinks + window as a fraction of the input length")
    block: int = param(64, "query block size of the kernel (does not change the result)")

    def __post_init__(self) -> None:
        check_int(self, "sinks", self.sinks, minimum=0)
        check_int(self, "block", self.block, minimum=1)
        given = [n for n in ("window", "budget", "density") if getattr(self, n) is not None]
        if len(given) > 1:
            raise SpecError(f"streaming: give only one of window=, budget=, density= (got {', '.join(given)})")
        if self.window is not None:
            check_int(self, "window", self.window, minimum=1)
        if self.budget is not None:
            check_int(self, "budget", self.budget, minimum=self.sinks + 1)
        check_fraction(self, "density", self.density)

    def window_for(self, kv_len: int) -> int:
        if self.window is not None:
            return self.window
        if self.budget is not None:
            return self.budget - self.sinks
        if self.density is not None:
            return max(1, math.floor(self.density * kv_len) - self.sinks)
        return 1024

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        kv_len = k.shape[2]
        return Selection.local(
            q.shape[0], q.shape[2], kv_len, sinks=self.sinks, window=self.window_for(kv_len),
            key_mask=ctx.key_mask, block=self.block, device=q.device,
        )
