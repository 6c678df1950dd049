"""What every prose source shares: its error, text normalisation and atomic writes into the cache.

Below both :mod:`.corpus` (Canterbury, the ``Corpus`` class) and :mod:`.debian` (optional apt sources),
so the corpus can load a Debian source without the two importing each other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import LongreachError


class CorpusError(LongreachError):
    """The prose corpus could not be fetched or read."""


def normalise(text: str, start: str | None = None, end: str | None = None) -> str:
    """LF line ends, no trailing blanks, the part between the ``start`` and ``end`` markers, <=1 blank line."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    if start:
        first = next((i for i, line in enumerate(lines) if re.match(start, line)), 0)
        lines = lines[first:]
    if end:
        last = next((i for i, line in enumerate(lines) if re.match(end, line)), len(lines))
        lines = lines[:last]
    text = "\n".join(" ".join(line.split()) for line in lines)  # no indentation, single spaces
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted fetch never leaves a half-written text."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
