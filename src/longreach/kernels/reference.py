"""Ground truth: dense scores + the Selection's mask. O(T^2) on purpose; used by tests, never in production."""

from __future__ import annotations

import torch
from torch import Tensor

from ..selection import Selection
from ._heads import map_heads
from .far import FarKeys


def attend(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float, far: FarKeys | None = None, *,
           softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """q (B, Hq, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv) -> (B, Tq, Hq, Dv); computed in float64.

    With ``far``, the score of a key at distance >= far.distance is far.q . far.k instead. ``softcap``: scores
    become cap * tanh(s / cap) (Gemma 2); ``sinks`` (Hq,): one more logit per query head in the softmax
    denominator that attends to nothing (GPT-OSS)."""
    _batch, n_q, _, _ = q.shape
    n_kv = k.shape[1]
    mapping = map_heads(sel, n_q, n_kv)
    mask = mapping.sel.to_mask()  # (B, Hs, Tq, Tk)
    mask = mask.repeat_interleave(mapping.fold, dim=1)  # (B, Hq, Tq, Tk); head h*fold+i reads selection head h
    group = n_q // n_kv
    kr = k.double().repeat_interleave(group, dim=1)
    vr = v.double().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.double(), kr.transpose(-1, -2)) * scale
    if far is not None:
        kf = far.k.double().repeat_interleave(group, dim=1)
        far_scores = torch.matmul(far.q.double(), kf.transpose(-1, -2)) * scale
        pos = sel.q_offset + torch.arange(sel.q_len, device=q.device)
        dist = pos[:, None] - torch.arange(sel.kv_len, device=q.device)[None, :]
        scores = torch.where(dist >= far.distance, far_scores, scores)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:  # the sink column joins the softmax, then is dropped: it attends to nothing
        sink = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
    out = torch.matmul(probs, vr)
    return out.to(q.dtype).transpose(1, 2).contiguous()
