"""A KV cache that appends in place: transformers' ``DynamicLayer`` re-concatenates the whole cache on
every decode step (at 16k on SmolLM2 that copies 720 MiB per token, ~40% of dense decode time).

``GrowingLayer`` keeps keys and values in buffers with spare room and hands out views of the filled
part. The prompt is stored exactly (no spare: prefill memory and contiguity are unchanged); the first
decode step adds room for ``n / 8`` tokens (at least 256, at most 1024), and so on when it fills: a
generation copies the cache every 1024 tokens at most often instead of at every token, and the room costs
at most 1024 tokens' bytes (47 MiB on SmolLM2) at any length.

A caller that knows how many tokens the cache will be given in all (``longreach.generate`` and the server: the
prompt and the new tokens) says so with ``reserve``: the buffers are then allocated once, at that size, and never
copied. Without it the first decode step after a 16k prompt copied SmolLM2's whole 765 MB cache (about 0.1 s, 3 ms
a token over 32 new tokens), and the cache kept up to 1024 tokens of room it would not use.
"""

from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from .quantized import QuantizedLayer

MIN_SPARE = 256
MAX_SPARE = 1024  # 16k on SmolLM2: a 750 MiB copy (~0.1 s) per 1024 tokens, against ~60 ms per token of decode


class GrowingLayer(DynamicLayer):
    min_spare: int = MIN_SPARE  # room added when full: max(min_spare, min(n / 8, MAX_SPARE)) tokens
    _k: Tensor | None = None  # the buffers (spare room included); None until the first update
    _v: Tensor | None = None
    _len = 0
    expected: int | None = None  # tokens this layer will be given in all, when the caller knows (``reserve``)

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        need = self._len + n
        if self._k is None or self._v is None:  # the prompt: stored as it is, or in buffers of the reserved size
            if self.expected is not None and self.expected > need:
                self._k, self._v = self._grow(key_states, need), self._grow(value_states, need)
            else:
                self._k, self._v = key_states.contiguous(), value_states.contiguous()
        else:
            if need > self._k.shape[-2]:
                self._k, self._v = self._grow(self._k, need), self._grow(self._v, need)
            self._k[..., self._len:need, :] = key_states
            self._v[..., self._len:need, :] = value_states
        self._len = need
        self.keys, self.values = self._k[..., :need, :], self._v[..., :need, :]
        return self.keys, self.values

    def _grow(self, buf: Tensor, need: int) -> Tensor:
        """A buffer for at least ``need`` tokens holding ``buf``'s stored ones (all of a new prompt's)."""
        if self.expected is not None and self.expected >= need:
            cap = self.expected
        else:
            cap = need + max(self.min_spare, min(need // 8, MAX_SPARE))
        kept = self._len if self._k is not None else buf.shape[-2]
        new = buf.new_empty(*buf.shape[:-2], cap, buf.shape[-1])
        new[..., :kept, :] = buf[..., :kept, :]
        return new

    def truncate(self, n: int) -> None:
        """Give back the last ``n`` stored tokens (the buffers keep their room): the runtime holds the prompt's
        last token back from a multi-token forward after transformers has already stored it."""
        self._len -= n
        assert self._k is not None and self._v is not None and self._len >= 0
        self.keys, self.values = self._k[..., : self._len, :], self._v[..., : self._len, :]

    @property
    def nbytes(self) -> int:
        """Bytes held, spare room included (what the process pays)."""
        if self._k is None or self._v is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    @property
    def room_bytes(self) -> int:
        """Bytes of the room that holds no token yet (counted in ``nbytes``)."""
        if self._k is None or self._k.shape[-2] == 0:
            return 0
        capacity = self._k.shape[-2]  # of the buffers (a compressed layer's short heads are held without room)
        return GrowingLayer.nbytes.fget(self) * (capacity - self._len) // capacity

    # transformers' own edits (crop, beam search, offloading) replace self.keys / self.values: adopt them as
    # the new exactly-sized buffers
    def _adopt(self) -> None:
        if self.is_initialized and isinstance(self.keys, Tensor):  # cropped to nothing included
            self._k, self._v = self.keys.contiguous(), self.values.contiguous()
            self._len = self._k.shape[-2]
            self.keys, self.values = self._k, self._v

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._adopt()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._adopt()

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._adopt()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        self._adopt()

    def offload(self) -> None:
        super().offload()
        self._adopt()

    def prefetch(self) -> None:
        super().prefetch()
        self._adopt()

    def reset(self) -> None:
        super().reset()
        self._k = self._v = None
        self._len = 0


def growing_cache(config: object, expected: int | None = None) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are ``GrowingLayer`` (sliding-window
    layers keep transformers' own bounded layer); ``expected``: see ``reserve``."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if expected is not None:
        reserve(cache, expected)
    return cache


def reserve(cache: object, expected: int) -> None:
    """Tell ``cache``'s growing layers that they will be given ``expected`` tokens in all (prompt and new tokens):
    their next allocation has exactly that room, so a generation of known length never copies its cache. More
    tokens than that still fit (the buffers then grow as without it); other layers are left as they are."""
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, GrowingLayer):
            layer.expected = expected


def grow_in_place(cache: object, layer_idx: int) -> None:
    """Make layer ``layer_idx`` of a transformers ``DynamicCache`` a ``GrowingLayer`` before its first update
    (``apply`` does this for every forward, so ``model.generate()`` decodes without copying the cache).
    Layers already holding keys, sliding-window layers and other cache types are left as they are."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return
    if len(layers) <= layer_idx and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        layers.extend(GrowingLayer() for _ in range(layer_idx + 1 - len(layers)))  # a cache built without config
    if layer_idx < len(layers) and type(layers[layer_idx]) is DynamicLayer and not layers[layer_idx].is_initialized:
        layers[layer_idx] = GrowingLayer()


def truncate_layer(layer: DynamicLayer, n: int) -> None:
    """Give back a layer's last ``n`` stored tokens (transformers' own layer: a shorter view)."""
    if isinstance(layer, GrowingLayer | QuantizedLayer):
        layer.truncate(n)
    else:
        layer.keys, layer.values = layer.keys[..., :-n, :], layer.values[..., :-n, :]


def cached_tokens(cache: object, layer_idx: int) -> int:
    """Tokens layer ``layer_idx`` of a transformers cache has been given (0 without a cache or that layer)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or layer_idx >= len(layers):
        return 0
    return int(layers[layer_idx].get_seq_length())
