"""The CPU path. Where the compiled kernel (``native``) is available it does everything: visibility
straight from the Selection's block indices, keys streamed in tiles, one online softmax. Otherwise,
and for two-piece position methods, this module's PyTorch path: gather each query block's keys,
attend, merge the far and near parts by log-sum-exp.

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
from . import choice, decode, native
from ._heads import map_heads
from .band import band_attention_with_lse
from .dense import causal_attention, causal_attention_with_lse
from .far import FarKeys
from .lse import merge_parts, with_sink

CHUNK_BYTES = 96 * 2**20  # working-set target per chunk of query blocks


def attend(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float, far: FarKeys | None = None, *,
           softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Tq, Hq, D).

    With ``far``, keys at distance >= far.distance are scored with far.q / far.k; the selection's window
    must cover the near piece (window >= far.distance), so the far part never holds a near key.
    ``softcap`` (scores -> cap * tanh(s / cap)) and learned ``sinks`` (Hq,) logits run the PyTorch blocked
    path, or for a decode step over every key the split-K kernel (``decode``); a sink joins the softmax through
    the rows' lse.
    """
    out_dtype = q.dtype
    if q.device.type == "cpu" and q.dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()  # CPUs without bf16 units are ~50x slower in bf16
        if far is not None:
            far = FarKeys(far.q.float(), far.k.float(), far.distance)
    if far is not None and sel.window < far.distance and not sel.full:
        raise InputError(f"a two-piece position method needs the selection window ({sel.window}) to cover its "
                         f"near piece ({far.distance} keys)")
    if sel.full and sel.key_mask is None and far is None and decode.serves(q, k, v, softcap, _without_decode_kernel):
        out, lse = decode.attend(q, k, v, scale, softcap)  # a decode step over every key: the split-K kernel
        return (out if sinks is None else with_sink(out, lse, sinks)).to(out_dtype)
    if softcap is not None or sinks is not None:
        out, lse = attend_with_lse(q, k, v, sel, scale, far, use_native=False, softcap=softcap)
        return (out if sinks is None else with_sink(out, lse, sinks)).to(out_dtype)
    if sel.full and sel.key_mask is None:
        if far is None:
            return causal_attention(q, k, v, scale).to(out_dtype)
        return two_piece_causal(q, k, v, far, scale).to(out_dtype)
    out, _ = attend_with_lse(q, k, v, sel, scale, far)
    return out.to(out_dtype)


def _without_decode_kernel(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None) -> Tensor:
    """What a decode step over every key runs when the split-K kernel does not (``decode`` times it): SDPA with the
    GQA group folded into the query rows, or with a softcap the blocked PyTorch path."""
    if softcap is None:
        return causal_attention(q, k, v, scale)
    sel = Selection.dense(q.shape[0], 1, k.shape[2], device=q.device)
    return attend_with_lse(q, k, v, sel, scale, use_native=False, softcap=softcap)[0]


