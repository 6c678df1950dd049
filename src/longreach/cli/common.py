"""What every command shares: the console, the error exit, help texts and the option parsers (written once)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console

from longreach import LongreachError, parse_spec
from longreach.eval.runner import parse_lengths

console = Console(width=max(Console().width, 140))  # tables stay readable when piped

MODEL_HELP = "bundled name (smollm2-135m, gemma3-270m), HF folder or .gguf file"
KERNEL_HELP = "auto, gather, flex or reference"
CHAT_HELP = "apply the model's chat template, if it has one"
CHUNK_HELP = "prefill this many tokens per forward (long inputs in less memory)"


def fail(err: LongreachError | str) -> NoReturn:
    """One red line and exit code 2: a user error is a message to act on, not a traceback."""
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2)


@contextmanager
def user_errors(*also: type[Exception]) -> Iterator[None]:
    """Exit through `fail` on a LongreachError (and on ``also``, e.g. ValueError from a benchmark's own checks)."""
    try:
        yield
    except (LongreachError, *also) as err:
        fail(err)


def items(text: str, sep: str = ",") -> list[str]:
    """The non-empty, stripped parts of a list option: ``a,b`` or, for specs that hold commas, ``spec;spec``."""
    return [part.strip() for part in text.split(sep) if part.strip()]


def token_lengths(text: str) -> list[int]:
    """Token lengths such as ``2k,4k`` -> [2048, 4096]: the eval runner's parser, so every command reads them alike."""
    return list(parse_lengths(text))


def floats(text: str, option: str) -> list[float]:
    """Comma-separated numbers; a typo names the option instead of surfacing as a bare ValueError."""
    try:
        return [float(x) for x in items(text)]
    except ValueError:
        raise LongreachError(f"--{option} must be comma-separated numbers, got '{text}'") from None


def checked_specs(specs: Iterable[str]) -> list[str]:
    """Every method spec in canonical form; parsing all first makes a typo fail before a model loads or a timer runs."""
    return [str(parse_spec(s)) for s in specs]


def layer_indices(text: str | None) -> list[int] | None:
    """``0,10,20`` -> [0, 10, 20]; None means every layer."""
    return [_layer_index(x) for x in items(text)] if text else None


def _layer_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise LongreachError(f"--layers: '{text}' is not a layer index; use e.g. 0,10,20") from None
    if value < 0:
        raise LongreachError(f"--layers: layer indices start at 0, got {value}")
    return value


def head_shapes(text: str) -> list[tuple[int, int, int]]:
    """``9,3,64;32,8,128`` -> (query heads, kv heads, head dim) triples, the attention shapes a benchmark times."""
    bad = LongreachError(f"--heads takes 'q,kv,dim' triples separated by ';', got '{text}'")
    shapes = []
    for part in items(text, ";"):
        try:
            q_heads, kv_heads, dim = (int(x) for x in part.split(","))
        except ValueError:  # not numbers, or not three of them
            raise bad from None
        shapes.append((q_heads, kv_heads, dim))
    if not shapes:
        raise bad
    return shapes


def read_prompt(path: Path) -> str:
    """The prompt file's text; an empty file is refused rather than run through a model."""
    text = path.read_text()
    if not text.strip():
        raise LongreachError(f"{path} is empty; give a text file with the prompt")
    return text


def chat_prompt(tokenizer, text: str, chat: bool) -> tuple[str, bool]:
    """``text`` in the model's chat template when asked and the tokenizer has one, and whether it was applied:
    a templated prompt holds its own special tokens, so the caller must not add more when tokenizing."""
    if not chat or tokenizer.chat_template is None:
        return text, False
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True), True
