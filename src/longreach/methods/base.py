"""What every method is: a small frozen dataclass with a name, a kind and typed parameters.

Kinds (capability flags, so runners never branch on classes):
- ``select``: decides which keys each query sees (returns a Selection);
- ``press`` and ``position``: KV-cache compression and context extension (later issues).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..configurable import Configurable, param
from ..errors import SpecError
from ..selection import Selection


@dataclass(frozen=True)
class Method(Configurable):
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")


@dataclass(frozen=True)
class SelectContext:
    """What a selector may know beyond q and k: where it is and what the cache already summarised."""

    layer_idx: int = 0
    key_mask: Tensor | None = None  # (B, Tk) bool; False = padding
    summaries: object | None = None  # cache.summaries.BlockSummaries of this layer, if the method asked


@dataclass(frozen=True)
class SelectionMethod(Method):
    """A method that answers 'which keys does each query see?'."""

    kind: ClassVar[str] = "select"
    # Statistics of each key block the method scores with; the cache keeps them incrementally for decode.
    block_stats: ClassVar[tuple[str, ...]] = ()

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        """q (B, Hq, Tq, D), k (B, Hkv, Tk, D) with queries at the last Tq key positions."""
        raise NotImplementedError


@dataclass(frozen=True)
class BudgetedMethod(SelectionMethod):
    """Shared budget vocabulary: ``budget`` keys per query, or ``density`` of the causal keys.

    Sinks and the local window are always kept and count toward the budget; a budget that covers
    all causal keys of a query block makes that block exactly dense.
    """

    budget: int | None = param(None, "keys each query sees (tokens, sinks and window included)")
    density: float | None = param(None, "fraction of the causal keys each query sees, in (0, 1]")
    block: int = param(64, "block size in tokens (queries and keys)")
    sinks: int = param(4, "first tokens every query sees (attention sinks)")
    window: int | None = param(None, "most recent tokens every query sees (default: one block)")

    default_budget: ClassVar[int | None] = 2048

    def __post_init__(self) -> None:
        check_int(self, "block", self.block, minimum=1)
        check_int(self, "sinks", self.sinks, minimum=0)
        if self.window is not None:
            check_int(self, "window", self.window, minimum=1)
        if self.budget is not None and self.density is not None:
            raise SpecError(f"{self.name}: give budget= or density=, not both")
        if self.budget is not None:
            check_int(self, "budget", self.budget, minimum=1)
            if self.budget < self.sinks + self.local_window:
                raise SpecError(
                    f"{self.name}: budget={self.budget} is smaller than the always-kept sinks + window "
                    f"({self.sinks} + {self.local_window}); raise budget or lower sinks/window"
                )
        if self.density is not None and not (isinstance(self.density, float | int) and 0 < self.density <= 1):
            raise SpecError(f"{self.name}: density must be in (0, 1], got {self.density!r}")

    @property
    def local_window(self) -> int:
        return self.window if self.window is not None else self.block

    def token_budget(self, causal_keys: Tensor) -> Tensor:
        """Keys allowed per query block, given how many causal keys its last query has."""
        if self.density is not None:
            return (causal_keys.double() * self.density).floor().long()
        budget = self.budget if self.budget is not None else self.default_budget
        return causal_keys.new_full(causal_keys.shape, budget if budget is not None else 2**62)


def check_int(method: Method, field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{method.name}: {field} must be an integer >= {minimum}, got {value!r}")
