"""A²ATS: rank keys by q.k from product-quantized keys, attend exactly over the top keys (He et al., 2025).

At prefill each KV head's keys get a product-quantization codebook (``subspaces`` sub-vectors per key,
``centroids`` centroids each, k-means on at most ``fit_keys`` prompt keys) and every key is stored as its
codes. A decode step builds the query's lookup table (q_s . centroid) once and scores every key with
``subspaces`` table lookups, keeps the best-scoring keys (single tokens by default: ``key_block=1``) up to
the budget, plus the sinks and the local window, and attends to exactly those keys. Keys that arrive during
decode are encoded with the same codebook, one at a time. The codebook and codes live in the layer's state.

Query-aware quantization, simplified: the paper fits its codebooks to minimise the error of the attention
score q.k under the query distribution (a full query covariance, calibrated offline). Here the k-means
objective is weighted per channel by the mean q^2 of the prompt's last ``obs`` queries (all query heads of
the KV head; plus 5% of the mean, so no channel is ignored): the diagonal of that covariance, from the prompt
itself. ``query_aware=false`` gives plain product quantization.

Left out: Windowed RoPE (the paper quantizes keys with their rotary position removed up to a window, so one
codebook fits every position; longreach selectors see keys after RoPE, so these codes quantize rotated keys),
the offline calibration, and the CPU-offloaded KV cache with its heterogeneous attention (the cache stays
where it is; only the selection is computed from codes). Prefill is dense, as in the paper (the codebook is
fitted during it); ``prefill=codes`` selects in prefill too, scoring with q . (reconstructed key) per query
block — one dense matmul of score work, like ``loki`` at full rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import SpecError
from ..selection import Selection
from . import pq
from .base import BlockQuota, BudgetedMethod, SelectContext, check_int, param
from .registry import register
from .scoring import by_group, chunk_rows, group_heads, grouped_scores, query_blocks, same_keys

WEIGHT_FLOOR = 0.05  # each channel's weight is at least this fraction of the mean weight


@dataclass
class KeyCodes:
    """One layer's codebook and the codes of its first ``n`` keys; ``first``/``last`` detect a changed cache."""

    codebook: pq.Codebook
    codes: Tensor  # (B, Hkv, capacity, m), the first n filled
    n: int
    first: Tensor  # (B, Hkv, D) key 0
    last: Tensor  # (B, Hkv, D) key n - 1

    def matches(self, k: Tensor) -> bool:
        """Still this cache: same heads, no fewer keys, and the encoded keys at both ends unchanged."""
        return same_keys(self.first, self.last, self.n, k)

    def extend(self, k: Tensor) -> None:
        """Encode the keys past the first n with the same codebook (decode: one key per step)."""
        t_k = k.shape[2]
        if t_k <= self.n:
            return
        new = pq.encode(self.codebook, k[:, :, self.n:])
        if self.codes.shape[2] < t_k:  # grow by half so a decode step rarely copies the codes
            grown = self.codes.new_empty(*self.codes.shape[:2], t_k + t_k // 2, self.codes.shape[3])
            grown[:, :, : self.n] = self.codes[:, :, : self.n]
            self.codes = grown
        self.codes[:, :, self.n:t_k] = new
        self.n = t_k
        self.last = k[:, :, t_k - 1].clone()


@register
@dataclass(frozen=True)
class A2ATS(BudgetedMethod):
    name: ClassVar[str] = "a2ats"
    summary: ClassVar[str] = "decode: top-k tokens by q.k from product-quantized keys (query-aware codebook), " \
                             "exact attention over them (A²ATS)"
    paper: ClassVar[str] = "A²ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and " \
                           "Query-Aware Vector Quantization (arXiv:2502.12665, Findings of ACL 2025)"
    phases: ClassVar[tuple[str, ...]] = ("decode",)

    key_block: int | None = param(1, "key granularity in tokens (1: single tokens, as the paper retrieves)")
    subspaces: int = param(16, "product-quantization sub-spaces (sub-vectors per key)")
    centroids: int = param(64, "centroids per sub-space (codes of log2(centroids) bits)")
    iters: int = param(6, "k-means iterations (at most)")
    fit_keys: int = param(2048, "evenly spaced prompt keys the codebook is fitted on")
    obs: int = param(64, "last prompt queries whose mean q^2 per channel weights the k-means")
    query_aware: bool = param(True, "weight the k-means per channel by the observation queries (false: plain PQ)")
    prefill: str = param("dense", "dense: the prompt attends densely, as the paper; codes: select in prefill too")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("subspaces", "iters", "fit_keys", "obs"):
            check_int(self, name, getattr(self, name), minimum=1)
        check_int(self, "centroids", self.centroids, minimum=2)
        if self.centroids > 2**15:
            raise SpecError(f"a2ats: centroids must be <= 32768 (int16 codes), got {self.centroids}")
        if self.prefill not in ("dense", "codes"):
            raise SpecError(f"a2ats: prefill must be 'dense' or 'codes', got {self.prefill!r}")

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        if q.shape[2] > 1:  # a prompt (or a chunk of one): fit the codebook every later decode step reads
            self.index(q, k, ctx, refit=True)
            if self.prefill == "dense":
                return Selection.dense(q.shape[0], q.shape[2], k.shape[2], key_mask=ctx.key_mask,
                                       block=self.block, device=q.device)
        return super().select(q, k, ctx)

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        codes = self.index(q, k, ctx)
        scores = self.token_scores(q, codes, k.shape[2])  # (B, Hkv, G, nQB, Tk)
        if ctx.key_mask is not None:
            scores = scores.masked_fill(~ctx.key_mask[:, None, None, None, :], float("-inf"))
        scores = group_heads(scores, self.group, "max")  # (B, H, nQB, Tk)
        bk = self.block_k
        if bk > 1:  # a key block scores as its best key
            pad = quota.n_kb * bk - k.shape[2]
            scores = torch.nn.functional.pad(scores, (0, pad), value=float("-inf"))
            scores = scores.view(*scores.shape[:-1], quota.n_kb, bk).amax(-1)
        return self.top_blocks(scores, quota, ctx)

    # -- the index ------------------------------------------------------------------------------
    def index(self, q: Tensor, k: Tensor, ctx: SelectContext, refit: bool = False) -> KeyCodes:
        """The layer's codes for every key of k: fitted anew when asked (a prompt), when there are none or the
        cache changed under them; otherwise extended by the new keys."""
        state = ctx.state.get("a2ats")
        if refit or not isinstance(state, KeyCodes) or not state.matches(k):
            weights = self.channel_weights(q, k.shape[1]) if self.query_aware else None
            book = pq.fit(k, self.subspaces, self.centroids, self.iters, weights, self.fit_keys)
            codes = pq.encode(book, k)
            state = KeyCodes(book, codes, k.shape[2], k[:, :, 0].clone(), k[:, :, -1].clone())
            ctx.state["a2ats"] = state
        else:
            state.extend(k)
        return state

    def channel_weights(self, q: Tensor, n_kv: int) -> Tensor:
        """Mean q^2 per channel over the last ``obs`` queries of every query head of a KV head: (B, Hkv, D)."""
        recent = by_group(q[:, :, -self.obs:].float(), n_kv)  # (B, Hkv, G, obs, D)
        energy = recent.square().mean(dim=(2, 3))
        return energy + WEIGHT_FLOOR * energy.mean(-1, keepdim=True)

    # -- scoring --------------------------------------------------------------------------------
    def token_scores(self, q: Tensor, codes: KeyCodes, t_k: int) -> Tensor:
        """Approximate q.k of every key, best query of each query block: (B, Hkv, G, nQB, Tk), -inf where no
        query of the block may see the key. One query: lookup tables; more: q . reconstructed keys."""
        batch, n_q, t_q, _ = q.shape
        n_kv = codes.first.shape[1]
        book, stored = codes.codebook, codes.codes[:, :, :t_k]
        if t_q == 1:  # decode: the table lookups the method exists for
            lut = pq.tables(book, by_group(q, n_kv).flatten(2, 3))  # (B, Hkv, G, m*c)
            return pq.lookup(lut, stored, book.size).unsqueeze(3)  # (B, Hkv, G, 1, Tk)
        keys = pq.reconstruct(book, stored)  # (B, Hkv, Tk, D)
        qb, q_valid = query_blocks(q, self.block)
        qg = by_group(qb, n_kv)  # (B, Hkv, G, nQB, bq, D)
        n_qb, bq = q_valid.shape
        j = torch.arange(t_k, device=q.device)
        step = chunk_rows(4 * batch * n_q * bq * t_k * 2)
        parts = []
        for b0 in range(0, n_qb, step):
            b1 = min(b0 + step, n_qb)
            s = grouped_scores(qg[:, :, :, b0:b1], keys)  # (B, Hkv, G, nb, bq, Tk)
            pos = (t_k - t_q) + torch.arange(b0 * bq, b1 * bq, device=q.device).view(b1 - b0, bq, 1)
            hidden = (j > pos) | ~q_valid[b0:b1, :, None]
            parts.append(s.masked_fill(hidden, float("-inf")).amax(-2))
        return torch.cat(parts, dim=3)
