"""The benchmarks' shared figure style (matplotlib itself is loaded by :mod:`longreach.plotting`)."""

from __future__ import annotations


def speedup_axis(ax, ylabel: str) -> None:
    """The shared look of a speedup-vs-T panel: dense at 1, log2 lengths."""
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
