"""The CPU path: gather each query block's keys, attend, merge the far and near parts by log-sum-exp.

Per query block the Selection's ``layout`` gives two disjoint key sets:
- *far*: sinks and chosen blocks wholly behind the window. Every query of the block sees the same
  keys, so the additive mask is one row broadcast over the block (no per-query mask is built);
- *near*: the band [first - window + 1, last] whose visibility differs per query.
Each part is one fused attention call over all query blocks of a chunk (no Python loop per block);
the two partial softmaxes are merged exactly with their log-sum-exps. Query heads that share a
selection head (GQA) are folded into the query rows, so gathered K/V are never repeated per head.
Work and memory grow with T x budget, never T^2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..compat import attention_with_lse
from ..selection import Selection
from ._heads import plan_heads
from .dense import causal_attention

CHUNK_BYTES = 96 * 2**20  # working-set target per chunk of query blocks


def attend(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float) -> Tensor:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Tq, Hq, D)."""
    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()  # CPUs without bf16 units are ~50x slower in bf16
    if sel.full and sel.key_mask is None:
        return causal_attention(q, k, v, scale).to(out_dtype)

    batch, n_q, t_q, dim = q.shape
    n_kv = k.shape[1]
    plan = plan_heads(sel, n_q, n_kv)
    sel, fold = plan.sel, plan.fold
    heads, bq, n_qb = sel.heads, sel.block_q, sel.query_blocks
    rows = bq * fold

    # (B, Hq, Tq, D) -> (B, Hs, nQB, bq*fold, D), rows ordered (query, folded head)
    qg = q.reshape(batch, heads, fold, t_q, dim)
    pad = n_qb * bq - t_q
    if pad:
        qg = torch.nn.functional.pad(qg, (0, 0, 0, pad))
    qb = qg.view(batch, heads, fold, n_qb, bq, dim).permute(0, 1, 3, 4, 2, 5).reshape(batch, heads, n_qb, rows, dim)

    b_idx = torch.arange(batch, device=q.device).view(batch, 1, 1, 1)
    h_idx = plan.kv_head.view(1, heads, 1, 1)
    out = torch.empty_like(qb)
    step = _blocks_per_chunk(sel, batch * heads, rows, dim)
    for b0 in range(0, n_qb, step):
        b1 = min(b0 + step, n_qb)
        nb = b1 - b0
        lay = sel.layout(b0, b1)
        qc = qb[:, :, b0:b1].reshape(batch * heads, nb, rows, dim)

        near_pos = lay.near_pos.view(1, 1, nb, -1)
        near_k = k[b_idx, h_idx, near_pos]  # (B, Hs, nb, Kn, D)
        near_v = v[b_idx, h_idx, near_pos]
        n_near = near_pos.shape[-1]
        near_ok = lay.near_ok.expand(batch, heads, nb, bq, n_near)
        near_ok = near_ok.unsqueeze(-2).expand(-1, -1, -1, -1, fold, -1).reshape(batch * heads, nb, rows, n_near)
        o_near, l_near = attention_with_lse(qc, _flat(near_k), _flat(near_v), _bias(near_ok), scale)
        near_any = near_ok.any(-1)

        if lay.far_pos.shape[-1] == 0:  # nothing behind the window (the fused op rejects empty key sets);
            out[:, :, b0:b1] = o_near.view(batch, heads, nb, rows, dim)  # rows with no key are already 0
            continue
        far_k = k[b_idx, h_idx, lay.far_pos]  # (B, Hs, nb, Kf, D)
        far_v = v[b_idx, h_idx, lay.far_pos]
        far_bias = _bias(lay.far_ok).unsqueeze(-2)  # (B, Hs, nb, 1, Kf): one row serves every query
        o_far, l_far = attention_with_lse(qc, _flat(far_k), _flat(far_v), far_bias.flatten(0, 1), scale)
        far_any = lay.far_ok.any(-1).view(batch * heads, nb, 1)

        merged = _merge(o_far, l_far, far_any, o_near, l_near, near_any)
        out[:, :, b0:b1] = merged.view(batch, heads, nb, rows, dim)

    out = out.view(batch, heads, n_qb, bq, fold, dim).permute(0, 1, 4, 2, 3, 5)
    out = out.reshape(batch, n_q, n_qb * bq, dim)[:, :, :t_q]
    return out.transpose(1, 2).to(out_dtype)


def _flat(x: Tensor) -> Tensor:
    """(B, Hs, nb, S, D) -> (B*Hs, nb, S, D): the 4-D layout fused attention accepts."""
    return x.flatten(0, 1)


def _bias(ok: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=torch.float32, device=ok.device)
    return torch.where(ok, zero, torch.tensor(float("-inf"), device=ok.device))


def _merge(o1: Tensor, l1: Tensor, any1: Tensor, o2: Tensor, l2: Tensor, any2: Tensor) -> Tensor:
    """Exact softmax over the union of two disjoint key sets from their partial outputs and lse."""
    neg = torch.tensor(float("-inf"), device=l1.device)
    l1 = torch.where(any1, l1, neg)
    l2 = torch.where(any2, l2, neg)
    top = torch.maximum(l1, l2)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with no key at all -> output 0
    w1 = torch.exp(l1 - top)
    w2 = torch.exp(l2 - top)
    total = (w1 + w2).clamp_min(torch.finfo(o1.dtype).tiny)
    return (o1 * (w1 / total).unsqueeze(-1)) + (o2 * (w2 / total).unsqueeze(-1))


def _blocks_per_chunk(sel: Selection, bh: int, rows: int, dim: int) -> int:
    """How many query blocks to process at once so the gathered keys and masks stay near CHUNK_BYTES."""
    n_far = sel.sinks + sel.indices.shape[-1] * sel.block_k
    n_near = min(sel.window, sel.kv_len) + sel.block_q - 1
    per_block = 4 * bh * (2 * dim * (n_far + n_near) + rows * (n_near + 2 * dim) + n_far) + bh * rows * n_near
    return max(1, min(sel.query_blocks, math.floor(CHUNK_BYTES / max(per_block, 1))))
