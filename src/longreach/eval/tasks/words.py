"""Aggregation tasks (RULER): common-word and frequent-word extraction.

``cwe``: a numbered list of real words in which a few appear far more often than the rest; name
the most common ones. ``fwe``: coded words drawn with Zipf frequencies; name the three most
frequent. Both are scored as recall of the gold words.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from ...configurable import param
from ...errors import SpecError
from ..corpus import Corpus
from ..fit import Frame, fit
from .base import Sample, Task


def word_pool(corpus: Corpus, rng: random.Random, n: int) -> list[str]:
    """``n`` distinct words: the corpus vocabulary, shuffled, topped up with pronounceable pseudo-words."""
    words = corpus.vocabulary(min_len=4)
    rng.shuffle(words)
    seen = set(words)
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    while len(words) < n:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words[:n]


@dataclass(frozen=True)
class CommonWords(Task):
    name = "cwe"
    summary = "common word extraction: the most frequent words of a long numbered list (recall)"
    metric = "recall"
    uses_depth = False

    words: int = param(10, "how many common words to name")

    def __post_init__(self) -> None:
        if self.words < 1:
            raise SpecError("cwe: words must be >= 1")

    @property
    def max_new_tokens(self) -> int:  # type: ignore[override]
        return 5 * self.words + 8

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        max_units = length  # each entry is at least "1. w\n": 3+ tokens
        pool = word_pool(corpus, random.Random(seed), self.words + max_units)
        common, rare = pool[:self.words], pool[self.words:]
        frame = Frame(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n\n",
            f"\n\nQuestion: What are the {self.words} most common words in the above list?",
            f"Answer: The top {self.words} words that appear most often in the list are:",
        )

        def entries(n: int) -> list[str]:
            freq_common = max(2, n // (3 * self.words))  # common words fill about a third of the list
            freq_rare = max(1, min(3, freq_common // 4))
            out = [w for w in common for _ in range(freq_common)][:n]
            rest = n - len(out)
            out += [w for w in rare[:rest // freq_rare + 1] for _ in range(freq_rare)][:rest]
            random.Random(seed + 1).shuffle(out)
            return out

        def context(n: int, _m: int) -> str:
            return "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries(n)))

        prompt, tokens = fit(tokenizer, length, chat, frame, context, max_units=max_units)
        return self.sample(tokenizer, prompt, common, length, tokens, None, seed, chat)


@dataclass(frozen=True)
class FrequentWords(Task):
    name = "fwe"
    summary = "frequent word extraction: the 3 most frequent coded words under a Zipf law (recall)"
    metric = "recall"
    uses_depth = False
    max_new_tokens = 24

    alpha: float = param(2.0, "Zipf exponent of the word frequencies")
    vocab: int = param(100, "distinct coded words")

    def __post_init__(self) -> None:
        if self.alpha <= 0.5 or self.vocab < 4:
            raise SpecError("fwe: alpha must be > 0.5 and vocab >= 4")

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        rng = random.Random(seed)
        coded: list[str] = []
        while len(coded) < self.vocab:
            word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
            if word not in coded:
                coded.append(word)
        weights = [r ** -self.alpha for r in range(1, self.vocab + 1)]
        total = sum(weights)
        frame = Frame(
            "Read the following coded text and track the frequency of each coded word. "
            "Find the three most frequently appeared coded words.\n\n",
            "\n\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
            "What are the three most frequently appeared words in the above coded text?",
            "Answer: According to the coded text above, the three most frequently appeared words are:",
        )

        def context(n: int, _m: int) -> str:
            counts = [int(n * w / total) for w in weights]
            counts[0] += n - sum(counts)  # exact total; the most frequent word absorbs rounding
            words = [w for w, c in zip(coded, counts, strict=True) for _ in range(c)]
            random.Random(seed + 1).shuffle(words)
            return " .... ".join(" ".join(words[i:i + 10]) for i in range(0, len(words), 10))

        prompt, tokens = fit(tokenizer, length, chat, frame, context, max_units=2 * length)
        return self.sample(tokenizer, prompt, coded[:3], length, tokens, None, seed, chat)