def attend_with_lse(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float, far: FarKeys | None = None,
                    use_native: bool | None = None, softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """The blocked path: (B, Tq, Hq, D) output and (B, Tq, Hq) log-sum-exp (-inf for rows with no key).

    ``use_native``: run the compiled kernel (True), the PyTorch path (False), or whichever this machine measured
    faster for this head shape and phase (None, ``kernels.choice``)."""
    batch, n_q, t_q, dim = q.shape
    n_kv = k.shape[1]
    mapping = map_heads(sel, n_q, n_kv)
    sel, fold = mapping.sel, mapping.fold
    heads, n_qb = sel.heads, sel.query_blocks
    bq = t_q if n_qb == 1 else sel.block_q  # one short block (decode): no padded query rows to compute
    rows = bq * fold

    def blocks(x: Tensor) -> Tensor:
        # (B, Hq, Tq, D) -> (B, Hs, nQB, bq*fold, D), rows ordered (query, folded head)
        xg = x.reshape(batch, heads, fold, t_q, dim)
        pad = n_qb * bq - t_q
        if pad:
            xg = torch.nn.functional.pad(xg, (0, 0, 0, pad))
        return xg.view(batch, heads, fold, n_qb, bq, dim).permute(0, 1, 3, 4, 2, 5).reshape(
            batch, heads, n_qb, rows, dim)

    if use_native is None and far is None:  # a two-piece position method runs the PyTorch path anyway
        use_native = choice.use_native(q, n_kv, attend_with_lse)
    if far is None and use_native and softcap is None and native.usable(q):
        return _native(q, k, v, sel, mapping.kv_head, fold, bq, scale)
    qb = blocks(q)
    out, lse = _torch_chunks(qb, blocks(far.q) if far is not None else qb, k, v, sel, mapping.kv_head, fold, scale,
                             far, softcap)
    # one copy into the (B, Tq, Hq, D) layout callers hand on (rows are (query, folded head) per block)
    out = out.view(batch, heads, n_qb, bq, fold, dim).permute(0, 2, 3, 1, 4, 5)
    out = out.reshape(batch, n_qb * bq, n_q, dim)[:, :t_q]
    lse = lse.view(batch, heads, n_qb, bq, fold).permute(0, 2, 3, 1, 4).reshape(batch, n_qb * bq, n_q)[:, :t_q]
    return out, lse


def _torch_chunks(qb: Tensor, qb_far: Tensor, k: Tensor, v: Tensor, sel: Selection, kv_head: Tensor, fold: int,
                  scale: float, far: FarKeys | None, softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Pure PyTorch: per chunk of query blocks, gathered near and far parts merged by log-sum-exp.
    qb (B, Hs, nQB, rows, D) -> out like qb and lse (B, Hs, nQB, rows)."""
    batch, heads, n_qb, rows, dim = qb.shape
    bq = rows // fold
    take_k, take_v = _Rows(k, kv_head), _Rows(v, kv_head)
    take_k_far = _Rows(far.k, kv_head) if far is not None else None
    take_k_near, take_v_near = _Rows(k, kv_head), _Rows(v, kv_head)
    out = torch.empty_like(qb)
    lse = qb.new_empty(batch, heads, n_qb, rows)
    step = _blocks_per_chunk(sel, batch * heads, rows, dim)
    for b0 in range(0, n_qb, step):
        b1 = min(b0 + step, n_qb)
        nb = b1 - b0
        lay = sel.layout(b0, b1)
        qc = qb[:, :, b0:b1].reshape(batch * heads, nb, rows, dim)
        parts = []

        near_pos = lay.near_pos.view(1, 1, nb, -1).expand(batch, heads, -1, -1)
        near_v = take_v_near(near_pos)  # (B*Hs, nb, Kn, D)
        n_near = near_pos.shape[-1]
        near_ok = lay.near_ok[..., :bq, :].expand(batch, heads, nb, bq, n_near)
        if far is None:
            pieces = [(qc, take_k_near, near_ok)]
        else:  # split the band by distance: near rotation below far.distance, far rotation from it on
            q_pos = sel.q_offset + torch.arange(b0 * bq, b1 * bq, device=qb.device).view(nb, bq, 1)
            dist = q_pos - lay.near_pos[:, None]
            is_far = dist >= far.distance  # (nb, bq, Kn)
            qc_far = qb_far[:, :, b0:b1].reshape(batch * heads, nb, rows, dim)
            pieces = [(qc, take_k_near, near_ok & ~is_far), (qc_far, take_k_far, near_ok & is_far)]
        for qq, take, ok in pieces:
            ok = ok.unsqueeze(-2).expand(-1, -1, -1, -1, fold, -1).reshape(batch * heads, nb, rows, n_near)
            o, lse_part = attention_with_lse(qq, take(near_pos), near_v, _bias(ok), scale, softcap=softcap)
            parts.append((o, lse_part, ok.any(-1)))

        far_pos, far_ok = _compact(lay.far_pos, lay.far_ok)
        if far_pos.shape[-1]:  # the fused op rejects empty key sets
            qc_f = qb_far[:, :, b0:b1].reshape(batch * heads, nb, rows, dim)
            # one mask row serves every query of a block; none at all when every gathered key is visible
            far_bias = None if bool(far_ok.all()) else _bias(far_ok).unsqueeze(-2).flatten(0, 1)
            o, lse_part = attention_with_lse(qc_f, (take_k_far or take_k)(far_pos), take_v(far_pos), far_bias,
                                             scale, softcap=softcap)
            parts.append((o, lse_part, far_ok.any(-1).view(batch * heads, nb, 1).expand_as(lse_part)))

        merged, merged_lse = merge_parts(parts)
        out[:, :, b0:b1] = merged.view(batch, heads, nb, rows, dim)
        lse[:, :, b0:b1] = merged_lse.view(batch, heads, nb, rows)
    return out, lse


def _native(q: Tensor, k: Tensor, v: Tensor, sel: Selection, kv_head: Tensor, fold: int, row_block: int,
            scale: float) -> tuple[Tensor, Tensor]:
    """The compiled kernel: visibility straight from the block indices, keys streamed in place, q read in
    place and the output written in the caller's (B, Tq, Hq, D) layout. No blocked copies of q or the
    output: at 16k (SmolLM2 heads) each was 38 MiB more peak per layer than dense SDPA."""
    batch, n_q, t_q, dim = q.shape
    heads, n_kv = sel.heads, k.shape[1]
    kv_of = (torch.arange(batch).view(batch, 1) * n_kv + kv_head.cpu().view(1, heads)).flatten()
    out = q.new_empty(batch, t_q, n_q, dim)
    lse = q.new_empty(batch, t_q, n_q)
    key_mask = sel.key_mask if sel.key_mask is not None else torch.empty(0, dtype=torch.bool)
    module = native.load()
    assert module is not None
    indices = sel.indices.reshape(batch * heads, sel.query_blocks, sel.indices.shape[-1])
    module.attend(q, k.reshape(batch * n_kv, -1, dim), v.reshape(batch * n_kv, -1, dim), kv_of, indices, key_mask,
                  heads, sel.q_len, sel.q_offset, sel.block_q, row_block, sel.block_k, sel.sinks, sel.window, fold,
                  scale, out, lse)
    return out, lse


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


class _Rows:
    """Gathers key rows of one (B, Hkv, T, D) tensor for (B, Hs, nb, K) positions into a reused buffer.

    A fresh tens-of-MiB tensor per chunk is page-faulted in on every call: measured 8x slower at 32k than
    ``index_select`` into a buffer kept across chunks.
    """

    def __init__(self, x: Tensor, kv_head: Tensor) -> None:
        batch, self.n_kv, self.t, self.dim = x.shape
        self.flat = x.reshape(-1, self.dim)  # a view for the usual contiguous cache
        self.head_base = (torch.arange(batch, device=x.device).view(batch, 1) * self.n_kv + kv_head.view(1, -1))
        self.buf: Tensor | None = None

    def __call__(self, pos: Tensor) -> Tensor:
        batch, heads, nb, width = pos.shape
        idx = (self.head_base.view(batch, heads, 1, 1) * self.t + pos).flatten()
        if self.flat.requires_grad and torch.is_grad_enabled():  # out= has no autograd
            return self.flat.index_select(0, idx).view(batch * heads, nb, width, self.dim)
        need = idx.numel() * self.dim
        if self.buf is None or self.buf.numel() < need:
            self.buf = self.flat.new_empty(need)
        out = self.buf[:need].view(idx.numel(), self.dim)
        torch.index_select(self.flat, 0, idx, out=out)
        return out.view(batch * heads, nb, width, self.dim)


def _compact(pos: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    """Trim the far keys to the chunk's widest row of visible ones.

    Budgets grow with the query position, so the fixed-width layout pads early blocks with invisible
    slots (attending them anyway doubled the far work at 32k, moba 10%). Selectors put empty slots last,
    so cutting at the last visible column is enough; rows with holes in the middle are sorted first.
    """
    if not ok.numel():
        return pos, ok
    cols = torch.arange(ok.shape[-1], device=ok.device)
    width = int(torch.where(ok, cols, -1).amax()) + 1
    visible = int(ok.sum())
    if visible < 0.9 * width * ok[..., 0].numel():  # many holes: move the visible keys first
        width = int(ok.sum(-1).max())
        order = torch.argsort((~ok).to(torch.uint8), dim=-1, stable=True)[..., :width]
        return pos.gather(-1, order), ok.gather(-1, order)
    return pos[..., :width], ok[..., :width]


def _bias(ok: Tensor) -> Tensor:
    zero = torch.zeros((), dtype=torch.float32, device=ok.device)
    return torch.where(ok, zero, torch.tensor(float("-inf"), device=ok.device))


def _blocks_per_chunk(sel: Selection, bh: int, rows: int, dim: int) -> int:
    """How many query blocks to process at once so the gathered keys and masks stay near CHUNK_BYTES."""
    n_far = sel.sinks + sel.indices.shape[-1] * sel.block_k
    n_near = min(sel.window, sel.kv_len) + sel.block_q - 1
    per_block = 4 * bh * (2 * dim * (n_far + n_near) + rows * (n_near + 2 * dim) + n_far) + bh * rows * n_near
    return max(1, min(sel.query_blocks, math.floor(CHUNK_BYTES / max(per_block, 1))))
