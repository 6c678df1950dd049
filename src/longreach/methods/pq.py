"""Product quantization of keys: one codebook per (sequence, KV head), a few centroid ids per key.

A key of D channels is cut into ``m`` sub-vectors (D zero-padded to a multiple of m); each sub-space has
its own ``c`` centroids from k-means, and a key is stored as m centroid ids. Then

    q . k  ~  sum_s  q_s . centroid_s[code_s]

is m lookups per key in the query's (m, c) table of q_s . centroid: retrieval reads codes, not keys.

With channel ``weights`` w the k-means minimises sum_c w_c (k_c - mu_c)^2 instead of the plain squared
error: for queries whose per-channel second moment is w (E[q_c^2] = w_c, channels uncorrelated), that is the
expected squared error of q . k, the quantity retrieval ranks by (the diagonal of A²ATS's query-aware
objective). It is run as plain k-means on keys scaled by sqrt(w), whose centroids are scaled back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .kmeans import kmeans, nearest
from .scoring import SCORE_BYTES


@dataclass(frozen=True, eq=False)
class Codebook:
    centroids: Tensor  # (B, H, m, c, ds) fp32 in key space (unweighted)
    root_w: Tensor  # (B, H, m, ds) sqrt of the channel weights the codes were assigned under (1: plain PQ)
    dim: int  # key channels D before padding to m * ds

    @property
    def subspaces(self) -> int:
        return self.centroids.shape[2]

    @property
    def size(self) -> int:
        return self.centroids.shape[3]


def split(x: Tensor, m: int) -> Tensor:
    """(..., D) -> (..., m, ceil(D/m)) fp32, zero-padded: padded channels add nothing to any dot product."""
    dim = x.shape[-1]
    sub = math.ceil(dim / m)
    x = x.float()
    if sub * m != dim:
        x = torch.nn.functional.pad(x, (0, sub * m - dim))
    return x.view(*x.shape[:-1], m, sub)


def fit(keys: Tensor, m: int, c: int, iters: int, weights: Tensor | None = None, max_points: int = 2048
        ) -> Codebook:
    """keys (B, H, N, D) -> a codebook of min(c, N) centroids in each of min(m, D) sub-spaces.

    ``weights`` (B, H, D) >= 0 weight the k-means per channel (query-aware); None is plain PQ. The fit uses at
    most ``max_points`` evenly spaced keys (the k-means is the cost; encoding every key is one pass).
    """
    batch, heads, n, dim = keys.shape
    m = min(m, dim)
    if n > max_points:
        keys = keys[:, :, torch.linspace(0, n - 1, max_points, device=keys.device).round().long()]
        n = max_points
    x = split(keys, m)  # (B, H, N, m, ds)
    sub = x.shape[-1]
    if weights is None:
        root_w = x.new_ones(batch, heads, m, sub)
    else:
        root_w = split(weights.clamp(min=0).sqrt(), m)  # (B, H, m, ds)
        root_w = torch.where(root_w > 0, root_w, torch.ones_like(root_w))  # padded or dead channels: unweighted
    points = (x * root_w[:, :, None]).permute(0, 1, 3, 2, 4).reshape(batch * heads * m, n, sub)
    scaled, _ = kmeans(points, min(c, n), iters, settled=1e-3)  # (B*H*m, c, ds)
    centroids = scaled.view(batch, heads, m, -1, sub) / root_w[:, :, :, None]
    return Codebook(centroids, root_w, dim)


def encode(cb: Codebook, keys: Tensor) -> Tensor:
    """keys (B, H, T, D) -> codes (B, H, T, m): each sub-vector's nearest centroid (under the codebook's
    weights), uint8 for up to 256 centroids, else int16."""
    batch, heads, length, _ = keys.shape
    m, c = cb.subspaces, cb.size
    dtype = torch.uint8 if c <= 256 else torch.int16
    scaled_c = (cb.centroids * cb.root_w[:, :, :, None]).flatten(0, 2)  # (B*H*m, c, ds)
    step = max(1, SCORE_BYTES // max(4 * batch * heads * m * c, 1))
    parts = []
    for t0 in range(0, length, step):
        x = split(keys[:, :, t0:t0 + step], m) * cb.root_w[:, :, None]  # (B, H, t, m, ds)
        t = x.shape[2]
        ids = nearest(x.permute(0, 1, 3, 2, 4).reshape(batch * heads * m, t, -1), scaled_c)  # (B*H*m, t)
        parts.append(ids.view(batch, heads, m, t).transpose(-1, -2).to(dtype))
    if not parts:
        return torch.empty(batch, heads, 0, m, dtype=dtype, device=keys.device)
    return torch.cat(parts, dim=2)


def _flat_ids(codes: Tensor, c: int) -> Tensor:
    """codes (..., m) -> ids into the (m * c) flattened tables: sub-space s's code + s * c (int64)."""
    return codes.long() + torch.arange(codes.shape[-1], device=codes.device) * c


def reconstruct(cb: Codebook, codes: Tensor) -> Tensor:
    """codes (B, H, T, m) -> the keys they stand for, (B, H, T, D) fp32."""
    batch, heads, length, m = codes.shape
    table = cb.centroids.flatten(2, 3)  # (B, H, m*c, ds)
    ids = _flat_ids(codes, cb.size).view(batch, heads, length * m, 1).expand(-1, -1, -1, table.shape[-1])
    return table.gather(2, ids).view(batch, heads, length, -1)[..., : cb.dim]


def tables(cb: Codebook, q: Tensor) -> Tensor:
    """q (B, H, R, D) -> (B, H, R, m * c): q_s . centroid for every sub-space s and centroid."""
    qs = split(q, cb.subspaces)  # (B, H, R, m, ds)
    return torch.einsum("bhrsd,bhscd->bhrsc", qs, cb.centroids).flatten(-2)


def lookup(lut: Tensor, codes: Tensor, c: int) -> Tensor:
    """Approximate q . k of every key from its codes: lut (B, H, R, m*c), codes (B, H, T, m) -> (B, H, R, T).

    m table reads and adds per (query, key), as one ``embedding_bag`` over all heads: what a decode step of
    A²ATS costs instead of reading T keys (about 2x faster on CPU than a gather of the same reads)."""
    batch, heads, rows, width = lut.shape
    length, m = codes.shape[2], codes.shape[3]
    weight = lut.transpose(-1, -2).reshape(batch * heads * width, rows)  # row: (head, sub-space, centroid)
    offset = (torch.arange(batch * heads, device=codes.device).view(batch, heads, 1, 1) * width
              + torch.arange(m, device=codes.device) * c).int()
    step = max(1, SCORE_BYTES // max(8 * batch * heads * max(rows, m), 1))
    parts = []
    for t0 in range(0, length, step):
        ids = codes[:, :, t0:t0 + step].int() + offset  # (B, H, t, m) rows of ``weight``
        t = ids.shape[2]
        got = torch.nn.functional.embedding_bag(ids.view(-1, m), weight, mode="sum")  # (B*H*t, R)
        parts.append(got.view(batch, heads, t, rows).transpose(-1, -2))
    return torch.cat(parts, dim=-1) if parts else lut.new_zeros(batch, heads, rows, 0)
