"""What every press is: score each cached key, keep the best ``capacity`` per KV head, free the rest.

A press runs after every forward that feeds several tokens (the prompt, or each chunk of it) and,
with ``every=N``, after every N-th decode step. It sees an ``Observation`` of one layer and returns a
score per stored key; the shared ``keep_indices`` protects the sinks and the recent window, keeps
exactly ``capacity`` keys per head and returns them in their original order (their RoPE positions are
baked into the cached keys, so order and positions survive). Scores are per KV head: query heads of a
group are combined on their own scores, never by expanding K/V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..configurable import param
from ..methods.base import Method, check_budget, check_int
from ..methods.scoring import causal_probs, chunk_rows
from ..stages import PLAIN, CachePolicy, LayerCall, SoftmaxExtras
from .compressed import CompressedLayer, shrinkable_layer
from .quantized import QuantizedLayer, stored_keys


@dataclass
class Observation:
    """One layer as a press sees it, right after a forward."""

    layer_idx: int
    n_layers: int
    seen: int  # tokens the layer has been given (the logical length)
    queries: Tensor  # (B, Hq, w, D) the most recent queries, post-RoPE; query i is at stored key n - w + i
    keys: Tensor  # (B, Hkv, n, D) stored keys, post-RoPE
    values: Tensor  # (B, Hkv, n, D)
    scale: float
    history: Tensor | None = None  # (B, Hkv, n) attention every past query paid each key (presses asking for it)
    # the model's softmax beyond q.k (softcap, learned sinks per query head): scores use the true probabilities,
    # so a query whose sink absorbs most of its attention votes little
    extras: SoftmaxExtras = PLAIN
    # one choice for every head: multi-head latent attention (DeepSeek-V3) caches one latent per token, shared by
    # all heads, so keys/values here are the heads expanded from it and the heads' scores are averaged
    shared: bool = False

    def per_cache_head(self, scores: Tensor) -> Tensor:
        """(B, H, n) scores as the cache holds heads: averaged to (B, 1, n) when one latent serves them all."""
        return scores.mean(dim=1, keepdim=True) if self.shared else scores


@dataclass(frozen=True)
class Press(Method):
    """Budget vocabulary shared by presses: ``budget`` keys per head, or ``density`` of the tokens seen."""

    kind: ClassVar[str] = "press"
    budget: int | None = param(None, "keys each KV head keeps (tokens, sinks and window included)")
    density: float | None = param(None, "fraction of the tokens seen that each KV head keeps, in (0, 1]")
    sinks: int = param(4, "first tokens always kept (attention sinks)")
    window: int | None = param(None, "most recent tokens always kept (default: the press's own)")
    every: int | None = param(None, "also compress every N decode steps; 0: only after forwards of several tokens "
                                    "(default: 1 for presses that evict while decoding, else 0)")
    hold: bool = param(True, "hold the prompt's last token back so the first answer token reads the compressed "
                             "cache; false: the whole prompt attends every key and the cache is compressed after "
                             "(SnapKV's order: the first answer token is dense's)")

    default_window: ClassVar[int] = 0
    default_every: ClassVar[int] = 0
    observe: ClassVar[int] = 1  # recent queries the press scores with
    wants_history: ClassVar[bool] = False  # accumulate every query's attention (H2O)

    def __post_init__(self) -> None:
        check_int(self, "sinks", self.sinks, minimum=0)
        if self.window is not None:
            check_int(self, "window", self.window, minimum=0)
        if self.every is not None:
            check_int(self, "every", self.every, minimum=0)
        check_budget(self, self.budget, self.density, self.sinks, self.recent, required=True)

    @property
    def recent(self) -> int:
        return self.window if self.window is not None else self.default_window

    @property
    def interval(self) -> int:
        return self.every if self.every is not None else self.default_every

    def capacity(self, layer_idx: int, n_layers: int, seen: int) -> int:
        """Keys each KV head of this layer keeps once ``seen`` tokens have arrived."""
        if self.budget is not None:
            return self.budget
        return max(math.floor(self.density * seen), self.sinks + self.recent, 1)

    def scores(self, obs: Observation) -> Tensor:
        """(B, Hkv, n): higher = keep."""
        raise NotImplementedError

    def cache_policy(self, owner: object) -> CachePolicy:
        return PressPolicy(self, owner)

    def keep_indices(self, obs: Observation, capacity: int) -> Tensor | None:
        """Stored positions to keep per head (B, Hkv, capacity), ascending; None when all fit."""
        n = obs.keys.shape[2]
        if capacity >= n:
            return None
        scores = obs.per_cache_head(self.scores(obs).float())
        return top_keep(scores, capacity, self.sinks, self.recent)


def top_keep(scores: Tensor, capacity: int, sinks: int, recent: int) -> Tensor:
    """Top ``capacity`` positions per row of (B, H, n) scores, sinks and the last ``recent`` forced in, ascending."""
    n = scores.shape[-1]
    pos = torch.arange(n, device=scores.device)
    protect = (pos < sinks) | (pos >= n - recent)
    scores = scores.masked_fill(protect, float("inf")).nan_to_num(nan=float("-inf"))
    return scores.topk(capacity, dim=-1).indices.sort(dim=-1).values


def window_probs(obs: Observation) -> Tensor:
    """Causal softmax of the observed queries over the stored keys, grouped: (B, Hkv, G, w, n), fp32 (the model's
    softmax: softcapped, the learned sinks taking their share)."""
    return causal_probs(obs.queries, obs.keys, obs.scale, extras=obs.extras)


def attention_received(q: Tensor, k: Tensor, scale: float, extras: SoftmaxExtras = PLAIN) -> Tensor:
    """Attention mass each key received from every query of ``q`` (the last t_q of the keys), summed over
    queries and the query heads of its group: (B, Hkv, n), fp32. O(t_q * n) per head, in row chunks. With
    learned sinks the true shares are summed: a query whose sink takes most of its attention adds little."""
    batch, n_q, t_q, _ = q.shape
    n_kv, n = k.shape[1], k.shape[2]
    total = torch.zeros(batch, n_kv, n, dtype=torch.float32, device=q.device)
    rows = chunk_rows(4 * n * n_q * batch)
    for lo in range(0, t_q, rows):
        total += causal_probs(q, k, scale, torch.arange(lo, min(lo + rows, t_q), device=q.device),
                              extras=extras).sum(dim=(2, 3))
    return total


class PressPolicy:
    """A press as the runtime's cache policy: after each forward, track what the press scores with and shrink
    the layer's cache to its capacity when due (after every forward of several tokens, and every ``every``
    decode steps)."""

    stores_only = False  # it chooses which keys stay
    attends_codes = False

    def __init__(self, press: Press, owner: object) -> None:
        self.press = press
        self.name = press.name
        self.owner = owner  # the handle: a compressed layer refuses updates once it is removed
        # the attention every decode query pays every stored key (h2o): a decode step must see them all
        self.reads_decode_keys = press.wants_history
        self.holds_last = press.hold

    def attend(self, call: LayerCall) -> Tensor | None:
        return None  # every head keeps the same number of keys: the runtime's selector + kernel path

    def kept_tokens(self, layer_idx: int, n_layers: int, seen: int, n_kv: int) -> float:
        return min(self.press.capacity(layer_idx, n_layers, seen), seen)

    def after_forward(self, call: LayerCall) -> bool:
        press, st, t_q = self.press, call.state, call.t_q
        layers = call.cache_layers
        if layers is None or t_q > 1:
            shrinkable_layer(layers, call.layer_idx, press.name, quantized=True)  # refuse a forward with no cache
        queries = st.get("queries")
        q = call.q
        st["queries"] = (q if queries is None or t_q > 1 else torch.cat([queries, q], dim=2))[:, :, -press.observe:]
        if press.wants_history:
            history = st.get("history")
            got = attention_received(q, call.k, call.scale, call.extras)
            if history is not None:
                got[:, :, : history.shape[2]] += history
            st["history"] = got
        st["steps"] = st.get("steps", 0) + (t_q == 1)
        if not (t_q > 1 or (press.interval > 0 and st["steps"] % press.interval == 0)):
            return False
        layer = shrinkable_layer(layers, call.layer_idx, press.name, quantized=True)
        seen = layer.get_seq_length()
        capacity = press.capacity(call.layer_idx, call.n_layers, seen)
        # a latent cache (MLA) stores no per-head keys: score the heads the layer expanded from it this call
        shared = call.latent
        keys, values = (call.k, call.v) if shared else stored_keys(layer)
        obs = Observation(call.layer_idx, call.n_layers, seen, st["queries"], keys, values, call.scale,
                          st.get("history"), call.extras, shared)
        keep = press.keep_indices(obs, capacity)
        if keep is None:
            return False
        if "history" in st:
            st["history"] = st["history"].gather(2, keep.expand(-1, st["history"].shape[1], -1))
        if isinstance(layer, QuantizedLayer):  # a later chunk of the prompt, kvquant stacked after this press
            layer.keep(keep)
            return True
        compressed = CompressedLayer.from_layer(layer, self.owner)
        compressed.keep(keep)
        if shared:  # the runtime's held-back prompt token attends these tokens' expanded heads (runtime.layer)
            st["kept"] = keep
        assert layers is not None
        layers[call.layer_idx] = compressed
        return True
