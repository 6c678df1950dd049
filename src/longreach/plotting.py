"""matplotlib is the ``plots`` extra: the one place that loads it, for every figure longreach draws.

Figures are only ever written to files (reports, benchmark PNGs, heatmaps), so the backend is always the
file-only Agg one: no display is needed and a headless machine behaves like a desktop.
"""

from __future__ import annotations

from types import ModuleType

from .errors import LongreachError

INSTALL_HINT = "pip install 'longreach[plots]' (matplotlib)"


class PlotsUnavailable(LongreachError, ImportError):
    """A figure was asked for and matplotlib is not installed (still an ImportError for older callers)."""


def pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` on the Agg backend, or None without matplotlib (for output that can go without)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def require_pyplot(what: str) -> ModuleType:
    """``matplotlib.pyplot`` for a figure the user asked for; without matplotlib, say how to install it."""
    plt = pyplot()
    if plt is None:
        raise PlotsUnavailable(f"{what} needs matplotlib: {INSTALL_HINT}")
    return plt
