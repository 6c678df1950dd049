"""Span boundaries from local attention, the triangles of Ltri-LLM: evidence that streams in with the queries.

Inside a span of related tokens, queries attend to keys of their own span: on the attention map each span is
a triangle on the diagonal. A boundary b is where the queries just after b stop looking back across it. For
each query i whose local band (its last ``band`` keys) straddles b, the evidence is

    strength_i(b) = U_i(b) - A_i(b)

with A_i(b) the attention mass query i puts on band keys before b and U_i(b) the share a uniform attention
over the band would put there: positive when i looks back across b less than an unbiased reader would.
Strengths are summed per candidate boundary (every ``atom`` tokens) as queries arrive (a prefill's all at
once, one per decode step), so boundaries need no query to be kept. ``boundaries`` turns the running means
into spans by non-maximum suppression.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..stages import PLAIN, SoftmaxExtras
from .scoring import by_group, chunk_rows, grouped_scores


def band_evidence(q: Tensor, k: Tensor, p0: int, band: int, atom: int, scale: float,
                  key_mask: Tensor | None = None, extras: SoftmaxExtras = PLAIN) -> tuple[Tensor, Tensor, Tensor]:
    """Boundary evidence and key mass from the queries at key positions [p0, Tk) over their local bands.

    Each query's band attention is a distribution over its band's keys (conditional on attending within the
    band): a model's logit softcap shapes it (``extras``), while a learned sink logit, like every key outside the
    band, is not part of it.

    q (B, Hq, Tq, D) holds the queries of the last Tq positions (Tk - p0 <= Tq), k (B, Hkv, Tk, D).
    Returns, per KV head (query heads of a group averaged):
      strength (B, Hkv, nA): summed strength_i(b) at each atom boundary b = a * atom (a >= 1),
      count (nA,): how many queries contributed to each boundary,
      mass (B, Hkv, Tk): the band attention each key received (a query gives 1 over its band).
    Work O((Tk - p0) * band * D) per query head: each run of ``band`` queries against its ~2*band keys.
    """
    batch, n_q, t_q, dim = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    n_atoms = math.ceil(t_k / atom)
    dev = q.device
    strength = torch.zeros(batch, n_kv, n_atoms + 1, device=dev)
    count = torch.zeros(n_atoms + 1, device=dev)
    mass = torch.zeros(batch, n_kv, t_k, device=dev)
    n_new = t_k - p0
    if n_new <= 0:
        return strength[..., :n_atoms], count[:n_atoms], mass
    n_blocks = math.ceil(n_new / band)
    pad = n_blocks * band - n_new
    qn = q[:, :, t_q - n_new:].float()
    if pad:
        qn = torch.nn.functional.pad(qn, (0, 0, 0, pad))
    qg = by_group(qn, n_kv).reshape(batch, n_kv, n_q // n_kv, n_blocks, band, dim)  # (B, Hkv, G, nb, w, D)
    n_cols = math.ceil((2 * band + atom - 1) / atom) * atom  # keys of one block of bands, from an atom start
    step = chunk_rows(4 * batch * n_q * band * n_cols * 2)
    for b0 in range(0, n_blocks, step):
        b1 = min(b0 + step, n_blocks)
        qpos = p0 + torch.arange(b0 * band, b1 * band, device=dev).view(b1 - b0, band)  # (nb, w)
        start = torch.div(qpos[:, 0] - band + 1, atom, rounding_mode="floor") * atom  # (nb,) atom-aligned
        kpos = start[:, None] + torch.arange(n_cols, device=dev)  # (nb, cols)
        kidx = kpos.clamp(0, t_k - 1)
        rel = qpos[..., None] - kpos[:, None, :]  # (nb, w, cols): how far each key is behind each query
        real_q = (qpos < t_k)[..., None]
        ok = (rel >= 0) & (rel < band) & (kpos >= 0)[:, None, :] & real_q  # (nb, w, cols): in the band
        ok = ok.unsqueeze(0) if key_mask is None else ok & key_mask[:, kidx][:, :, None, :]  # (B or 1, nb, w, cols)
        okf = ok.float()
        logits = grouped_scores(qg[:, :, :, b0:b1], k[:, :, kidx].float())  # (B, Hkv, G, nb, w, cols)
        bias = (okf - 1) * 1e30  # finite, so a query with no key in its band gives no NaN (its row is zeroed)
        probs = (extras.cap(logits * scale) + bias[:, None, None]).softmax(-1).mean(2)
        probs = probs * okf[:, None]  # (B, Hkv, nb, w, cols)
        mass.index_add_(2, kidx.flatten(), probs.sum(3).flatten(2))
        # per atom-wide group of columns: the mass before each group's first key b, actual and uniform
        n_grp = n_cols // atom
        got = probs.view(*probs.shape[:-1], n_grp, atom).sum(-1)  # (B, Hkv, nb, w, groups)
        even = okf.view(*okf.shape[:-1], n_grp, atom).sum(-1)
        even = even / even.sum(-1, keepdim=True).clamp(min=1)
        before = (even.cumsum(-1) - even)[:, None] - (got.cumsum(-1) - got)  # U_i(b) - A_i(b)
        # b is a candidate boundary for query i when keys b - 1 and b are both in i's band
        b = kpos[:, ::atom]  # (nb, groups)
        rel_b = qpos[..., None] - b[:, None, :]
        straddle = (rel_b >= 0) & (rel_b <= band - 2) & (b > 0)[:, None, :] & real_q  # (nb, w, groups)
        slot = torch.where(straddle.any(1), b // atom, n_atoms).flatten()  # (nb * groups,)
        strength.index_add_(2, slot, (before * straddle).sum(3).flatten(2))
        count.index_add_(0, slot, straddle.sum(1).flatten().float())
    return strength[..., :n_atoms], count[:n_atoms], mass


def boundaries(strength: Tensor, count: Tensor, min_span: int, max_span: int) -> Tensor:
    """Span id of every atom (B, H, nA) long, ids increasing from 0, from the running boundary evidence.

    A boundary is a local maximum of the mean strength within ``min_span - 1`` atoms either side (1-D
    non-maximum suppression) that is also above the head's mean strength; atoms with no evidence yet are never
    boundaries. Spans longer than ``max_span`` atoms are cut every ``max_span`` atoms.
    """
    n_atoms = strength.shape[-1]
    known = count > 0
    mean = torch.where(known, strength / count.clamp(min=1), torch.full_like(strength, float("-inf")))
    known_f = known.float()
    level = (mean.nan_to_num(0.0, neginf=0.0) * known_f).sum(-1, keepdim=True) / known_f.sum().clamp(min=1)
    radius = max(min_span - 1, 0)
    flat = mean.reshape(-1, 1, n_atoms)
    peak = torch.nn.functional.max_pool1d(flat, 2 * radius + 1, stride=1, padding=radius).view_as(mean)
    start = known & (mean >= peak) & (mean > level)
    atoms = torch.arange(n_atoms, device=strength.device)
    start[..., 0] = True
    last = torch.where(start, atoms, torch.zeros_like(atoms)).cummax(-1).values  # the boundary each atom follows
    start = start | ((atoms - last) % max_span == 0)
    return start.long().cumsum(-1) - 1


def fixed_spans(shape: tuple[int, ...], n_atoms: int, max_span: int, device: torch.device) -> Tensor:
    """Span ids when spans are simply every ``max_span`` atoms: (*shape, nA)."""
    return (torch.arange(n_atoms, device=device) // max_span).expand(*shape, n_atoms)
