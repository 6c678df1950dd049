"""Small tensor helpers shared by the block-scoring methods: query blocks, head groups, estimates."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..stages import PLAIN, SoftmaxExtras

SCORE_BYTES = 64 * 2**20  # bound on any (queries x keys) score chunk a selector materialises


def query_blocks(q: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """q (B, H, Tq, D) -> fp32 (B, H, nQB, block, D) zero-padded, and q_valid (nQB, block).

    Fewer queries than one block (decode) make one block of Tq rows: padding a single decode query to
    the block size multiplied the scoring work by the block size.
    """
    batch, heads, t_q, dim = q.shape
    block = min(block, max(t_q, 1))
    n_qb = math.ceil(t_q / block)
    pad = n_qb * block - t_q
    qf = q.float()
    if pad:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, pad))
    q_valid = (torch.arange(n_qb * block, device=q.device) < t_q).view(n_qb, block)
    return qf.view(batch, heads, n_qb, block, dim), q_valid


def mean_queries(q: Tensor, block: int) -> Tensor:
    """Mean query of each query block (padding excluded): (B, H, nQB, D)."""
    qb, valid = query_blocks(q, block)
    # padding rows are zeros: the block sum is the valid queries' sum (qb * weights would copy all of q)
    return qb.sum(dim=-2) / valid.sum(-1).clamp(min=1)[:, None]


def by_group(x: Tensor, n_kv: int) -> Tensor:
    """(B, Hq, ...) -> (B, Hkv, G, ...): the query heads that share each KV head."""
    return x.view(x.shape[0], n_kv, x.shape[1] // n_kv, *x.shape[2:])


def grouped_scores(rows: Tensor, keys: Tensor) -> Tensor:
    """Query rows grouped by KV head (B, H, G, *S, *R, D) against the keys their G heads share (B, H, *S, N, D):
    (B, H, G, *S, *R, N). ``S``: the dims the keys vary with too (a query block's own candidate keys); keys of
    shape (B, H, N, D) serve every row.

    One GEMM over the G x R rows of each (head, *S). A broadcast matmul (rows against ``keys.unsqueeze(2)``)
    copies the keys for every query head and runs a small product per row: 11x slower for one decode query over
    4k keys (SmolLM2's 9/3 heads, one thread), 1.4-12x on the selectors' prefill shapes.
    """
    n_s = keys.dim() - 4
    moved = rows.movedim(2, 2 + n_s)  # (B, H, *S, G, *R, D): a view, and no move at all when S is empty
    flat = moved.reshape(*keys.shape[:2 + n_s], -1, rows.shape[-1])  # (B, H, *S, G*R, D)
    out = (flat @ keys.mT).view(*moved.shape[:-1], keys.shape[-2]).movedim(2 + n_s, 2)
    return out if n_s == 0 else out.contiguous()


def group_heads(grouped: Tensor, group: str, how: str) -> Tensor:
    """Scores by head group (B, Hkv, G, ...) -> the selection's heads: combined over G (``how``: max,
    sum or mean) for group=kv, or one row per query head (B, Hq, ...) for group=q."""
    if group != "kv":
        return grouped.flatten(1, 2)
    return {"max": grouped.amax, "sum": grouped.sum, "mean": grouped.mean}[how](dim=2)


def reduce_heads(scores: Tensor, n_kv: int, group: str, how: str) -> Tensor:
    """Per-query-head scores (B, Hq, ...) -> the selection's heads: (B, Hkv, ...) for group=kv."""
    return group_heads(by_group(scores, n_kv), group, how)


def expand_kv(k: Tensor, n_q: int) -> Tensor:
    """(B, Hkv, T, D) -> (B, Hq, T, D): each KV head repeated for the query heads that read it (a copy)."""
    batch, n_kv, length, dim = k.shape
    return k[:, :, None].expand(batch, n_kv, n_q // n_kv, length, dim).reshape(batch, n_q, length, dim)


def causal_probs(q: Tensor, k: Tensor, scale: float, rows: Tensor | None = None, key_mask: Tensor | None = None,
                 window: int | None = None, extras: SoftmaxExtras = PLAIN) -> Tensor:
    """Exact causal softmax of queries over keys, the query heads of each KV head grouped: (B, Hkv, G, R, Tk), fp32.

    The one place the methods, presses, head policies, position methods and diagnostics compute real attention
    probabilities. ``rows`` picks queries (indices into q's Tq; default all); query i sits at key position
    Tk - Tq + i. ``key_mask`` (B, Tk) drops padding keys; ``window`` keeps only each query's last ``window``
    keys (a sliding layer). ``extras``: the model's own softmax (a softcap on the logits; learned sinks, which
    take their share, so a row then sums to 1 - the sink's share). A row that sees no key comes back as zeros.
    K is never repeated per query head: the group's queries are one matmul against their KV head.
    """
    batch, n_q, t_q, dim = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    picked = q if rows is None else q[:, :, rows]
    rows = torch.arange(t_q, device=q.device) if rows is None else rows
    grouped = picked.float().reshape(batch, n_kv, (n_q // n_kv) * len(rows), dim)
    # in place from here on: at 16k the 64 last queries' logits are 38 MiB a layer (SmolLM2), each copy as much
    logits = (grouped @ k.float().transpose(-1, -2)).mul_(scale).view(batch, n_kv, n_q // n_kv, len(rows), t_k)
    pos = (t_k - t_q) + rows
    cols = torch.arange(t_k, device=q.device)
    hidden = cols[None, :] > pos[:, None]  # (R, Tk)
    if window is not None:
        hidden = hidden | (cols[None, :] <= pos[:, None] - window)
    if key_mask is not None:
        hidden = hidden | ~key_mask[:, None, None, None, :]
    logits = extras.cap(logits).masked_fill_(hidden, float("-inf"))
    if extras.sinks is not None:
        return with_sinks(logits, grouped_sinks(extras.sinks, n_kv).to(logits.device)[None, :, :, None])
    probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()  # the softmax, in place
    probs = probs.div_(probs.sum(dim=-1, keepdim=True))
    # without padding or a window every query sees itself; otherwise an all-hidden row is NaN: make it zeros
    return probs if key_mask is None and window is None else probs.nan_to_num_(0.0)


def grouped_sinks(sinks: Tensor, n_kv: int) -> Tensor:
    """Sink logits per query head (Hq,) -> (Hkv, G) fp32, as ``by_group`` lays the query heads out."""
    return sinks.float().view(n_kv, -1)


def with_sinks(logits: Tensor, sink: Tensor) -> Tensor:
    """softmax over [logits, sink] with the sink's column dropped: each key's true share (rows sum to < 1).

    ``sink`` broadcasts to logits[..., 0] (one logit per row, e.g. per head). Computed through the log-sum-exp
    rather than a concatenated column, so no copy of the logits is made; a row with no visible key is zeros."""
    lse = torch.logaddexp(logits.logsumexp(dim=-1), sink.expand(logits.shape[:-1]))
    return (logits - lse.unsqueeze(-1)).exp_().nan_to_num_(0.0)


def last_query_probs(q: Tensor, k: Tensor, n_last: int, scale: float, key_mask: Tensor | None = None,
                     extras: SoftmaxExtras = PLAIN) -> Tensor:
    """Exact causal softmax of the last ``n_last`` queries over all keys: (B, Hq, n, Tk), fp32.

    The cheap, exact estimate MInference and FlexPrefill start from: O(n * T) per head.
    """
    t_q = q.shape[2]
    rows = torch.arange(t_q - min(n_last, t_q), t_q, device=q.device)
    return causal_probs(q, k, scale, rows, key_mask, extras=extras).flatten(1, 2)


def keys_share(mass: Tensor) -> Tensor:
    """Attention mass (last dim: keys or key blocks) as a fraction of the keys' own total: a learned sink's share
    belongs to no key, so distributions compared or thresholded against a probability are taken over the keys."""
    return mass / mass.sum(-1, keepdim=True).clamp(min=1e-30)


def last_blocks_exact(probs: Tensor, t_q: int, block_q: int, block_k: int) -> Tensor:
    """(B, H, m, nKB): for each of the m query blocks that the exactly attended last queries fall in (the last
    ``probs.shape[2]`` of ``t_q`` queries), each key block's largest share of attention among those queries.

    They are the ones that write the answer, and their attention is known exactly (the estimate computed it).
    Averaged into a pattern, a key block that only the question needs (the needle it asks for) weighs 1/last_q
    of its mass and loses to the diagonals: measured on SmolLM2 at 4k without a chat template, vslash and
    flexprefill kept none of the last query's needle mass in layers 14, 20 and 21 (docs/template-free.md).
    Scored by its queries' own maximum, no query loses a key block it needs, within the same budget.
    """
    return last_rows_max(block_sums(probs, block_k), t_q, block_q)


def last_rows_max(x: Tensor, t_q: int, block_q: int) -> Tensor:
    """(B, H, n, X) scores of the last n of ``t_q`` queries -> (B, H, m, X): the maximum over the rows of each of
    the m query blocks they fall in. Every block they fall in gets a row, not only the last: a prompt one token
    past a block boundary leaves a last block of one query, and the question in the block before it
    (docs/template-free.md)."""
    first = t_q - x.shape[2]  # the first row's query index; Python ints, so no device sync per layer
    rows = [(max(b * block_q, first) - first, min((b + 1) * block_q, t_q) - first)
            for b in range(first // block_q, (t_q - 1) // block_q + 1)]
    return torch.stack([x[:, :, lo:hi].amax(2) for lo, hi in rows], dim=2)


def block_sums(x: Tensor, block: int) -> Tensor:
    """Sum consecutive groups of ``block`` along the last dim (zero-padding the tail)."""
    length = x.shape[-1]
    n = math.ceil(length / block)
    pad = n * block - length
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(*x.shape[:-1], n, block).sum(-1)


def chunk_rows(bytes_per_row: int) -> int:
    """How many rows fit in one SCORE_BYTES chunk (at least one)."""
    return max(1, SCORE_BYTES // max(bytes_per_row, 1))


def gather_keys(keys: Tensor, pos: Tensor) -> Tensor:
    """keys (B, H, T, D) at positions pos (B, H, ...) -> (B, H, ..., D)."""
    flat = pos.reshape(pos.shape[0], pos.shape[1], -1)
    out = keys.gather(2, flat[..., None].expand(-1, -1, -1, keys.shape[-1]))
    return out.view(*pos.shape, keys.shape[-1])


def slash_sums(probs: Tensor, t_k: int) -> Tensor:
    """Attention mass per diagonal offset o = query_pos - key_pos of the last queries: (B, H, n, Tk) -> (B, H, Tk)."""
    n = probs.shape[2]
    out = probs.new_zeros(*probs.shape[:2], t_k)
    for i in range(n):  # row by row, each reversed: offset o of query p is key p - o (a gather would copy probs)
        p = t_k - n + i
        out[..., : p + 1] += probs[:, :, i, : p + 1].flip(-1)
    return out


def sorted_count_to_reach(mass: Tensor, already: Tensor, target: float | Tensor) -> Tensor:
    """How many of the largest entries of ``mass`` (last dim) bring ``already + their sum`` to ``target``.

    The cumulative-threshold rule of Twilight (top-p) and FlexPrefill (gamma); entries with no mass
    are never counted. A tensor ``target`` is per row (``already``'s shape).
    """
    srt = mass.sort(dim=-1, descending=True).values
    before = srt.cumsum(-1) - srt  # mass kept before adding each entry
    if isinstance(target, Tensor):
        target = target.unsqueeze(-1)
    return (((already.unsqueeze(-1) + before) < target) & (srt > 0)).sum(-1)


def same_keys(first: Tensor, last: Tensor, n: int, k: Tensor) -> bool:
    """Whether keys a method indexed earlier (``first``/``last``: (B, Hkv, D) keys 0 and n - 1) are still the
    first ``n`` of ``k``: the same sequence, not shrunk or reordered by a press. Compared up to a change of
    stored precision (``kvquant`` re-stores them as int8/int4 codes: a few percent of a key's norm), not
    exactly; another token's key, or a far key re-rotated by a position method, is far outside a quarter of
    the norm."""
    if n == 0 or first.shape != k[:, :, 0].shape or k.shape[2] < n:
        return False

    def close(a: Tensor, b: Tensor) -> bool:
        a, b = a.float(), b.float()
        return bool(((a - b).norm(dim=-1) <= 0.25 * a.norm(dim=-1) + 1e-12).all())

    return close(first, k[:, :, 0]) and close(last, k[:, :, n - 1])
