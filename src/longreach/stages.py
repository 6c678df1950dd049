"""The protocols of the staged attention runtime, below every method family so each family can implement them.

Per attention call the runtime (``longreach.runtime``) runs, in this fixed order:

    position map (re-rotate / remap q, k)  ->  selector (a Selection)  ->  kernel (attend)
      ->  cache policy (presses and head policies: what the layer's cache keeps)
      ->  output hooks (ablation / calibration, observers, density accounting)

A method takes part in a stage by being of its kind and declaring it on its class (``Method.kind``,
``SelectionMethod.rewrites_output``, ``Method.cache_policy``); the runtime never probes objects for
attributes. A new method is one file in its family: nobody edits the runtime to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor

from .selection import Selection


@dataclass
class LayerCall:
    """One attention call of one layer, as the stages see it (q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D))."""

    layer_idx: int
    n_layers: int
    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    kernel: str  # the handle's kernel name (kernels.attend)
    cache: object | None = None  # the forward's transformers cache (None: use_cache=False)
    state: dict = field(default_factory=dict)  # the cache policy's per-layer scratch for this sequence
    # density accounting for head-split attention: (selection, query heads it served, tokens seen)
    record: Callable[[Selection, int, int], None] | None = None
    softcap: float | None = None  # Gemma 2: scores pass through cap * tanh(s / cap) (kernels.attend)
    sinks: Tensor | None = None  # GPT-OSS: one learned sink logit per query head, (Hq,) (kernels.attend)

    @property
    def t_q(self) -> int:
        return self.q.shape[2]

    @property
    def cache_layers(self) -> list | None:
        """The cache's per-layer list (transformers' ``Cache.layers``), or None without one."""
        return getattr(self.cache, "layers", None)


class CachePolicy(Protocol):
    """Presses and head policies alike: what each layer's KV cache keeps, applied after attention.

    ``attend`` lets a policy whose heads hold different keys (duo, razor, headkv) attend its parts itself;
    returning None means "the runtime's selector + kernel path". ``after_forward`` shrinks the layer's
    cache and says whether the stored keys changed (block summaries kept beside them are then rebuilt).
    ``kept_tokens`` is the stored tokens per KV head (averaged over heads) once ``seen`` tokens arrived:
    what ``longreach plan`` counts.
    """

    name: str

    def attend(self, call: LayerCall) -> Tensor | None: ...

    def after_forward(self, call: LayerCall) -> bool: ...

    def kept_tokens(self, layer_idx: int, n_layers: int, seen: int, n_kv: int) -> float: ...
