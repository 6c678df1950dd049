"""FlexAttention with a BlockMask built from the Selection's block indices (never from a T x T mask_mod).

The block table says which (query block, key block) tiles to visit: chosen blocks, sink blocks and
the window band, causally clipped. A ``mask_mod`` makes the partial tiles exact, reading only small
per-block tables. Prefill runs compiled (``dynamic=True`` so a new length does not recompile);
a single decode query runs eager, where flex only materialises one row of scores.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from ..compat import flex_attention_available
from ..selection import Selection
from . import gather
from ._heads import map_heads
from .dense import causal_attention


def available() -> bool:
    return flex_attention_available()


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def block_table(sel: Selection) -> Tensor:
    """(B, Hs, nQB, nKB) bool: tiles holding at least one visible key (before the padding mask)."""
    dev = sel.indices.device
    n_qb, n_kb = sel.query_blocks, sel.key_blocks
    table = sel._membership(0, n_qb)
    qb = torch.arange(n_qb, device=dev)
    first = sel.q_offset + qb * sel.block_q  # first query position of each block
    last = torch.clamp(first + sel.block_q - 1, max=sel.kv_len - 1)
    kb = torch.arange(n_kb, device=dev)
    k_lo, k_hi = kb * sel.block_k, torch.clamp((kb + 1) * sel.block_k - 1, max=sel.kv_len - 1)
    causal = k_lo[None, :] <= last[:, None]
    band = k_hi[None, :] > first[:, None] - sel.window
    sink = (k_lo < sel.sinks)[None, :]
    return (table & causal) | (causal & (band | sink))


def attend(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float) -> Tensor:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Tq, Hq, D)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    if sel.full and sel.key_mask is None:
        return causal_attention(q, k, v, scale).to(out_dtype)
    batch, n_q, t_q, _ = q.shape
    n_kv = k.shape[1]
    mapping = map_heads(sel, n_q, n_kv)
    sel = mapping.sel
    table = block_table(sel).repeat_interleave(mapping.fold, dim=1)  # (B, Hq, nQB, nKB)
    chosen = sel._membership(0, sel.query_blocks).repeat_interleave(mapping.fold, dim=1)
    key_mask = sel.key_mask if sel.key_mask is not None else torch.ones(
        batch, sel.kv_len, dtype=torch.bool, device=q.device
    )
    offset, sinks, window, bq, bk = sel.q_offset, sel.sinks, sel.window, sel.block_q, sel.block_k

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        keep = (kv_idx < sinks) | (kv_idx > pos - window) | chosen[b, h, q_idx // bq, kv_idx // bk]
        return (kv_idx <= pos) & keep & key_mask[b, kv_idx]

    counts = table.sum(-1, dtype=torch.int32)
    order = torch.argsort(table.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    block_mask = BlockMask.from_kv_blocks(
        counts, order, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(t_q, sel.kv_len)
    )
    if t_q == 1:
        out = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=n_q != n_kv)
        return out.transpose(1, 2).to(out_dtype)
    try:
        out = _compiled()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=n_q != n_kv)
    except Exception as err:  # inductor codegen bugs on some CPU shapes: stay exact via the gather kernel
        if type(err).__module__.split(".")[0] != "torch":
            raise
        _warn_fallback(err)
        return gather.attend(q, k, v, sel, scale).to(out_dtype)
    return out.transpose(1, 2).to(out_dtype)


@functools.cache
def _warn_fallback_once(kind: str) -> None:
    warnings.warn(f"flex kernel: torch.compile failed ({kind}); using the gather kernel instead", stacklevel=3)


def _warn_fallback(err: Exception) -> None:
    _warn_fallback_once(type(err).__name__)
