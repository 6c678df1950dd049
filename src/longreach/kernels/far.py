"""Two-piece attention: near keys scored with one rotation of q/k, far keys with another.

Position methods such as Self-Extend and STRING give keys at distance >= ``distance`` from the query
different (re-mapped) positions. Kernels take them as a ``FarKeys``: the re-rotated queries and keys
for the far piece. Values are shared. The two pieces are disjoint, so they are attended apart and
merged exactly by log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True, eq=False)
class FarKeys:
    q: Tensor  # (B, Hq, Tq, D): queries for keys at distance >= distance
    k: Tensor  # (B, Hkv, Tk, D): keys as those queries see them
    distance: int  # query position - key position from which the far piece applies (>= 1)
