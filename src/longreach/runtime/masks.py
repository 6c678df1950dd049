"""Padding, recovered from transformers' 4-D attention mask: the one mask pattern longreach reproduces.

transformers builds one mask per forward and shares it across layers, so the recovered key mask is cached
per (mask, sliding window) and checked once.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..errors import InputError


class KeyMasks:
    """Per handle: transformers' masks seen recently -> the per-key padding each stands for."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[weakref.ref, Tensor | None]] = {}

    def get(self, mask: Tensor | None, batch: int, t_q: int, t_k: int, sliding_window: int | None) -> Tensor | None:
        if mask is None:
            return None
        key = (id(mask), sliding_window)
        hit = self._cache.get(key)
        if hit is not None and hit[0]() is mask:
            return hit[1]
        if len(self._cache) > 8:
            self._cache.clear()
        key_mask = key_mask_from(mask, batch, t_q, t_k, sliding_window)
        self._cache[key] = (weakref.ref(mask), key_mask)
        return key_mask


def key_mask_from(mask: Tensor, batch: int, t_q: int, t_k: int, sliding_window: int | None) -> Tensor | None:
    """Recover per-key padding from transformers' 4-D mask, refusing any pattern we would not reproduce."""
    if mask.dim() != 4 or mask.shape[-2:] != (t_q, t_k) or mask.shape[0] not in (1, batch):
        raise InputError(f"unexpected attention mask of shape {tuple(mask.shape)} for {t_q} queries x {t_k} keys")
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    key_mask = allowed.any(dim=1).expand(batch, t_k)  # (B, Tk): a key any query may see is not padding
    pos = (t_k - t_q) + torch.arange(t_q, device=mask.device)
    j = torch.arange(t_k, device=mask.device)
    expected = j[None, :] <= pos[:, None]
    if sliding_window is not None:
        expected = expected & (j[None, :] > pos[:, None] - sliding_window)
    expected = expected[None] & key_mask[:, None, :]
    # rows of padding queries may be all-allowed or all-masked depending on the version: ignore them
    real_rows = key_mask[:, t_k - t_q :]
    if not bool(((allowed == expected) | ~real_rows[:, :, None]).all()):
        raise InputError(
            "the attention mask is not causal + padding (packed sequences, a static cache or a custom 4-D mask?); "
            "longreach supports causal attention with key padding: pass a 2-D attention_mask and a dynamic cache"
        )
    return None if bool(key_mask.all()) else key_mask.contiguous()
