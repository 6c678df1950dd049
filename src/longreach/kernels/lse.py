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
