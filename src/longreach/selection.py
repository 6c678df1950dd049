"""The one currency of longreach: which keys does each query see?

A ``Selection`` answers that for every (batch, head, query block) with a short list of key-block
indices, plus two always-on parts: the first ``sinks`` keys and a sliding ``window`` of the most
recent keys (the query itself included). Query ``i`` sits at key position ``p = kv_len - q_len + i``
and sees key ``j`` iff

    j <= p  and  key_mask[j]  and  (j < sinks  or  j > p - window  or  block(j) in indices[qblock(i)])

Kernels turn a Selection into attention output; ``to_mask`` spells the rule out densely and is used
only by the reference kernel and tests. ``layout`` splits a run of query blocks into a *far* part
(keys every query of the block sees: sinks and chosen blocks entirely behind the window) and a *near*
part (the band around the diagonal whose visibility differs per query). Far and near are disjoint and
together cover every causal key, so kernels can attend to each and merge by log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .errors import InputError


@dataclass(frozen=True, eq=False)
class Layout:
    """Key positions and visibility for query blocks ``[b0, b1)``; see the module docstring."""

    far_pos: Tensor  # (B, Hs, nb, Kf) long, clamped into [0, kv_len)
    far_ok: Tensor  # (B, Hs, nb, Kf) bool: visible to every query of the block
    near_pos: Tensor  # (nb, Kn) long, clamped into [0, kv_len)
    near_ok: Tensor  # (B, Hs, nb, bq, Kn) bool: visible to that query
    q_valid: Tensor  # (nb, bq) bool: False for padding rows past q_len


@dataclass(frozen=True, eq=False)
class Selection:
    indices: Tensor  # (B, Hs, nQB, K) long key-block ids; -1 marks an empty slot; Hs in {1, Hkv, Hq}
    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    sinks: int = 0
    window: int = 1
    key_mask: Tensor | None = None  # (B, kv_len) bool; False = padding key nobody may see
    full: bool = False  # every causal key is visible: kernels may take their dense path

    def __post_init__(self) -> None:
        if self.indices.dim() != 4:
            raise InputError(f"Selection.indices must be 4-D (B, H, query_blocks, K), got {tuple(self.indices.shape)}")
        if self.block_q < 1 or self.block_k < 1:
            raise InputError(f"block sizes must be >= 1, got block_q={self.block_q}, block_k={self.block_k}")
        if not 1 <= self.q_len <= self.kv_len:
            raise InputError(f"need 1 <= q_len <= kv_len, got q_len={self.q_len}, kv_len={self.kv_len}")
        if self.indices.shape[2] != self.query_blocks:
            raise InputError(
                f"Selection has {self.indices.shape[2]} query blocks, expected ceil({self.q_len}/{self.block_q})"
            )
        if self.window < 1:
            raise InputError(f"window must be >= 1 (a query always sees itself), got {self.window}")
        if self.sinks < 0:
            raise InputError(f"sinks must be >= 0, got {self.sinks}")
        if self.key_mask is not None and tuple(self.key_mask.shape) != (self.indices.shape[0], self.kv_len):
            raise InputError(
                f"key_mask must be (batch, kv_len)=({self.indices.shape[0]}, {self.kv_len}), "
                f"got {tuple(self.key_mask.shape)}"
            )
        if self.full and self.window < self.kv_len:
            object.__setattr__(self, "window", self.kv_len)  # a full selection's window spans everything

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def dense(
        cls, batch: int, q_len: int, kv_len: int, *, key_mask: Tensor | None = None, block: int = 64,
        device: torch.device | str = "cpu",
    ) -> Selection:
        """Every causal key: the selection of the ``dense`` method and of any full budget."""
        n_qb = math.ceil(q_len / block)
        idx = torch.empty(batch, 1, n_qb, 0, dtype=torch.long, device=device)
        return cls(idx, q_len, kv_len, block, block, 0, kv_len, key_mask, full=True)

    @classmethod
    def local(
        cls, batch: int, q_len: int, kv_len: int, *, sinks: int, window: int, key_mask: Tensor | None = None,
        block: int = 64, device: torch.device | str = "cpu",
    ) -> Selection:
        """Sinks plus a sliding window and nothing else (StreamingLLM; sliding-window layers)."""
        n_qb = math.ceil(q_len / block)
        idx = torch.empty(batch, 1, n_qb, 0, dtype=torch.long, device=device)
        return cls(idx, q_len, kv_len, block, block, sinks, window, key_mask, full=window >= kv_len)

    # ---- geometry -----------------------------------------------------------------------------
    @property
    def q_offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def query_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_q)

    @property
    def key_blocks(self) -> int:
        return math.ceil(self.kv_len / self.block_k)

    @property
    def heads(self) -> int:
        return self.indices.shape[1]

    @property
    def batch(self) -> int:
        return self.indices.shape[0]

    def union(self, other: Selection) -> Selection:
        """Keys visible in either selection (same geometry): used to stack selectors."""
        if (self.q_len, self.kv_len, self.block_q, self.block_k) != (
            other.q_len, other.kv_len, other.block_q, other.block_k
        ):
            raise InputError("can only union Selections with the same lengths and block sizes")
        a, b = self.indices, other.indices
        heads = max(a.shape[1], b.shape[1])
        if a.shape[1] not in (1, heads) or b.shape[1] not in (1, heads):
            raise InputError(f"cannot union selections over {a.shape[1]} and {b.shape[1]} heads")
        a = a.expand(-1, heads, -1, -1)
        b = b.expand(-1, heads, -1, -1)
        mask = self.key_mask if other.key_mask is None else other.key_mask
        if self.key_mask is not None and other.key_mask is not None:
            mask = self.key_mask & other.key_mask
        return replace(
            self,
            indices=torch.cat([a, b], dim=-1),
            sinks=max(self.sinks, other.sinks),
            window=max(self.window, other.window),
            key_mask=mask,
            full=self.full or other.full,
        )

    # ---- the rule, spelled out ----------------------------------------------------------------
    def _membership(self, b0: int, b1: int) -> Tensor:
        """(B, Hs, nb, key_blocks) bool: which key blocks each query block chose."""
        blocks = self.indices[:, :, b0:b1]
        n_kb = self.key_blocks
        table = torch.zeros(*blocks.shape[:3], n_kb + 1, dtype=torch.bool, device=blocks.device)
        slot = torch.where((blocks >= 0) & (blocks < n_kb), blocks, torch.full_like(blocks, n_kb))
        table.scatter_(-1, slot, True)
        return table[..., :n_kb]

    def to_mask(self) -> Tensor:
        """Dense (B, Hs, q_len, kv_len) bool mask. O(T^2): reference kernel and tests only."""
        return self.mask_rows(torch.arange(self.q_len, device=self.indices.device))

    def mask_rows(self, qi: Tensor) -> Tensor:
        """Dense (B, Hs, len(qi), kv_len) bool mask of the queries with indices ``qi`` (diagnostics)."""
        dev = self.indices.device
        pos = self.q_offset + qi  # (rows,)
        j = torch.arange(self.kv_len, device=dev)  # (Tk,)
        causal = j[None, :] <= pos[:, None]  # (rows, Tk)
        if self.full:
            mask = causal[None, None].expand(self.batch, self.heads, -1, -1)
        else:
            near = (j[None, :] > pos[:, None] - self.window) | (j[None, :] < self.sinks)
            memb = self._membership(0, self.query_blocks)  # (B, Hs, nQB, nKB)
            chosen = memb[:, :, qi // self.block_q][:, :, :, j // self.block_k]  # (B, Hs, rows, Tk)
            mask = causal & (near | chosen)
        if self.key_mask is not None:
            mask = mask & self.key_mask[:, None, None, :]
        return mask

    def layout(self, b0: int, b1: int) -> Layout:
        """Far/near split for query blocks [b0, b1); memory O(nb * (K*block_k + block_q*(window+block_q)))."""
        dev = self.indices.device
        bq, bk, kv = self.block_q, self.block_k, self.kv_len
        nb = b1 - b0
        window = min(self.window, kv)
        sinks = min(self.sinks, kv)
        qi = torch.arange(b0 * bq, b1 * bq, device=dev).view(nb, bq)
        q_valid = qi < self.q_len
        pos = self.q_offset + qi  # (nb, bq) key position of each query
        first = pos[:, 0]  # (nb,)
        far_limit = (first - window).view(1, 1, nb, 1)  # far keys satisfy j <= first - window

        blocks = self.indices[:, :, b0:b1]  # (B, Hs, nb, K)
        blocks = _drop_duplicates(blocks)
        batch, heads = blocks.shape[:2]
        tok = torch.arange(bk, device=dev)
        blk_pos = (blocks.unsqueeze(-1) * bk + tok).flatten(-2)  # (B, Hs, nb, K*bk)
        blk_ok = (blocks >= 0).repeat_interleave(bk, dim=-1)
        blk_ok &= (blk_pos >= sinks) & (blk_pos <= far_limit) & (blk_pos < kv)
        sink_pos = torch.arange(sinks, device=dev).expand(batch, heads, nb, sinks)
        sink_ok = sink_pos <= far_limit
        far_pos = torch.cat([sink_pos, blk_pos], dim=-1).clamp(0, kv - 1)
        far_ok = torch.cat([sink_ok, blk_ok], dim=-1)

        n_near = window + bq - 1
        near_raw = (first - window + 1).unsqueeze(-1) + torch.arange(n_near, device=dev)  # (nb, Kn)
        near_pos = near_raw.clamp(0, kv - 1)
        j = near_raw.unsqueeze(1)  # (nb, 1, Kn)
        p = pos.unsqueeze(-1)  # (nb, bq, 1)
        base = (j >= 0) & (j <= p) & q_valid.unsqueeze(-1)  # (nb, bq, Kn); j <= p < kv
        always = (j > p - window) | (j < sinks)
        memb = self._membership(b0, b1)  # (B, Hs, nb, nKB)
        chosen = memb.gather(-1, (near_pos // bk).expand(batch, heads, nb, n_near))  # (B, Hs, nb, Kn)
        near_ok = base & (always | chosen.unsqueeze(-2))  # (B, Hs, nb, bq, Kn)
        if self.key_mask is not None:
            km = self.key_mask
            far_ok = far_ok & km.gather(1, far_pos.flatten(1)).view_as(far_pos)
            near_ok = near_ok & km[:, near_pos][:, None, :, None, :]
        return Layout(far_pos, far_ok, near_pos, near_ok, q_valid)

    def visible_counts(self, max_blocks_per_chunk: int = 256) -> Tensor:
        """(B, Hs, q_len) long: how many keys each query sees. O(T * budget) memory."""
        counts = []
        for b0 in range(0, self.query_blocks, max_blocks_per_chunk):
            b1 = min(b0 + max_blocks_per_chunk, self.query_blocks)
            lay = self.layout(b0, b1)
            far = lay.far_ok.sum(-1, keepdim=True)  # (B, Hs, nb, 1)
            near = lay.near_ok.sum(-1)  # (B, Hs, nb, bq)
            per_q = (far + near) * lay.q_valid
            counts.append(per_q.flatten(2))
        return torch.cat(counts, dim=-1)[..., : self.q_len]

    def visible_total(self) -> int:
        """Keys seen, summed over batch, heads and queries (= ``visible_counts().sum()``) in closed form:
        O(B * H * nQB * K) integer work, no per-query tensors — what density accounting needs at every layer.

        Key j is visible to query p when j <= p and (j > p - window or j < sinks or j's block is chosen): the
        window gives min(window, p + 1) keys, the sinks behind it min(sinks, p - window + 1), and a chosen block
        [lo, hi) the keys from max(lo, sinks) up to p - window, summed over the block's queries as a ramp.
        Padding (``key_mask``) takes the per-query path.
        """
        if self.key_mask is not None:
            return int(self.visible_counts().sum())
        if self.full:
            return int(self.causal_counts().sum()) * self.heads
        dev = self.indices.device
        window, sinks = min(self.window, self.kv_len), min(self.sinks, self.kv_len)
        pos = self.q_offset + torch.arange(self.q_len, device=dev)
        per_query = (pos + 1).clamp(max=window) + (pos - window + 1).clamp(min=0, max=sinks)
        total = int(per_query.sum()) * self.batch * self.heads
        blocks = _drop_duplicates(self.indices)
        lo = (blocks * self.block_k).clamp(min=sinks)
        hi = ((blocks + 1) * self.block_k).clamp(max=self.kv_len)
        first = self.q_offset + torch.arange(self.query_blocks, device=dev) * self.block_q
        last = (first + self.block_q - 1).clamp(max=self.kv_len - 1)
        x0, x1 = (first - window + 1).view(1, 1, -1, 1), (last - window + 1).view(1, 1, -1, 1)

        def below(x: Tensor) -> Tensor:  # sum over x' <= x of clamp(min(hi, x') - lo, 0)
            ramp = (torch.minimum(x, hi) - lo).clamp(min=0)
            return ramp * (ramp + 1) // 2 + (x - hi).clamp(min=0) * (hi - lo).clamp(min=0)

        chosen = (below(x1) - below(x0 - 1)).masked_fill((blocks < 0) | (hi <= lo), 0)
        return total + int(chosen.sum())

    def causal_counts(self) -> Tensor:
        """(B, q_len) long: how many keys each query could see under plain causal attention (+ padding)."""
        dev = self.indices.device
        pos = self.q_offset + torch.arange(self.q_len, device=dev)
        if self.key_mask is None:
            return (pos + 1).expand(self.batch, -1)
        return self.key_mask.long().cumsum(-1)[:, pos]

    def density(self) -> float:
        """Fraction of the causal (non-padding) query-key pairs this selection keeps."""
        if self.full:
            return 1.0
        seen = self.visible_counts().sum().item()
        total = self.causal_counts().sum().item() * self.heads
        return float(seen) / max(float(total), 1.0)


def _drop_duplicates(blocks: Tensor) -> Tensor:
    """Replace repeated block ids in each row by -1 so no key is counted twice."""
    if blocks.shape[-1] < 2:
        return blocks
    srt, order = blocks.sort(dim=-1)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[..., 1:] = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    srt = srt.masked_fill(dup, -1)
    return torch.empty_like(blocks).scatter_(-1, order, srt)
