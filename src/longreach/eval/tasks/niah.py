"""Needle in a haystack of real prose (RULER's NIAH family).

Variants: ``single`` (one needle), ``multikey`` (the needle among needles with other keys),
``multivalue`` (several values stored under one key; return all), ``multiquery`` (several keys
asked at once; return all values). Keys and values are words, numbers or uuids. The gold needle
sits at the requested depth (snapped to a sentence boundary); other needles at seeded random depths.

``niah:docs=N`` splits the haystack into N documents (cut at the sentence ends nearest equal shares of its
words, a blank line between them) and puts the single needle in document ``round(depth * (N - 1))``, at a
seeded sentence end inside it: the depth is the gold document's index, as in ``kvret:docs``. The sample
carries its documents, so attention sorting (``longreach eval --sort-documents``) can re-order them; unlike
``kvret``, the model reads real prose, which SmolLM2 retrieves from where it fails at JSON.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from itertools import pairwise

from ...configurable import param
from ...errors import SpecError
from ..corpus import Corpus, sentence_ends
from ..fit import Frame, fit
from .base import VALUE_TYPES, Sample, Task, check_variant, distinct_values, insert_at, spread

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
SINGULAR = {"numbers": "number", "words": "word", "uuids": "uuid"}
TOKENS_PER_VALUE = {"numbers": 10, "words": 10, "uuids": 32}
RESTATED = 24  # tokens for "The special magic number for <key> mentioned in the provided text is" and the like


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
    docs: int = param(0, "0: one haystack; N >= 2: the haystack split into N documents, the needle in document "
                         "round(depth * (N - 1)) (single variant; for --sort-documents)")

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
        if isinstance(self.docs, bool) or not isinstance(self.docs, int) or self.docs < 0 or self.docs == 1:
            raise SpecError(f"niah: docs is 0 (one haystack) or a number of documents >= 2, got {self.docs!r}")
        if self.docs and self.variant != "single":
            raise SpecError(f"niah: docs={self.docs} places one needle in one document; use variant=single (got "
                            f"{self.variant})")

    @property
    def has_documents(self) -> bool:
        return self.docs > 0

    @property
    def metric(self) -> str:  # type: ignore[override]
        return "recall" if self.variant in ("multivalue", "multiquery") else "accuracy"

    @property
    def max_new_tokens(self) -> int:  # type: ignore[override]
        """Room for the values, and without an answer prefix (wording 2) for the answer sentence a model restates
        first: SmolLM2 wrote "The special magic number for quick-orchid is 67092" and was cut off there, gold
        6709213 (one token a digit)."""
        n = {"multivalue": self.values, "multiquery": self.queries}.get(self.variant, 1)
        return TOKENS_PER_VALUE[self.value] * n + 8 + (RESTATED if self.wording == 2 else 0)

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
        if self.docs:
            return self.build_documents(tokenizer, passage, ends, inserts[0][1], frame, gold, asked, length,
                                        depth, rng.random(), seed, chat)

        def context(n: int, _m: int) -> str:
            return insert_at(passage[:n], inserts, ends)

        prompt, tokens = fit(tokenizer, length, chat, frame, context, max_units=max_units)
        return self.sample(tokenizer, prompt, gold, length, tokens, depth, seed, chat, keys=asked)

    def build_documents(self, tokenizer, passage: list[str], ends: list[int], needle: str, frame: Frame,
                        gold: list[str], asked: list[str], length: int, depth: float, inside: float, seed: int,
                        chat: bool) -> Sample:
        """The first ``n`` words in ``docs`` documents, the needle in document ``round(depth * (docs - 1))`` at
        relative place ``inside`` (snapped to a sentence end); ``fit`` grows ``n`` to the length."""
        gold_doc = round(depth * (self.docs - 1))

        def documents(n: int, _m: int) -> list[str]:
            docs = []
            for i, (lo, hi) in enumerate(pairwise(document_cuts(ends, n, self.docs))):
                inserts = [(inside, needle)] if i == gold_doc else []
                docs.append(insert_at(passage[lo:hi], inserts, [e - lo for e in ends if lo <= e < hi]).strip())
            return docs

        prompt, tokens, docs = self.fit_documents(tokenizer, length, chat, frame, documents, len(passage))
        sample = self.sample(tokenizer, prompt, gold, length, tokens, depth, seed, chat, keys=asked,
                             gold_document=gold_doc, documents=self.docs)
        return dataclasses.replace(sample, documents=docs)


def document_cuts(ends: list[int], n: int, parts: int) -> list[int]:
    """``parts + 1`` word indices splitting ``n`` words into ``parts`` runs: each inner cut is the sentence end
    nearest an equal share (a word boundary where no sentence ends between the neighbouring cuts), strictly
    increasing, so no document is empty once ``n >= parts``."""
    cuts = [0]
    for i in range(1, parts):
        lo, hi, want = cuts[-1] + 1, n - (parts - i), round(i * n / parts)
        allowed = [e + 1 for e in ends if lo <= e + 1 <= hi]
        cuts.append(min(allowed, key=lambda c: (abs(c - want), c)) if allowed else min(max(want, lo), hi))
    return [*cuts, n]
