"""Map a Selection's heads onto query/key heads without repeating K/V for the whole sequence."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import InputError
from ..selection import Selection


@dataclass(frozen=True)
class HeadMap:
    """How query heads line up with the selection's heads.

    ``fold`` query heads share one selection head (GQA with a per-KV-head selection): they are folded
    into the query rows so the gathered keys serve all of them. ``kv_head[s]`` is the KV head that
    selection head ``s`` reads.
    """

    sel: Selection
    fold: int
    kv_head: Tensor  # (Hs,) long


def map_heads(sel: Selection, n_q_heads: int, n_kv_heads: int) -> HeadMap:
    """The HeadMap of ``sel`` for this attention's head counts; a one-head selection is shared by every KV head."""
    if n_q_heads % n_kv_heads:
        raise InputError(f"query heads ({n_q_heads}) must be a multiple of key/value heads ({n_kv_heads})")
    group = n_q_heads // n_kv_heads
    heads = sel.heads
    dev = sel.indices.device
    if heads == 1 and n_kv_heads > 1:
        sel = replace(sel, indices=sel.indices.expand(-1, n_kv_heads, -1, -1))
        heads = n_kv_heads
    if heads == n_kv_heads:
        return HeadMap(sel, group, torch.arange(n_kv_heads, device=dev))
    if heads == n_q_heads:
        return HeadMap(sel, 1, torch.arange(n_q_heads, device=dev) // group)
    raise InputError(
        f"Selection has {heads} heads; expected 1, the key/value heads ({n_kv_heads}) or the query heads ({n_q_heads})"
    )
