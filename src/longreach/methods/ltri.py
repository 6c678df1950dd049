"""Ltri-LLM: sinks + local window (the streaming triangle) plus retrieved spans (Tang et al., arXiv:2412.04757).

The keys are cut into spans of related tokens; each span has an index vector, and each query block keeps
the spans whose index vectors score best against its queries, whole, best span first, until the budget is
spent (the last span may be cut; within a span the best-scoring atoms go first). Sinks and the local window
are always kept.

Spans. Boundaries fall on ``key_block``-token atoms. With ``boundaries=attention`` (default) every query's
local band attention (its last ``probe`` keys) is evidence for where spans start (``spans.band_evidence``:
the queries after a span start stop looking back across it, the triangles of the paper); boundaries are the
local maxima of that evidence (non-maximum suppression over ``min_span`` tokens) above the head's mean, and
spans longer than ``max_span`` tokens are cut. The evidence streams in with the queries (a prefill's all at
once, then one per decode step) and lives in the layer's state with the index sums, so a decode step does
O(probe * D) evidence work, re-sums the few atoms it touched, and scores O(T / key_block) vectors.
``boundaries=fixed`` cuts a span every ``max_span`` tokens.

Index vectors: the mean of the span's keys weighted by the band attention each key received (+0.1, about a
tenth of a key's average, so unseen keys still count): the keys a span's own queries read most.

Simplifications against the paper: boundaries come from this evidence and 1-D NMS, not from the paper's
triangle scoring on the attention map; one index vector per span (the paper has static and dynamic index
vectors); no persistent recall of earlier spans across steps and no retrieval-head voting; spans are scored per
query block (prefill) or per query (decode) instead of per streamed chunk; the KV stays in memory (no offline
index). In one prefill call the spans of the whole prompt are known when selecting (the paper streams chunk
by chunk: chunked prefill does that here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import SpecError
from ..selection import Selection
from . import spans
from .base import BlockQuota, BudgetedMethod, SelectContext, check_int, param
from .registry import register
from .scoring import by_group, chunk_rows, group_heads, grouped_scores, query_blocks, same_keys

PRIOR_MASS = 0.1  # added to every key's received mass in the index vectors


@dataclass
class SpanIndex:
    """One layer's running state: boundary evidence, key mass and per-atom index sums for the first ``seen``
    positions; ``first``/``last`` detect a cache that changed under it (a press, a re-mapping)."""

    strength: Tensor  # (B, Hkv, nA)
    count: Tensor  # (nA,)
    mass: Tensor  # (B, Hkv, T)
    wsum: Tensor  # (B, Hkv, nA, D): sum over the atom's keys of weight * key
    msum: Tensor  # (B, Hkv, nA): sum of the weights
    seen: int
    first: Tensor
    last: Tensor

    def matches(self, k: Tensor) -> bool:
        return same_keys(self.first, self.last, self.seen, k)


def _grow(x: Tensor, size: int, dim: int) -> Tensor:
    """Zero-pad ``x`` along ``dim`` to ``size``."""
    if x.shape[dim] >= size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


@register
@dataclass(frozen=True)
class Ltri(BudgetedMethod):
    name: ClassVar[str] = "ltri"
    summary: ClassVar[str] = "sinks + window + top spans (boundaries from local attention triangles, NMS), " \
                             "scored by span index vectors (Ltri-LLM)"
    paper: ClassVar[str] = "Ltri-LLM: Streaming Long Context Inference for LLMs with Training-Free Dynamic " \
                           "Triangular Attention Pattern (arXiv:2412.04757)"

    key_block: int | None = param(16, "atom: span boundaries fall every key_block tokens")
    boundaries: str = param("attention", "attention: spans from local-attention evidence + NMS; fixed: every "
                            "max_span tokens")
    probe: int = param(64, "local band (keys) each query's boundary evidence is measured over")
    min_span: int = param(32, "shortest span in tokens (the NMS radius)")
    max_span: int = param(128, "longest span in tokens (longer spans are cut)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("probe", "min_span", "max_span"):
            check_int(self, name, getattr(self, name), minimum=1)
        if self.boundaries not in ("attention", "fixed"):
            raise SpecError(f"ltri: boundaries must be 'attention' or 'fixed', got {self.boundaries!r}")
        if self.min_span > self.max_span:
            raise SpecError(f"ltri: min_span ({self.min_span}) must not exceed max_span ({self.max_span})")

    @property
    def span_atoms(self) -> tuple[int, int]:
        """(min, max) span length in atoms."""
        bk = self.block_k
        return max(1, math.ceil(self.min_span / bk)), max(1, self.max_span // bk)

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        # every call folds its queries into the index, also one that attends everything (a prompt shorter than
        # the budget): otherwise the evidence of those queries would be missing for good once selection starts
        self.update(q, k, ctx)
        return super().select(q, k, ctx)

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        index = self.update(q, k, ctx)  # select updated it already: a second update adds nothing
        n_kv = k.shape[1]
        lo, hi = self.span_atoms
        if self.boundaries == "attention":
            span_of = spans.boundaries(index.strength, index.count, lo, hi)  # (B, Hkv, nA)
        else:
            span_of = spans.fixed_spans(index.msum.shape[:2], quota.n_kb, hi, q.device)
        n_spans = int(span_of.max()) + 1  # span slots of the head with the most spans
        atom_vec = index.wsum / index.msum.clamp(min=1e-9)[..., None]  # (B, Hkv, nA, D)
        span_sum = _segment_sum(index.wsum, span_of, n_spans)
        span_w = _segment_sum(index.msum.unsqueeze(-1), span_of, n_spans).squeeze(-1)
        span_vec = span_sum / span_w.clamp(min=1e-9)[..., None]  # (B, Hkv, nS, D); a head's unused slots are 0
        span_s, atom_s = self.scores(q, span_vec, atom_vec)  # (B, H, nQB, nS), (B, H, nQB, nA)
        heads = span_s.shape[1]
        if heads != n_kv:  # group=q: each query head ranks its KV head's spans
            span_of = span_of.repeat_interleave(heads // n_kv, dim=1)
        # rank spans best first; an atom's key is its span's rank, ties broken by the atom's own score
        order = span_s.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=q.device)
                                                .expand_as(order).contiguous())
        atom_rank = rank.gather(-1, span_of.unsqueeze(2).expand(-1, -1, quota.n_qb, -1))
        keys = -atom_rank.double() + 0.5 * torch.sigmoid(atom_s.double())
        return self.top_blocks(keys, quota, ctx)

    # -- the running index --------------------------------------------------------------------------
    def update(self, q: Tensor, k: Tensor, ctx: SelectContext) -> SpanIndex:
        """Fold the queries not seen yet into the layer's evidence and re-sum the atoms whose keys changed."""
        batch, n_kv, t_k, dim = k.shape
        atom = self.block_k
        n_atoms = math.ceil(t_k / atom)
        state = ctx.state.get("ltri")
        if not isinstance(state, SpanIndex) or not state.matches(k):
            dev = k.device
            state = SpanIndex(torch.zeros(batch, n_kv, 0, device=dev), torch.zeros(0, device=dev),
                              torch.zeros(batch, n_kv, 0, device=dev), torch.zeros(batch, n_kv, 0, dim, device=dev),
                              torch.zeros(batch, n_kv, 0, device=dev), 0, k[:, :, 0].clone(), k[:, :, 0].clone())
            ctx.state["ltri"] = state
        p0 = max(state.seen, t_k - q.shape[2])  # the first position whose query is new
        state.strength = _grow(state.strength, n_atoms, 2)
        state.count = _grow(state.count, n_atoms, 0)
        state.mass = _grow(state.mass, t_k, 2)
        if self.boundaries == "attention" and p0 < t_k:
            strength, count, mass = spans.band_evidence(q, k, p0, self.probe, atom, ctx.softmax_scale(q), ctx.key_mask,
                                                          ctx.extras)
            state.strength += strength
            state.count += count
            state.mass += mass
        # atoms whose keys are new or received band mass now: from the first key a new query's band reaches
        dirty = max(0, min(state.seen, p0 - self.probe + 1)) // atom
        keys = k[:, :, dirty * atom:].float()
        weight = state.mass[:, :, dirty * atom:] + PRIOR_MASS
        if ctx.key_mask is not None:
            weight = weight * ctx.key_mask[:, None, dirty * atom:]
        pad = n_atoms * atom - t_k
        wk = torch.nn.functional.pad(weight[..., None] * keys, (0, 0, 0, pad))
        state.wsum = _grow(state.wsum, n_atoms, 2)
        state.msum = _grow(state.msum, n_atoms, 2)
        state.wsum[:, :, dirty:] = wk.view(batch, n_kv, n_atoms - dirty, atom, dim).sum(3)
        state.msum[:, :, dirty:] = torch.nn.functional.pad(weight, (0, pad)).view(batch, n_kv, -1, atom).sum(-1)
        state.seen = t_k
        state.last = k[:, :, t_k - 1].clone()
        return state

    # -- scoring ------------------------------------------------------------------------------------
    def scores(self, q: Tensor, span_vec: Tensor, atom_vec: Tensor) -> tuple[Tensor, Tensor]:
        """Best query of each query block against every span and every atom vector: (B, H, nQB, nS) and
        (B, H, nQB, nA), one matmul per chunk of query blocks."""
        batch, n_q = q.shape[:2]
        n_kv, n_spans = span_vec.shape[1], span_vec.shape[2]
        qb, q_valid = query_blocks(q, self.block)
        qg = by_group(qb, n_kv)  # (B, Hkv, G, nQB, bq, D)
        n_qb, bq = q_valid.shape
        both = torch.cat([span_vec, atom_vec], dim=2)  # (B, Hkv, nS + nA, D)
        step = chunk_rows(4 * batch * n_q * bq * both.shape[2] * 2)
        padded = not bool(q_valid.all())
        parts = []
        for b0 in range(0, n_qb, step):
            b1 = min(b0 + step, n_qb)
            s = grouped_scores(qg[:, :, :, b0:b1], both)  # (B, Hkv, G, nb, bq, nS + nA)
            if padded:
                s = s.masked_fill(~q_valid[b0:b1, :, None], float("-inf"))
            parts.append(s.amax(-2))
        s = group_heads(torch.cat(parts, dim=3), self.group, "max")  # (B, H, nQB, nS + nA)
        return s[..., :n_spans], s[..., n_spans:]


def _segment_sum(x: Tensor, seg: Tensor, n_segments: int) -> Tensor:
    """Sum x (B, H, n, C) by segment id seg (B, H, n) into (B, H, n_segments, C)."""
    out = x.new_zeros(*x.shape[:2], n_segments, x.shape[3])
    return out.scatter_add_(2, seg[..., None].expand_as(x), x)
