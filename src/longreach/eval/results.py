"""``results.jsonl``: one JSON object per finished sample, appended atomically, read defensively.

Each row is written with a single ``write`` on an ``O_APPEND`` descriptor and fsync'd, so a
killed run leaves at most one torn last line. Torn or corrupt lines are never dropped silently:
:func:`read_rows` returns them with line numbers, the runner and the report print them, and the
samples they held are simply run again. A torn tail is first closed with a newline, so new rows
never glue onto it; nothing already written is rewritten.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

KEY_FIELDS = ("model", "method", "task", "length", "depth", "seed", "chat", "corpus")
REQUIRED = (*KEY_FIELDS, "score")


@dataclass(frozen=True)
class BadLine:
    line: int  # 1-based
    reason: str
    text: str  # the start of the line

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}: {self.text!r}"


def row_key(row: dict) -> tuple:
    return tuple(json.dumps(row.get(f), sort_keys=True) for f in KEY_FIELDS)


def read_rows(path: Path) -> tuple[list[dict], list[BadLine]]:
    """Rows and the lines that could not be used (with why); a missing file is simply empty."""
    if not path.exists():
        return [], []
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                reason = "truncated (the run was probably killed while writing)" if not line.endswith("\n") else (
                    f"not valid JSON ({err.msg})")
                bad.append(BadLine(number, reason, line[:80]))
                continue
            missing = [f for f in REQUIRED if f not in row] if isinstance(row, dict) else list(REQUIRED)
            if missing:
                bad.append(BadLine(number, f"missing fields {', '.join(missing)}", line[:80]))
                continue
            rows.append(row)
    return rows, bad


class ResultsWriter:
    """Appends rows; closes a torn tail with a newline first (so it stays one reported bad line)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    self._write(b"\n")

    def append(self, row: dict) -> None:
        self._write((json.dumps(row, ensure_ascii=False) + "\n").encode())

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
