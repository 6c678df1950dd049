"""Errors users can act on: each message says what was wrong and what to do next."""

from __future__ import annotations

import difflib


class LongreachError(Exception):
    """Base class for every error longreach raises on purpose."""


class SpecError(LongreachError, ValueError):
    """A method spec string or parameter is malformed, unknown or contradictory."""


class UnsupportedModelError(LongreachError):
    """The model cannot route attention through transformers' AttentionInterface (or is not causal)."""


class ModelLoadError(LongreachError):
    """A model file, folder or bundled package is missing or unreadable."""


class InputError(LongreachError, ValueError):
    """Runtime inputs (shapes, masks, lengths) that a method or kernel cannot handle."""


def did_you_mean(name: str, choices: list[str]) -> str:
    """A short 'did you mean X? available: ...' hint for unknown names."""
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}available: {', '.join(sorted(choices))}"
