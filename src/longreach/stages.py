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
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

from .selection import Selection


@dataclass(frozen=True, eq=False)
class SoftmaxExtras:
    """What joins a model's attention softmax besides q.k: Gemma 2's logit softcap and GPT-OSS's learned sink
    logits. The kernels compute both; every method that computes attention probabilities itself (to score keys
    by mass, to recompute a head) gets them here, so its softmax is the model's. The default is a plain softmax.
    """

    softcap: float | None = None  # scores pass through cap * tanh(s / cap) before the softmax
    sinks: Tensor | None = None  # (Hq,): one logit per query head in the denominator that attends to nothing

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.sinks is None

    def cap(self, logits: Tensor) -> Tensor:
        """Scaled q.k logits as the model's softmax sees them (softcapped: monotone, so rankings survive)."""
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)

    def heads(self, index: Tensor | list[int] | slice) -> SoftmaxExtras:
        """The extras of a subset of query heads (a head split, calibrated heads): the sinks follow their heads."""
        return self if self.sinks is None else replace(self, sinks=self.sinks[index])


PLAIN = SoftmaxExtras()


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
    # DeepSeek-V3's multi-head latent attention: the cache holds one latent per token, k/v are its expanded heads
    latent: bool = False
    # the selector stage's time, for a policy that runs a selector on its own split of the heads (seconds)
    count_select: Callable[[float], None] | None = None

    @property
    def t_q(self) -> int:
        return self.q.shape[2]

    @property
    def extras(self) -> SoftmaxExtras:
        """The softcap and sinks as one value, for the policies' own attention probabilities."""
        return SoftmaxExtras(self.softcap, self.sinks)

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
    what ``longreach plan`` counts. ``stores_only`` marks a policy that keeps every key it is given and changes
    only how they are held (``kvquant``): it may follow one press or head policy in a spec, and runs after it;
    such a policy may also say how many bytes a layer's stored tokens take (``stored_bytes(tokens, n_kv,
    head_dim, dtype)``), which ``plan`` then counts instead of the full width. ``attends_codes`` marks the one
    whose decode steps read a quantized cache's codes (kvquant); a policy whose ``after_forward`` reads every stored
    key at decode steps says so with ``reads_decode_keys``, and a stack holding one attends dequantized keys.
    """

    name: str
    stores_only: bool
    # a decode step may attend a quantized cache from its codes (kvquant, and no policy in the stack that reads
    # every stored key while decoding): the runtime then arms the layer so its update skips dequantizing
    attends_codes: bool
    reads_decode_keys: bool  # after_forward reads every stored key at decode steps (h2o's history)
    # the runtime holds a prompt's last token back, so the first answer token reads the shrunk cache; False: the
    # whole prompt attends every key and the cache shrinks after (a press's ``hold=false``, SnapKV's own order)
    holds_last: bool

    def attend(self, call: LayerCall) -> Tensor | None: ...

    def after_forward(self, call: LayerCall) -> bool: ...

    def kept_tokens(self, layer_idx: int, n_layers: int, seen: int, n_kv: int) -> float: ...


class StackedPolicy:
    """Cache policies run as one, in order (a press, then ``kvquant``): the first that attends its own parts
    attends; after each forward every policy acts on what the previous one left."""

    def __init__(self, policies: list[CachePolicy]) -> None:
        self.policies = tuple(policies)
        self.name = "+".join(p.name for p in policies)
        self.stores_only = all(p.stores_only for p in policies)
        # kvquant attends its codes unless a policy before it reads every stored key while decoding (h2o's history)
        self.attends_codes = any(p.attends_codes for p in policies) and not any(p.reads_decode_keys for p in policies)
        self.reads_decode_keys = any(p.reads_decode_keys for p in policies)
        self.holds_last = all(p.holds_last for p in policies)
        storing = [p.stored_bytes for p in policies if hasattr(p, "stored_bytes")]
        if storing:  # how the last storing policy (kvquant) holds what the others keep: what ``plan`` counts
            self.stored_bytes = storing[-1]

    def attend(self, call: LayerCall) -> Tensor | None:
        for policy in self.policies:
            out = policy.attend(call)
            if out is not None:
                return out
        return None

    def after_forward(self, call: LayerCall) -> bool:
        changed = False
        for policy in self.policies:
            changed = policy.after_forward(call) or changed
        return changed

    def kept_tokens(self, layer_idx: int, n_layers: int, seen: int, n_kv: int) -> float:
        return min(p.kept_tokens(layer_idx, n_layers, seen, n_kv) for p in self.policies)


def stack_policies(policies: list[CachePolicy]) -> CachePolicy | None:
    """One policy for a spec's cache policies: the ones choosing keys first, then those that only store them."""
    ordered = [p for p in policies if not p.stores_only] + [p for p in policies if p.stores_only]
    if len(ordered) < 2:
        return ordered[0] if ordered else None
    return StackedPolicy(ordered)
