"""Merging partial softmaxes by log-sum-exp: the one primitive every split attention path shares.

``dense`` (a chunk after a prefix), ``band`` (diagonal + previous chunk) and ``gather`` (far + near keys)
all attend disjoint key sets apart and merge them here. It sits below them so none imports another for it.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def with_sink(out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """Add learned sink logits (GPT-OSS ``s_aux``) to an attention's softmax denominator, after the fact.

    A sink is one more logit per query head that attends to nothing: the softmax over keys + sink equals the
    softmax over keys scaled by exp(lse) / (exp(lse) + exp(sink)). out (B, Tq, Hq, D), lse (B, Tq, Hq) with
    -inf for rows that saw no key (their output stays 0), sinks (Hq,).
    """
    sink = sinks.to(lse.dtype).view(1, 1, -1)
    keep = torch.exp(lse - torch.logaddexp(lse, sink))  # share of the softmax mass left to the keys
    return out * keep.nan_to_num(0.0).unsqueeze(-1).to(out.dtype)
