"""Passkey retrieval: a random 5-digit number hidden at a chosen depth of repetitive filler."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..corpus import Corpus, sentence_ends
from ..fit import Frame, fit
from .base import Sample, Task, insert_at

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "\nThe pass key is {key}. Remember it. The pass key is the number above.\n"
FRAME = Frame(
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it.\n\n",
    "\n\nWhat is the pass key? Answer with the number only.",
    "The pass key is",
)


def filler_pieces(n: int, text: str = FILLER) -> list[str]:
    words = re.findall(r"\S+\s*", text)
    return [words[i % len(words)] for i in range(n)]


@dataclass(frozen=True)
class Passkey(Task):
    name = "passkey"
    summary = "a 5-digit pass key hidden in repetitive filler; exact match of the first number"
    max_new_tokens = 10

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        depth = 0.5 if depth is None else depth
        key = str(random.Random(seed).randint(10000, 99999))
        needle = NEEDLE.format(key=key)

        filler = filler_pieces(2 * length + 64)
        ends = sentence_ends(filler)  # once: insert_at ignores those past n

        def context(n: int, _m: int) -> str:
            return insert_at(filler[:n], [(depth, needle)], ends)

        prompt, tokens = fit(tokenizer, length, chat, FRAME, context, max_units=len(filler))
        return self.sample(tokenizer, prompt, [key], length, tokens, depth, seed, chat)

    def score(self, prediction: str, gold: tuple[str, ...]) -> float:
        """1.0 when the first number in the continuation is the key."""
        found = re.findall(r"\d+", prediction)
        return float(bool(found) and found[0] == gold[0])
