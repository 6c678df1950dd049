"""A transformers cache layer that holds only some of the keys, with their positions intact.

Keys are cached after RoPE, so keeping a subset (in order) keeps every kept key at its true
position. What must not shrink is the *logical* length: new tokens get their positions from
``get_seq_length()``, so this layer reports the number of tokens seen, like transformers' own
sliding-window layer, and sizes the attention mask to the keys it really returns.

Heads may keep different numbers of keys (DuoAttention, RazorAttention): the layer then holds a
*long* part (some KV heads, every kept key) and a *short* part (the other heads, a few keys), each a
real tensor, so the bytes are really freed. Only longreach's attention can read a split layer, so
``update`` refuses to run once the owning handle is removed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

from ..errors import LongreachError
from .growing import GrowingLayer
from .quantized import QuantizedLayer


@dataclass
class Part:
    heads: Tensor  # (h,) long: which KV heads this part holds, ascending
    keys: Tensor  # (B, h, n, D)
    values: Tensor  # (B, h, n, D)
    # RazorAttention's compensation token: the mean of every key / value dropped so far, and their count
    comp_keys: Tensor | None = None
    comp_values: Tensor | None = None
    comp_count: int = 0
    sinks: int = 0  # leading keys that are attention sinks

    def append(self, k: Tensor, v: Tensor) -> None:
        self.keys = torch.cat([self.keys, k[:, self.heads]], dim=2)
        self.values = torch.cat([self.values, v[:, self.heads]], dim=2)

    def keep(self, idx: Tensor) -> None:
        """Keep positions ``idx`` (B, h, n') of each head, in the given (ascending) order (values may be narrower or
        wider than keys: MLA's cache holds its latent and its rotary key part)."""
        self.keys = self.keys.gather(2, idx[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, idx[..., None].expand(-1, -1, -1, self.values.shape[-1]))

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        held = (self.keys, self.values, self.comp_keys, self.comp_values)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def trim(self, sinks: int, window: int, compensate: bool) -> None:
        """Keep the first ``sinks`` and last ``window`` keys; fold the dropped ones into the compensation token."""
        n = self.length
        lo = min(sinks, n)
        hi = max(n - window, lo)
        self.sinks = lo
        if hi == lo:
            return
        if compensate:
            dropped_k, dropped_v, d = self.keys[:, :, lo:hi], self.values[:, :, lo:hi], hi - lo
            total = self.comp_count + d
            if self.comp_keys is None:
                self.comp_keys, self.comp_values = dropped_k.mean(2, keepdim=True), dropped_v.mean(2, keepdim=True)
            else:
                self.comp_keys = (self.comp_keys * self.comp_count + dropped_k.sum(2, keepdim=True)) / total
                self.comp_values = (self.comp_values * self.comp_count + dropped_v.sum(2, keepdim=True)) / total
            self.comp_count = total
        self.keys = torch.cat([self.keys[:, :, :lo], self.keys[:, :, hi:]], dim=2)
        self.values = torch.cat([self.values[:, :, :lo], self.values[:, :, hi:]], dim=2)

    def view(self) -> tuple[Tensor, Tensor, int]:
        """(keys, values, leading keys to treat as sinks): the compensation token sits right after the sinks."""
        if self.comp_keys is None or self.comp_values is None:
            return self.keys, self.values, self.sinks
        lo = self.sinks
        keys = torch.cat([self.keys[:, :, :lo], self.comp_keys, self.keys[:, :, lo:]], dim=2)
        values = torch.cat([self.values[:, :, :lo], self.comp_values, self.values[:, :, lo:]], dim=2)
        return keys, values, lo + 1


class CompressedLayer(GrowingLayer):
    """Drop-in for ``DynamicLayer`` after a press: the growing buffers hold the kept keys of every head
    (uniform), or of the long heads only when ``short`` holds the rest. Decode appends in place, like
    ``GrowingLayer``: a compressed cache is not copied per token either."""

    min_spare = 16  # a press keeps few keys: room in proportion to them, not a dense prompt's 256 tokens

    def __init__(self, keys: Tensor, values: Tensor, seen: int, owner: object, expected: int | None = None) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.seen = seen  # tokens this layer has been given: the next token's position
        self.expected = expected  # tokens it will be given in all, when the caller said (``growing.reserve``)
        self._store(keys, values)
        self.long_heads: Tensor | None = None
        self.short: Part | None = None
        self._owner = weakref.ref(owner)

    def _store(self, keys: Tensor, values: Tensor) -> None:
        """Replace the stored keys, with room for the tokens still to come when the caller said how many
        (``growing.reserve``), else for one more (the prompt's held-back last token) and no other spare: a press just
        freed memory."""
        n = keys.shape[-2]
        room = n + max(1, (self.expected or 0) - self.seen)
        self._k = keys.new_empty(*keys.shape[:-2], room, keys.shape[-1])
        self._v = values.new_empty(*values.shape[:-2], room, values.shape[-1])
        self._k[..., :n, :], self._v[..., :n, :] = keys, values
        self._len = n
        self.keys, self.values = self._k[..., :n, :], self._v[..., :n, :]

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self.seen -= n
        if self.short is not None:
            self.short.keys, self.short.values = self.short.keys[:, :, :-n], self.short.values[:, :, :-n]

    @classmethod
    def from_layer(cls, layer: DynamicLayer, owner: object) -> CompressedLayer:
        if isinstance(layer, CompressedLayer):
            return layer
        return cls(layer.keys, layer.values, layer.get_seq_length(), owner, getattr(layer, "expected", None))

    # -- what transformers calls -------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        owner = self._owner()
        if owner is None or not getattr(owner, "active", False):
            raise LongreachError(
                "this cache was compressed by a longreach press whose handle is removed; keep the handle applied "
                "while using the cache, or start generation from a fresh cache"
            )
        self.seen += key_states.shape[-2]
        if self.short is None:
            return super().update(key_states, value_states)
        assert self.long_heads is not None
        super().update(key_states[:, self.long_heads], value_states[:, self.long_heads])
        self.short.append(key_states, value_states)
        return key_states, value_states  # longreach's attention reads the parts (see runtime.split)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the mask must match the keys update() returns; offsets keep query positions causal
        stored = 0 if self.short is not None else self._len
        return stored + query_length, self.seen - stored

    def crop(self, tokens_to_remove: int) -> None:
        raise LongreachError("a compressed cache cannot be cropped (assisted decoding / rollback); "
                             "use an uncompressed cache for that")

    # beam search and batch edits: the long part through GrowingLayer, the short part (and razor's
    # compensation token) here, the same way
    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._short_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._short_rows(lambda t: t[indices])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        self._short_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def _short_rows(self, edit: Callable[[Tensor], Tensor]) -> None:
        part = self.short
        if part is None:
            return
        part.keys, part.values = edit(part.keys), edit(part.values)
        if part.comp_keys is not None and part.comp_values is not None:
            part.comp_keys, part.comp_values = edit(part.comp_keys), edit(part.comp_values)

    # -- what presses call -------------------------------------------------------------------
    @property
    def split(self) -> bool:
        return self.short is not None

    def parts(self) -> list[Part]:
        """The layer as parts: one with every head, or the long and short heads."""
        if self.short is None:
            heads = torch.arange(self.keys.shape[1], device=self.keys.device)
            return [Part(heads, self.keys, self.values)]
        assert self.long_heads is not None
        return [Part(self.long_heads, self.keys, self.values), self.short]

    def keep(self, idx: Tensor) -> None:
        """Uniform layer: keep positions ``idx`` (B, Hkv, n) per head (ascending, so order is kept)."""
        part = self.parts()[0]
        part.keep(idx)
        self._store(part.keys, part.values)

    def split_heads(self, long_heads: Tensor, short_heads: Tensor, short_keys: Tensor, short_values: Tensor
                    ) -> None:
        """Hold every key of ``long_heads`` and only (short_keys, short_values) for ``short_heads``."""
        self.long_heads = long_heads
        self._store(self.keys[:, long_heads], self.values[:, long_heads])
        self.short = Part(short_heads, short_keys, short_values)

    @property
    def nbytes(self) -> int:
        short = self.short.nbytes if self.short is not None else 0
        return super().nbytes + short


def cache_bytes(cache: object, room: bool = True) -> int | None:
    """Bytes held by a transformers cache's keys and values (compressed layers counted as they are stored);
    ``room=False`` leaves out the growing layers' room that holds no token yet (reserved or added by growth)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    total = 0
    for layer in layers:
        if isinstance(layer, GrowingLayer | QuantizedLayer):  # as stored: spare room, codes and scales included
            total += layer.nbytes - (0 if room or not isinstance(layer, GrowingLayer) else layer.room_bytes)
            continue
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


def shrinkable_layer(layers: list | None, layer_idx: int, who: str, quantized: bool = False) -> DynamicLayer:
    """This layer's cache entry, if a press or head policy can shrink it; refuses a forward without a cache
    (the policy would silently keep everything) and caches it cannot shrink (static, transformers' quantized,
    offloaded). A layer kvquant holds (a chunked prompt under a press stacked with kvquant) is returned only to a
    press (``quantized=True``), which shrinks it by ``QuantizedLayer.keep``."""
    if layers is None:
        raise LongreachError(
            f"{who} compresses the KV cache, but this forward has no cache (use_cache=False, or a transformers "
            "version that passes the cache under a name longreach does not know); call the model with "
            "use_cache=True, or apply a select method instead of a press")
    layer = layers[layer_idx]
    if isinstance(layer, QuantizedLayer) and not quantized:
        raise LongreachError(f"{who} cannot shrink layer {layer_idx}: kvquant holds it quantized, and its heads "
                             "hold the same keys; run this cache under the spec that quantized it")
    if type(layer) not in (DynamicLayer, GrowingLayer, CompressedLayer, QuantizedLayer):
        raise LongreachError(
            f"{who} needs a DynamicCache; layer {layer_idx} of this cache is a {type(layer).__name__} (static / "
            "quantized caches are not supported)")
    return layer
