"""Exact sliding-window (band) attention with log-sum-exp, for a whole prefill.

Query i sees keys (i - window, i]. Cut the sequence into chunks of ``window``: a query's keys lie in
its own chunk (causal, the fused kernel's own causal path) and in the previous chunk (one fixed
``window x window`` mask shared by every chunk). Both are fused attention calls over all chunks at
once with the chunk index as a batch dimension, so no per-block gather and no per-query mask is built;
the two parts are merged by log-sum-exp. Used for the near piece of two-piece position methods.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compat import attention_with_lse
from .dense import causal_attention_with_lse
from .lse import merge_parts


def band_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> tuple[Tensor, Tensor]:
    """q (B, Hq, T, D), k/v (B, Hkv, T, D), same T -> out (B, T, Hq, D) and lse (B, T, Hq)."""
    batch, n_q, t, dim = q.shape
    n_kv = k.shape[1]
    group = n_q // n_kv
    n = math.ceil(t / window)
    pad = n * window - t
    if pad:  # padded keys sit after every real query: causality hides them
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    chunks = lambda x: x.reshape(x.shape[0] * x.shape[1], n, window, dim)  # noqa: E731  (chunk index = heads dim)
    kc, vc = chunks(k), chunks(v)
    k_prev = torch.cat([torch.zeros_like(kc[:, :1]), kc[:, :-1]], dim=1)
    v_prev = torch.cat([torch.zeros_like(vc[:, :1]), vc[:, :-1]], dim=1)
    local = torch.arange(window, device=q.device)
    prev_ok = local[None, :] > local[:, None]  # key kk of the previous chunk is within the window of query ii
    bias = torch.zeros(window, window, dtype=q.dtype, device=q.device).masked_fill_(~prev_ok, float("-inf"))
    has_prev = (torch.arange(n, device=q.device) > 0)[:, None] & prev_ok.any(-1)[None, :]  # (n, window)
    qg = q.view(batch, n_kv, group, n * window, dim)
    outs, lses = [], []
    for r in range(group):
        qr = chunks(qg[:, :, r])
        o_diag, l_diag = causal_attention_with_lse(qr, kc, vc, scale)
        o_prev, l_prev = attention_with_lse(qr, k_prev, v_prev, bias, scale)
        o, lse = merge_parts([(o_diag, l_diag, torch.ones_like(l_diag, dtype=torch.bool)),
                              (o_prev, l_prev, has_prev.expand_as(l_prev))])
        outs.append(o.reshape(batch, n_kv, n * window, dim))
        lses.append(lse.reshape(batch, n_kv, n * window))
    out = torch.stack(outs, dim=2).reshape(batch, n_q, n * window, dim)[:, :, :t]
    lse = torch.stack(lses, dim=2).reshape(batch, n_q, n * window)[:, :, :t]
    return out.transpose(1, 2), lse.transpose(1, 2)
