"""A KV cache that appends in place: transformers' ``DynamicLayer`` re-concatenates the whole cache on
every decode step (at 16k on SmolLM2 that copies 720 MiB per token, ~40% of dense decode time).

``GrowingLayer`` keeps keys and values in buffers with spare room and hands out views of the filled
part. The prompt is stored exactly (no spare: prefill memory and contiguity are unchanged); the first
decode step adds room for ``max(256, n / 8)`` tokens, and so on when it fills, so a long generation
copies the cache O(log) times instead of once per token.
"""

from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_SPARE = 256


class GrowingLayer(DynamicLayer):
    _k: Tensor | None = None  # the buffers (spare room included); None until the first update
    _v: Tensor | None = None
    _len = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        need = self._len + n
        if self._k is None or self._v is None:  # the prompt: stored as it is
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
        cap = need + max(MIN_SPARE, need // 8)
        new = buf.new_empty(*buf.shape[:-2], cap, buf.shape[-1])
        new[..., : self._len, :] = buf[..., : self._len, :]
        return new

    @property
    def nbytes(self) -> int:
        """Bytes held, spare room included (what the process pays)."""
        if self._k is None or self._v is None:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()

    # transformers' own edits (crop, beam search, offloading) replace self.keys / self.values: adopt them as
    # the new exactly-sized buffers
    def _adopt(self) -> None:
        if self.is_initialized and isinstance(self.keys, Tensor) and self.keys.numel():
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


def growing_cache(config: object) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are ``GrowingLayer`` (sliding-window
    layers keep transformers' own bounded layer)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
