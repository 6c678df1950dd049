"""What an evaluation task is: a generator of prompts of an exact length and a scorer.

A task *family* is a frozen dataclass (``niah``); a task *instance* is that class with
parameters, named by a spec string (``niah:variant=multikey,value=uuids``). ``build`` is
deterministic in (tokenizer, length, depth, seed), so every sample can be regenerated.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from ...configurable import Configurable
from ...documents import Documents
from ...errors import SpecError
from ..corpus import Corpus
from ..fit import Frame, fit, render, uses_chat

DOC_SEPARATOR = "\n\n"  # between the documents of a task with documents


@dataclass(frozen=True)
class Sample:
    task: str  # canonical task instance
    prompt: str  # the full text (chat template included when ``chat``)
    gold: tuple[str, ...]  # answers expected in the continuation (empty for perplexity)
    length: int  # requested prompt tokens
    tokens: int  # actual prompt tokens (within 1% of ``length``)
    depth: float | None  # where the answer sits, 0 = start, 1 = end; None when the task has no depth
    seed: int
    chat: bool  # the prompt holds the chat template: tokenize it without adding special tokens
    max_new_tokens: int
    meta: dict = field(default_factory=dict, compare=False)
    # the prompt's documents, for tasks that have them: ``documents.prompt == prompt`` (attention sorting reorders)
    documents: Documents | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Task(Configurable):
    metric: ClassVar[str] = "accuracy"  # accuracy (all of gold found), recall (fraction found), ppl
    uses_depth: ClassVar[bool] = True  # the depth grid applies (else every sample has depth None)
    max_new_tokens: ClassVar[int] = 16

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        raise NotImplementedError

    @property
    def has_documents(self) -> bool:
        """Whether samples carry their documents (``Sample.documents``), so attention sorting can reorder them."""
        return False

    def score(self, prediction: str, gold: tuple[str, ...]) -> float:
        """Fraction of the gold strings found in the prediction (RULER's string match)."""
        if not gold:
            return 0.0
        found = sum(contains(prediction, g) for g in gold)
        if self.metric == "accuracy":
            return float(found == len(gold))
        return found / len(gold)

    def sample(self, tokenizer, prompt: str, gold, length: int, tokens: int, depth: float | None, seed: int,
               chat: bool, **meta) -> Sample:
        return Sample(self.spec(), prompt, tuple(gold), length, tokens, depth, seed, uses_chat(tokenizer, chat),
                      self.max_new_tokens, meta)

    def replace(self, **changes) -> Task:
        return dataclasses.replace(self, **changes)

    def fit_documents(self, tokenizer, length: int, chat: bool, frame: Frame,
                      documents: Callable[[int, int], list[str]], max_units: int, fine: int = 0
                      ) -> tuple[str, int, Documents]:
        """``fit`` a prompt whose context is ``documents(n, m)`` joined by :data:`DOC_SEPARATOR`, and the documents
        it settled on. The prompt must be exactly ``prefix + documents + question``, or sorting could not rebuild
        it."""
        made: dict[str, list[str]] = {}  # each context text fit rendered -> its documents

        def context(n: int, m: int) -> str:
            docs = documents(n, m)
            text = DOC_SEPARATOR.join(docs)
            made[text] = docs
            return text

        prompt, tokens = fit(tokenizer, length, chat, frame, context, max_units=max_units, fine=fine)
        prefix, question = render(tokenizer, frame, "\x00", chat).split("\x00")
        section = prompt[len(prefix):len(prompt) - len(question)]
        docs = Documents(tuple(made.get(section, ())), prefix, question, DOC_SEPARATOR)
        if not docs.documents or docs.prompt != prompt:
            raise SpecError(f"{self.spec()}: this tokenizer's chat template changes the documents' text, so they "
                            "cannot be reordered exactly; run the documents mode with --no-chat")
        return prompt, tokens, docs


def contains(text: str, answer: str) -> bool:
    """``answer`` occurs in ``text`` as a whole token (case-insensitive): 'mill' is not found in 'miller'."""
    return re.search(rf"(?<![\w-]){re.escape(answer.strip())}(?![\w-])", text, re.IGNORECASE) is not None


# ---- random values of the three key/value types (words / numbers / uuids) ----

ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lucky", "misty", "noble", "olive", "proud", "quick", "rusty", "silent", "tidy", "vivid", "witty",
              "young", "zesty", "bold", "crisp", "dim", "fierce", "grand", "humble")
NOUNS = ("anchor", "badger", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchid", "pepper", "quarry", "rocket", "saddle", "tunnel",
         "violin", "walrus", "yacht", "zipper", "barrel", "cactus", "donkey", "feather", "glacier", "helmet")
VALUE_TYPES = ("numbers", "words", "uuids")


def random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(kind)


def distinct_values(rng: random.Random, kind: str, n: int, avoid: str = "") -> list[str]:
    """``n`` different values, none of which occurs in ``avoid`` (so each gold is present exactly once)."""
    out: list[str] = []
    for _ in range(1000 * max(1, n)):
        value = random_value(rng, kind)
        if value not in out and not re.search(rf"(?<![\w-]){re.escape(value)}(?![\w-])", avoid):
            out.append(value)
            if len(out) == n:
                return out
    raise ValueError(f"could not draw {n} distinct {kind}")


def random_name(rng: random.Random, n: int = 5) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(n))


def spread(rng: random.Random, n_items: int, first: float | None) -> list[float]:
    """Relative positions for ``n_items`` inserts: the first at ``first`` (or random), the rest random."""
    out = [first if first is not None else rng.random()]
    out += [rng.random() for _ in range(n_items - 1)]
    return out


def insert_at(pieces: list[str], inserts: list[tuple[float, str]], boundaries: list[int] | None = None) -> str:
    """Join ``pieces`` with each insert placed at its relative position, snapped to a boundary.

    ``boundaries`` are the piece indices after which an insert may go (sentence ends); the
    start (before everything) and the end are always allowed.
    """
    n = len(pieces)
    allowed = sorted({0, n, *(i + 1 for i in (boundaries or range(n)) if i < n)})
    at: dict[int, list[str]] = {}
    for pos, text in inserts:
        want = round(pos * n)
        cut = min(allowed, key=lambda a: (abs(a - want), a))
        at.setdefault(cut, []).append(text)
    out = []
    for i in range(n + 1):
        for text in at.get(i, []):
            if out and not out[-1].endswith((" ", "\n")):
                out.append(" ")
            out.append(text if text.endswith(("\n", " ")) or i == n else text + " ")
        if i < n:
            out.append(pieces[i])
    return "".join(out)


def check_variant(task: str, value: object, n: int, field: str = "wording") -> None:
    """A numbered prompt variant (``wording``, passkey's ``needle``) must be one of the ``n`` that exist."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise SpecError(f"{task}: {field} must be an integer in 0..{n - 1}, got {value!r}")
