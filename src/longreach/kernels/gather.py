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
from ..errors import InputError
from ..selection import Selection
from ._heads import plan_heads
from .band import band_attention_with_lse
from .dense import causal_attention, causal_attention_with_lse
from .far import FarKeys

CHUNK_BYTES = 96 * 2**20  # working-set target per chunk of query blocks


def attend(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float, far: FarKeys | None = None) -> Tensor:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Tq, Hq, D).

    With ``far``, keys at distance >= far.distance are scored with far.q / far.k; the selection's window
    must cover the near piece (window >= far.distance), so the far part never holds a near key.
    """
    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()  # CPUs without bf16 units are ~50x slower in bf16
        if far is not None:
            far = FarKeys(far.q.float(), far.k.float(), far.distance)
    if far is not None and sel.window < far.distance and not sel.full:
        raise InputError(f"a two-piece position method needs the selection window ({sel.window}) to cover its "
                         f"near piece ({far.distance} keys)")
    if sel.full and sel.key_mask is None:
        if far is None:
            return causal_attention(q, k, v, scale).to(out_dtype)
        return two_piece_causal(q, k, v, far, scale).to(out_dtype)
    out, _ = attend_with_lse(q, k, v, sel, scale, far)
    return out.to(out_dtype)


def attend_with_lse(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float, far: FarKeys | None = None
                    ) -> tuple[Tensor, Tensor]:
    """The blocked path: (B, Tq, Hq, D) output and (B, Tq, Hq) log-sum-exp (-inf for rows with no key)."""
    batch, n_q, t_q, dim = q.shape
    n_kv = k.shape[1]
    plan = plan_heads(sel, n_q, n_kv)
    sel, fold = plan.sel, plan.fold
    heads, bq, n_qb = sel.heads, sel.block_q, sel.query_blocks
    rows = bq * fold

    def blocks(x: Tensor) -> Tensor:
        # (B, Hq, Tq, D) -> (B, Hs, nQB, bq*fold, D), rows ordered (query, folded head)
        xg = x.reshape(batch, heads, fold, t_q, dim)
        pad = n_qb * bq - t_q
        if pad:
            xg = torch.nn.functional.pad(xg, (0, 0, 0, pad))
        return xg.view(batch, heads, fold, n_qb, bq, dim).permute(0, 1, 3, 4, 2, 5).reshape(
            batch, heads, n_qb, rows, dim)

    qb = blocks(q)
    qb_far, k_far = (blocks(far.q), far.k) if far is not None else (qb, k)
    b_idx = torch.arange(batch, device=q.device).view(batch, 1, 1, 1)
    h_idx = plan.kv_head.view(1, heads, 1, 1)
    out = torch.empty_like(qb)
    lse = qb.new_empty(batch, heads, n_qb, rows)
    step = _blocks_per_chunk(sel, batch * heads, rows, dim)
    for b0 in range(0, n_qb, step):
        b1 = min(b0 + step, n_qb)
        nb = b1 - b0
        lay = sel.layout(b0, b1)
        qc = qb[:, :, b0:b1].reshape(batch * heads, nb, rows, dim)
        parts = []

        near_pos = lay.near_pos.view(1, 1, nb, -1)
        near_v = _flat(v[b_idx, h_idx, near_pos])  # (B*Hs, nb, Kn, D)
        n_near = near_pos.shape[-1]
        near_ok = lay.near_ok.expand(batch, heads, nb, bq, n_near)
        if far is None:
            pieces = [(qc, k, near_ok)]
        else:  # split the band by distance: near rotation below far.distance, far rotation from it on
            q_pos = sel.q_offset + torch.arange(b0 * bq, b1 * bq, device=q.device).view(nb, bq, 1)
            dist = q_pos - lay.near_pos[:, None]
            is_far = dist >= far.distance  # (nb, bq, Kn)
            qc_far = qb_far[:, :, b0:b1].reshape(batch * heads, nb, rows, dim)
            pieces = [(qc, k, near_ok & ~is_far), (qc_far, k_far, near_ok & is_far)]
        for qq, kk, ok in pieces:
            ok = ok.unsqueeze(-2).expand(-1, -1, -1, -1, fold, -1).reshape(batch * heads, nb, rows, n_near)
            o, lse_part = attention_with_lse(qq, _flat(kk[b_idx, h_idx, near_pos]), near_v, _bias(ok), scale)
            parts.append((o, lse_part, ok.any(-1)))

        if lay.far_pos.shape[-1]:  # the fused op rejects empty key sets
            qc_f = qb_far[:, :, b0:b1].reshape(batch * heads, nb, rows, dim)
            far_bias = _bias(lay.far_ok).unsqueeze(-2)  # (B, Hs, nb, 1, Kf): one row serves every query
            o, lse_part = attention_with_lse(qc_f, _flat(k_far[b_idx, h_idx, lay.far_pos]),
                                             _flat(v[b_idx, h_idx, lay.far_pos]), far_bias.flatten(0, 1), scale)
            parts.append((o, lse_part, lay.far_ok.any(-1).view(batch * heads, nb, 1).expand_as(lse_part)))

        merged, merged_lse = merge_parts(parts)
        out[:, :, b0:b1] = merged.view(batch, heads, nb, rows, dim)
        lse[:, :, b0:b1] = merged_lse.view(batch, heads, nb, rows)

    out = out.view(batch, heads, n_qb, bq, fold, dim).permute(0, 1, 4, 2, 3, 5)
    out = out.reshape(batch, n_q, n_qb * bq, dim)[:, :, :t_q]
    lse = lse.view(batch, heads, n_qb, bq, fold).permute(0, 1, 4, 2, 3).reshape(batch, n_q, n_qb * bq)[:, :, :t_q]
    return out.transpose(1, 2), lse.transpose(1, 2)


def two_piece_causal(q: Tensor, k: Tensor, v: Tensor, far: FarKeys, scale: float) -> Tensor:
    """Every causal key, near ones with (q, k), far ones with (far.q, far.k): a band plus a shifted causal
    attention, so no T^2 mask is built and nothing is gathered for the far piece."""
    batch, n_q, t_q, dim = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    if t_q == t_k:  # a whole prefill: chunked band, no per-block gather
        o_near, l_near = band_attention_with_lse(q, k, v, far.distance, scale)
    else:
        near_sel = Selection.local(batch, t_q, t_k, sinks=0, window=far.distance, device=q.device)
        o_near, l_near = attend_with_lse(q, k, v, near_sel, scale)
    off = t_k - t_q
    r0 = max(0, far.distance - off)  # first query row with a far key (position >= distance)
    n_keys = off + t_q - far.distance  # far keys of the last query: j <= last - distance
    if r0 >= t_q or n_keys <= 0:
        return o_near
    group = n_q // n_kv
    qg = far.q[:, :, r0:].reshape(batch, n_kv, group, t_q - r0, dim)
    kf, vf = far.k[:, :, :n_keys], v[:, :, :n_keys]
    outs, lses = [], []
    for i in range(group):  # row r sees far keys j <= off + r0 + r - distance: bottom-right causal
        o, lse_part = causal_attention_with_lse(qg[:, :, i], kf, vf, scale)
        outs.append(o)
        lses.append(lse_part)
    o_far = torch.stack(outs, dim=2).view(batch, n_q, t_q - r0, dim).transpose(1, 2)
    l_far = torch.stack(lses, dim=2).view(batch, n_q, t_q - r0).transpose(1, 2)
    out = o_near.clone()
    merged, _ = merge_parts([(o_near[:, r0:], l_near[:, r0:], torch.isfinite(l_near[:, r0:])),
                             (o_far, l_far, torch.ones_like(l_far, dtype=torch.bool))])
    out[:, r0:] = merged
    return out


def _flat(x: Tensor) -> Tensor:
    """(B, Hs, nb, S, D) -> (B*Hs, nb, S, D): the 4-D layout fused attention accepts."""
    return x.flatten(0, 1)


def _bias(ok: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=torch.float32, device=ok.device)
    return torch.where(ok, zero, torch.tensor(float("-inf"), device=ok.device))


def merge_parts(parts: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Exact softmax over the union of disjoint key sets from each part's (output, lse, row-has-keys).

    Returns the merged output and its lse (-inf, with output 0, for rows that saw no key at all).
    """
    neg = torch.tensor(float("-inf"), device=parts[0][1].device)
    lses = [torch.where(any_, lse_, neg) for _, lse_, any_ in parts]
    top = lses[0]
    for lse_ in lses[1:]:
        top = torch.maximum(top, lse_)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # rows with no key at all -> output 0
    weights = [torch.exp(lse_ - top) for lse_ in lses]
    total = weights[0]
    for w in weights[1:]:
        total = total + w
    safe = total.clamp_min(torch.finfo(parts[0][0].dtype).tiny)
    out = sum(o * (w / safe).unsqueeze(-1) for (o, _, _), w in zip(parts, weights, strict=True))
    lse = torch.where(total > 0, top + torch.log(safe), neg)
    return out, lse  # type: ignore[return-value]


def _blocks_per_chunk(sel: Selection, bh: int, rows: int, dim: int) -> int:
    """How many query blocks to process at once so the gathered keys and masks stay near CHUNK_BYTES."""
    n_far = sel.sinks + sel.indices.shape[-1] * sel.block_k
    n_near = min(sel.window, sel.kv_len) + sel.block_q - 1
    per_block = 4 * bh * (2 * dim * (n_far + n_near) + rows * (n_near + 2 * dim) + n_far) + bh * rows * n_near
    return max(1, min(sel.query_blocks, math.floor(CHUNK_BYTES / max(per_block, 1))))
