"""matplotlib is the ``plots`` extra: benchmarks draw their PNG only when it is installed."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def speedup_axis(ax, ylabel: str) -> None:
    """The shared look of a speedup-vs-T panel: dense at 1, log2 lengths."""
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
