"""Needle in a haystack of real prose (RULER's NIAH family).

Variants: ``single`` (one needle), ``multikey`` (the needle among needles with other keys),
``multivalue`` (several values stored under one key; return all), ``multiquery`` (several keys
asked at once; return all values). Keys and values are words, numbers or uuids. The gold needle
sits at the requested depth (snapped to a sentence boundary); other needles at seeded random depths.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...configurable import param
from ...errors import SpecError
from ..corpus import Corpus, sentence_ends
from ..fit import Frame, fit
from .base import VALUE_TYPES, Sample, Task, check_variant, distinct_values, insert_at, spread

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
SINGULAR = {"numbers": "number", "words": "word", "uuids": "uuid"}
TOKENS_PER_VALUE = {"numbers": 10, "words": 10, "uuids": 32}


@dataclass(frozen=True)
class Niah(Task):
    name = "niah"
    summary = "needle(s) in real prose; single / multikey / multivalue / multiquery; words, numbers or uuids"

    variant: str = param("single", "single | multikey | multivalue | multiquery")
    key: str = param("words", "key type: words | numbers | uuids")
    value: str = param("numbers", "value type: words | numbers | uuids")
    distractors: int = param(3, "multikey: needles with other keys")
    values: int = param(4, "multivalue: values stored under the one key")
    queries: int = param(4, "multiquery: keys asked together")
    wording: int = param(0, "0: RULER's question and answer prefix; 1: another question, prefix 'Answer:'; "
                            "2: RULER's question alone, no answer prefix")

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SpecError(f"niah: variant must be one of {', '.join(VARIANTS)}, got '{self.variant}'")
        for field in ("key", "value"):
            if getattr(self, field) not in VALUE_TYPES:
                raise SpecError(f"niah: {field} must be one of {', '.join(VALUE_TYPES)}, got '{getattr(self, field)}'")
        for field in ("distractors", "values", "queries"):
            if getattr(self, field) < 1:
                raise SpecError(f"niah: {field} must be >= 1")
        check_variant(self.name, self.wording, 3)

    @property
    def metric(self) -> str:  # type: ignore[override]
        return "recall" if self.variant in ("multivalue", "multiquery") else "accuracy"

    @property
    def max_new_tokens(self) -> int:  # type: ignore[override]
        n = {"multivalue": self.values, "multiquery": self.queries}.get(self.variant, 1)
        return TOKENS_PER_VALUE[self.value] * n + 8

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        depth = 0.5 if depth is None else depth
        rng = random.Random(seed)
        max_units = 2 * length + 64
        passage = corpus.passage(seed, max_units)
        haystack = "".join(passage)
        n_keys = {"multikey": 1 + self.distractors, "multiquery": self.queries}.get(self.variant, 1)
        n_values = {"multikey": 1 + self.distractors, "multivalue": self.values, "multiquery": self.queries}.get(
            self.variant, 1)
        keys = distinct_values(rng, self.key, n_keys, avoid=haystack)
        values = distinct_values(rng, self.value, n_values, avoid=haystack + " ".join(keys))
        what, one = self.value, SINGULAR[self.value]
        if self.variant == "multivalue":
            needles = [(keys[0], v) for v in values]
        else:
            needles = list(zip(keys, values, strict=False))
        gold = values if self.variant in ("multivalue", "multiquery") else values[:1]
        positions = spread(rng, len(needles), depth)
        inserts = [(p, f"One of the special magic {what} for {k} is: {v}.") for p, (k, v) in zip(
            positions, needles, strict=True)]
        asked = keys if self.variant == "multiquery" else keys[:1]
        about = ", ".join(asked[:-1]) + f" and {asked[-1]}" if len(asked) > 1 else asked[0]
        plural = self.variant in ("multivalue", "multiquery")
        instruction = (f"Some special magic {what} are hidden within the following text. Make sure to memorize it. "
                       f"I will quiz you about the {what} afterwards.\n\n")
        question = (f"\n\nWhat {'are all the' if plural else 'is the'} special magic {what if plural else one} for "
                    f"{about} mentioned in the provided text?")
        frame = [
            Frame(instruction, question, f"The special magic {what if plural else one} for {about} mentioned in the "
                                         f"provided text {'are' if plural else 'is'}"),
            Frame(instruction, f"\n\nWhich {what if plural else one} {'were' if plural else 'was'} given for "
                               f"{about} in the text above?", "Answer:"),
            Frame(instruction, question),
        ][self.wording]

        ends = sentence_ends(passage)  # once: insert_at ignores those past n

        def context(n: int, _m: int) -> str:
            return insert_at(passage[:n], inserts, ends)

        prompt, tokens = fit(tokenizer, length, chat, frame, context, max_units=max_units)
        return self.sample(tokenizer, prompt, gold, length, tokens, depth, seed, chat, keys=asked)
