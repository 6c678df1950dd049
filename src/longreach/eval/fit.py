"""Prompts of an exact token length for a given tokenizer, with or without its chat template.

A task describes its prompt as a :class:`Frame` (fixed instruction, question and answer prefix)
around a context it can grow one unit at a time (a word, a list entry, a JSON pair). :func:`fit`
finds the number of units whose full prompt is closest to the requested length by binary
search on real token counts, so "4k" means 4096 tokens (within 1%) for every model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class Frame:
    """The fixed parts of a prompt around its variable-length context."""

    instruction: str  # before the context
    question: str  # after the context, still in the user's turn
    answer: str = ""  # begins the model's reply (the assistant turn under a chat template)


def uses_chat(tokenizer, chat: bool) -> bool:
    """The chat template is applied when asked for and the tokenizer has one."""
    return bool(chat) and getattr(tokenizer, "chat_template", None) is not None


def render(tokenizer, frame: Frame, context: str, chat: bool) -> str:
    user = frame.instruction + context.rstrip() + frame.question
    if not uses_chat(tokenizer, chat):
        return user + ("\n" + frame.answer if frame.answer else "")
    head = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    return head + frame.answer


def count_tokens(tokenizer, text: str, chat: bool) -> int:
    # a rendered chat template already holds its special tokens
    return len(tokenizer(text, add_special_tokens=not uses_chat(tokenizer, chat))["input_ids"])


def tolerance(length: int) -> int:
    return max(1, length // 100)


def fit(tokenizer, length: int, chat: bool, frame: Frame, context: Callable[[int, int], str], max_units: int,
        fine: int = 0) -> tuple[str, int]:
    """Return ``(prompt, tokens)`` with ``tokens`` within 1% of ``length``.

    ``context(n, m)`` renders ``n`` units; for tasks whose units are long, ``m`` in ``[0, fine * n]``
    adds small (about one-token) adjustments such as line breaks between JSON pairs.
    """
    def measure(n: int, m: int = 0) -> tuple[str, int]:
        text = render(tokenizer, frame, context(n, m), chat)
        return text, count_tokens(tokenizer, text, chat)

    lo, hi = 0, max_units
    if measure(hi)[1] < length:
        raise InputError(f"cannot build a {length}-token prompt from {max_units} units; ask for a shorter length")
    while lo < hi:  # smallest n with tokens(n) >= length
        mid = (lo + hi) // 2
        if measure(mid)[1] >= length:
            hi = mid
        else:
            lo = mid + 1
    best = min((measure(n) for n in {max(0, lo - 1), lo}), key=lambda r: abs(r[1] - length))
    if fine and best[1] != length and lo > 0:
        n = lo - 1  # the largest n below the length, padded up one token at a time
        a, b = 0, fine * n
        while a < b:
            mid = (a + b) // 2
            if measure(n, mid)[1] >= length:
                b = mid
            else:
                a = mid + 1
        best = min([best, *(measure(n, m) for m in {max(0, a - 1), a})], key=lambda r: abs(r[1] - length))
    text, got = best
    if abs(got - length) > tolerance(length):
        smallest = measure(0)[1]
        hint = f"the fixed part alone is {smallest} tokens" if smallest > length else "the task's units are too coarse"
        raise InputError(f"could not build a prompt of {length} tokens (+-1%): got {got}; {hint}")
    return text, got
