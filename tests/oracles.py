"""Independent oracles, written from the papers' formulas in plain loops and torch (never from longreach's helpers).

Each function takes the raw queries/keys and returns what the method should choose, so tests compare the library
with something it did not compute itself. Shapes follow longreach: q (B, Hq, Tq, D), k (B, Hkv, Tk, D); query
``i`` sits at key position ``Tk - Tq + i``; the query heads ``h * G .. h * G + G - 1`` read KV head ``h``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def causal_mask(t_q: int, t_k: int) -> Tensor:
    """(Tq, Tk) bool: query i (at position Tk - Tq + i) sees keys 0..its position."""
    return torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Plain causal softmax attention in fp32, GQA by repeating each KV head: (B, Tq, Hq, D)."""
    group = q.shape[1] // k.shape[1]
    kx, vx = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    logits = q.float() @ kx.transpose(-1, -2) * scale
    logits = logits.masked_fill(~causal_mask(q.shape[2], k.shape[2]), float("-inf"))
    return (logits.softmax(-1) @ vx).transpose(1, 2)


def causal_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Causal softmax of every query of q over k, one row per query head: (B, Hq, Tq, Tk), fp32."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    for b in range(q.shape[0]):
        for hq in range(q.shape[1]):
            keys = k[b, hq // group].float()
            for i in range(q.shape[2]):
                pos = k.shape[2] - q.shape[2] + i
                logits = keys[: pos + 1] @ q[b, hq, i].float() * scale
                out[b, hq, i, : pos + 1] = torch.softmax(logits, dim=0)
    return out


# ---- block top-k selectors: Quest and MoBA ------------------------------------------------------------------------


def block_geometry(t_q: int, t_k: int, block: int, sinks: int, window: int, budget: int):
    """Per query block: (query rows, candidate key blocks, how many to take).

    A key block is a candidate when some of its keys lie past the sinks and behind the local window of the block's
    last query; the budget counts sinks and window, and buys whole key blocks with the rest.
    """
    n_kb = math.ceil(t_k / block)
    out = []
    for qb in range(math.ceil(t_q / block)):
        rows = list(range(qb * block, min(t_q, (qb + 1) * block)))
        last = t_k - t_q + rows[-1]
        cand = [j for j in range(n_kb) if j * block <= last - window and min((j + 1) * block, t_k) > sinks]
        # a budget covering every causal key takes every candidate; otherwise whole blocks past sinks and window
        take = len(cand) if budget >= last + 1 else min(max((budget - sinks - window) // block, 0), len(cand))
        out.append((rows, cand, take))
    return out


def quest_bound(q: Tensor, keys: Tensor) -> Tensor:
    """Quest's upper bound of q.k over a block of keys: sum_d max(q_d * max_d, q_d * min_d) (one value per query row).

    q (R, D), keys (n, D) -> (R,)."""
    kmax, kmin = keys.max(dim=0).values, keys.min(dim=0).values
    return torch.maximum(q * kmax, q * kmin).sum(-1)


def moba_score(q: Tensor, keys: Tensor) -> Tensor:
    """MoBA's gate: each query against the mean key of the block. q (R, D), keys (n, D) -> (R,)."""
    return q @ keys.mean(dim=0)


def block_topk_oracle(q: Tensor, k: Tensor, *, block: int, sinks: int, window: int, budget: int, group: str,
                      per_token, over_queries: str, over_heads: str, share_scale: float | None = None,
                      softcap: float | None = None, sink_logits: Tensor | None = None) -> list[list[list[set[int]]]]:
    """Chosen key blocks [b][head][query block] of a block top-k selector, scored block by block.

    ``per_token(q_rows, keys) -> (R,)`` is the paper's score of one key block for each query; a query block
    aggregates its queries with ``over_queries`` and, with group=kv, the query heads of a KV head with
    ``over_heads`` ("max" or "mean"); the best ``take`` candidate blocks are chosen. ``share_scale``: each
    query's scores first become its log-shares over the query block's candidates, log(softmax(scale * score)),
    the scaled scores softcapped (cap * tanh(s / cap)) and a query head's sink logit in the denominator if given.
    """
    reduce = {"max": lambda t: t.max(), "mean": lambda t: t.mean()}
    batch, n_q, t_q, _ = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    group_size = n_q // n_kv
    geometry = block_geometry(t_q, t_k, block, sinks, window, budget)
    heads = range(n_kv) if group == "kv" else range(n_q)
    chosen = []
    for b in range(batch):
        per_head = []
        for h in heads:
            q_heads = range(h * group_size, (h + 1) * group_size) if group == "kv" else [h]
            kv = h if group == "kv" else h // group_size
            per_block = []
            for rows, cand, take in geometry:
                # raw[hq][j]: (R,) the score of key block j for each query row of head hq
                raw = {hq: {j: per_token(q[b, hq, rows].float(), k[b, kv, j * block: min((j + 1) * block, t_k)].float())
                            for j in cand} for hq in q_heads}
                if share_scale is not None and cand:
                    for hq in q_heads:
                        logits = (torch.stack([raw[hq][j] for j in cand]) * share_scale).double()  # (n_cand, R)
                        if softcap is not None:
                            logits = softcap * torch.tanh(logits / softcap)
                        total = logits.exp().sum(0)
                        if sink_logits is not None:
                            total = total + math.exp(float(sink_logits[hq]))
                        shares = logits - total.log()
                        raw[hq] = {j: shares[i] for i, j in enumerate(cand)}
                scores = {j: float(reduce[over_heads](torch.stack([reduce[over_queries](raw[hq][j])
                                                                    for hq in q_heads]))) for j in cand}
                best = sorted(cand, key=lambda j: scores[j], reverse=True)[:take]
                per_block.append(set(best))
            per_head.append(per_block)
        chosen.append(per_head)
    return chosen


# ---- presses ------------------------------------------------------------------------------------------------------


def pool_1d(x: Tensor, width: int, how: str = "avg", count_pad: bool = False) -> Tensor:
    """Pool the last dim over ``width`` neighbours centred on each position (left-leaning for even widths),
    at stride 1 and the input's length; ``count_pad``: an average divides by ``width`` even at the edges."""
    if width == 1:
        return x.clone()
    n = x.shape[-1]
    out = torch.empty_like(x)
    for j in range(n):
        lo = j - width // 2
        inside = [t for t in range(lo, lo + width) if 0 <= t < n]
        vals = x[..., inside]
        if how == "max":
            out[..., j] = vals.max(-1).values
        else:
            out[..., j] = vals.sum(-1) / (width if count_pad else len(inside))
    return out


def top_keep_oracle(scores: Tensor, capacity: int, sinks: int, recent: int) -> Tensor:
    """Sinks and the last ``recent`` positions, then the best-scoring others up to ``capacity``: (B, H, capacity)
    ascending, chosen one row at a time by sorting (no topk)."""
    batch, heads, n = scores.shape
    out = torch.empty(batch, heads, capacity, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            forced = [j for j in range(n) if j < sinks or j >= n - recent]
            rest = sorted((j for j in range(n) if j not in set(forced)), key=lambda j: -float(scores[b, h, j]))
            out[b, h] = torch.tensor(sorted(forced + rest[: capacity - len(forced)]))
    return out


def snapkv_votes(q_win: Tensor, k: Tensor, scale: float, vote: str = "sum") -> Tensor:
    """SnapKV's votes: the last w queries' causal softmax over all n keys, summed over those queries (``vote="max"``:
    the largest of them, per key and query head), averaged over the query heads reading each KV head: (B, Hkv, n)."""
    probs = causal_probs(q_win, k, scale)  # (B, Hq, w, n)
    group = q_win.shape[1] // k.shape[1]
    per_head = probs.sum(dim=2) if vote == "sum" else probs.max(dim=2).values  # (B, Hq, n)
    return torch.stack([per_head[:, h * group : (h + 1) * group].mean(1) for h in range(k.shape[1])], dim=1)


def snapkv_keep(q_win: Tensor, k: Tensor, scale: float, capacity: int, *, sinks: int, pool: int,
                scope: str = "all", count_pad: bool = False, how: str = "avg", vote: str = "sum") -> Tensor:
    """Positions SnapKV keeps per KV head (B, Hkv, capacity), ascending: the observation window (the last w = the
    number of queries) always, plus the prefix keys with the highest pooled votes (and ``sinks``, a longreach
    addition; 0 in the paper).

    ``scope``: "prefix" pools the votes of the prefix keys only, as SnapKV's reference code does (it slices
    ``attn_weights[..., :-window]`` before ``avg_pool1d``, whose zero padding counts: ``count_pad=True``);
    "all" pools over every key, the window's included, as longreach does (see the report in test_oracles).
    """
    n, w = k.shape[2], q_win.shape[2]
    votes = snapkv_votes(q_win, k, scale, vote)
    if scope == "prefix":
        pooled = torch.cat([pool_1d(votes[..., : n - w], pool, how, count_pad), votes[..., n - w :]], dim=-1)
    else:
        pooled = pool_1d(votes, pool, how, count_pad)
    return top_keep_oracle(pooled, capacity, sinks, w)
