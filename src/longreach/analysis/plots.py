"""Figures of the attention analyses (matplotlib, the ``plots`` extra): files only."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..plotting import require_pyplot
from .rollout import Rollout


def rollout_heatmap(r: Rollout, path: str | Path, title: str = "") -> None:
    """The (pooled) rollout matrix: query position down, key position across, both in tokens.

    Log colour: in a deep model the first (sink) token takes nearly all of the rollout, and what is left spans
    several orders of magnitude. Zeros (the causal upper triangle) are left white.
    """
    plt = require_pyplot("the rollout heatmap")
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    n, top = r.matrix.shape[0], float(r.matrix.max())
    masked = r.matrix.masked_fill(r.matrix <= 0, float("nan")).numpy()
    im = ax.imshow(masked, cmap="magma", norm=LogNorm(vmin=max(top * 1e-8, 1e-30), vmax=top),
                   interpolation="nearest", extent=(0, n * r.block, n * r.block, 0))
    ax.set_xlabel("input (key) token position")
    ax.set_ylabel("output (query) token position")
    cell = "per token" if r.block == 1 else f"{r.block}-token cells"
    ax.set_title(f"{title}attention rollout, {r.tokens} tokens, {cell}", fontsize=9)
    fig.colorbar(im, ax=ax, label="rollout mass (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rollout_last_plot(r: Rollout, path: str | Path, title: str = "") -> None:
    """The last token's rollout over every position (log scale: the first tokens usually take most of it)."""
    plt = require_pyplot("the rollout line plot")
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.plot(range(r.tokens), r.last.clamp(min=1e-12).numpy(), lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("input token position")
    ax.set_ylabel("rollout of the last token")
    ax.set_title(f"{title}last token's attention rollout over {r.tokens} positions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lookback_heatmap(ratios: Tensor, layers: list[int], path: str | Path, title: str = "") -> None:
    """Layers × heads, colour = the lookback ratio averaged over the generated tokens."""
    plt = require_pyplot("the lookback heatmap")
    grid = ratios.mean(0)
    fig, ax = plt.subplots(figsize=(1.6 + 0.35 * grid.shape[1], 1.6 + 0.16 * grid.shape[0]))
    im = ax.imshow(grid.numpy(), aspect="auto", vmin=0, vmax=1, cmap="coolwarm", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers], fontsize=6)
    ax.set_title(f"{title}lookback ratio, mean over {ratios.shape[0]} generated tokens", fontsize=9)
    fig.colorbar(im, ax=ax, label="lookback ratio (1: reads only the prompt)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
