"""Files longreach writes for a later run to read (head profiles, positional dims): written whole or not at all,
and read back with an error that says what the file should have been and how to make one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import InputError

T = TypeVar("T")


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def load_tagged(path: str | Path, fmt: str, what: str, make: str, build: Callable[..., T]) -> T:
    """``build(**fields)`` of a JSON object tagged ``"format": fmt``; an ``InputError`` naming ``what`` the file
    should be and the command that ``make``s one when it is missing, not JSON, another format or malformed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; create one with {make}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not a {what} (invalid JSON: {err})") from None
    if not isinstance(data, dict) or data.pop("format", None) != fmt:
        raise InputError(f"{path} is not a longreach {what} (expected format {fmt}); create one with {make}")
    try:
        return build(**data)
    except TypeError as err:
        raise InputError(f"{path}: malformed {what} ({err})") from None
