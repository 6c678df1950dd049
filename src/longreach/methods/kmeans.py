"""Batched k-means over many small point sets at once (one per layer, head, sub-space...): the clustering that
``squeezed`` (key blocks) and ``pq`` (A²ATS's product-quantized keys) share."""

from __future__ import annotations

import torch
from torch import Tensor

from .scoring import SCORE_BYTES


def nearest(points: Tensor, centroids: Tensor) -> Tensor:
    """Index of the closest centroid: points (N, P, ds), centroids (N, C, ds) -> (N, P), in chunks of P.

    Sub-vectors may be short: below 3 channels a broadcast difference beats a matmul whose inner size is ds."""
    n, n_points, sub = points.shape
    step = max(1, SCORE_BYTES // max(4 * n * centroids.shape[1] * (sub if sub < 3 else 1), 1))
    c_norm = (centroids * centroids).sum(-1).unsqueeze(1)  # (N, 1, C)
    out = []
    for p0 in range(0, n_points, step):
        x = points[:, p0:p0 + step]
        if sub < 3:
            dist = (x.unsqueeze(2) - centroids.unsqueeze(1)).square().sum(-1)
        else:
            dist = c_norm - 2 * x @ centroids.transpose(-1, -2)
        out.append(dist.argmin(-1))
    return torch.cat(out, dim=1)


def kmeans(points: Tensor, n_clusters: int, iters: int, settled: float = 0.0) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means from evenly spaced points (deterministic): (N, P, ds) -> centroids (N, C, ds) and the
    assignment (N, P). A centroid that loses all its points keeps its place; the iterations stop early once at
    most ``settled`` of the points change cluster (0: once none does)."""
    n_points = points.shape[1]
    init = torch.linspace(0, n_points - 1, n_clusters, device=points.device).round().long()
    centroids = points[:, init].clone()
    assign = nearest(points, centroids)
    for _ in range(iters):
        total = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand_as(points), points)
        count = torch.zeros(centroids.shape[:2], device=points.device).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=points.dtype))
        centroids = torch.where(count[..., None] > 0, total / count.clamp(min=1)[..., None], centroids)
        new = nearest(points, centroids)
        moved = float((new != assign).float().mean())
        assign = new
        if moved <= settled:
            break
    return centroids, assign
