"""Where longreach keeps files on this machine.

A foundation module (no longreach imports): kernels cache their compiled build here, models their
converted weights, eval its corpora, so none of them has to import another to find the folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LONGREACH_CACHE``, else ``~/.cache/longreach``; read at each call so tests can point it elsewhere."""
    return Path(os.environ.get("LONGREACH_CACHE", Path.home() / ".cache" / "longreach"))
