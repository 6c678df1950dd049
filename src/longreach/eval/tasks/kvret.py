"""Key-value retrieval, "lost in the middle" style: a JSON object of uuid pairs, one key asked.

The gold pair's index is the depth (0 = first pair, 1 = last), so sweeping depths gives an
accuracy-vs-position curve. JSON pairs are ~70 tokens, so line breaks between pairs (valid JSON
whitespace) fine-tune the prompt to the exact length.

``kvret:docs=N`` splits the data into *documents*, one small JSON object of N pairs each, a blank line
between them; the depth is then the gold document's index (0 = first document, 1 = last). The sample carries
its documents (``Sample.documents``) so attention sorting (``longreach eval --sort-documents``) can re-order
them; the line breaks that fine-tune the length sit inside each document, so they move with it.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass

from ...configurable import param
from ...errors import SpecError
from ..corpus import Corpus
from ..fit import Frame, fit
from .base import Sample, Task, distinct_values

FINE_LEVELS = 16  # at most 15 blank lines between two pairs: enough to close a one-pair gap from n >= 6
DOC_FINE_LEVELS = 40  # per pair of a document: closes a one-document gap (~70 tokens a pair) from 2 documents on


def pair(key: str, value: str) -> str:
    return f"{json.dumps(key)}: {json.dumps(value)}"


@dataclass(frozen=True)
class KVRetrieval(Task):
    name = "kvret"
    summary = "key-value retrieval from a JSON of uuid pairs; the gold pair swept first to last (exact match)"
    max_new_tokens = 64  # a uuid is ~25 tokens; models often quote the key first
    docs: int = param(0, "0: one JSON object; N >= 1: documents of N pairs each (one JSON object per document), "
                         "the gold document swept first to last (for --sort-documents)")

    def __post_init__(self) -> None:
        if isinstance(self.docs, bool) or not isinstance(self.docs, int) or self.docs < 0:
            raise SpecError(f"kvret: docs must be an integer >= 0 (pairs per document), got {self.docs!r}")

    @property
    def has_documents(self) -> bool:
        return self.docs > 0

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        depth = 0.5 if depth is None else depth
        if self.docs:
            return self.build_documents(tokenizer, length, depth, seed, chat)
        max_units = length // 8 + 4  # a pair of uuids is far more than 8 tokens
        uuids = distinct_values(random.Random(seed), "uuids", 2 * max_units)
        (gold_key, *keys), (gold_value, *values) = uuids[:max_units], uuids[max_units:]
        frame = Frame(
            "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n",
            f"\n\nKey: {json.dumps(gold_key)}",
            "Corresponding value:",
        )

        def pairs(n: int) -> list[str]:
            out = [pair(k, v) for k, v in zip(keys[:n - 1], values, strict=False)]
            out.insert(round(depth * (n - 1)), pair(gold_key, gold_value))
            return out

        def context(n: int, m: int) -> str:
            if n == 0:
                return "{}"
            gaps = max(1, n - 1)
            levels = [m // gaps + (i < m % gaps) for i in range(n - 1)]
            seps = [", " if lv == 0 else ",\n" + " \n" * (lv - 1) for lv in levels] + [""]
            return "{" + "".join(p + s for p, s in zip(pairs(n), seps, strict=True)) + "}"

        prompt, tokens = fit(tokenizer, length, chat, frame, context, max_units=max_units, fine=FINE_LEVELS)
        n = prompt.count('": "')
        return self.sample(tokenizer, prompt, [gold_value], length, tokens, depth, seed, chat,
                           position=round(depth * (n - 1)), pairs=n)

    def build_documents(self, tokenizer, length: int, depth: float, seed: int, chat: bool) -> Sample:
        """``n`` documents of ``docs`` pairs; the gold pair in document ``round(depth * (n - 1))``, at a seeded
        place inside it. ``fit`` grows the number of documents, then pads inside them one line break at a time."""
        per = self.docs
        rng = random.Random(seed)
        max_docs = length // (8 * per) + 4  # a pair of uuids is far more than 8 tokens
        uuids = distinct_values(rng, "uuids", 2 * max_docs * per)
        (gold_key, *keys), (gold_value, *values) = uuids[:max_docs * per], uuids[max_docs * per:]
        slot = rng.randrange(per)  # the gold pair's place inside its document
        frame = Frame(
            "Extract the value corresponding to the specified key in the JSON objects below.\n\nJSON data:\n",
            f"\n\nKey: {json.dumps(gold_key)}",
            "Corresponding value:",
        )
        def documents(n: int, m: int) -> list[str]:
            gold, others = round(depth * (n - 1)), iter(zip(keys, values, strict=True))
            out = []
            for i in range(n):
                group = [pair(*next(others)) for _ in range(per - (i == gold))]
                if i == gold:
                    group.insert(slot, pair(gold_key, gold_value))
                level = m // n + (i < m % n)
                pad = "" if level == 0 else "\n" + " \n" * (level - 1)
                out.append("{" + ", ".join(group) + pad + "}")
            return out

        prompt, tokens, docs = self.fit_documents(tokenizer, length, chat, frame, documents, max_docs,
                                                  DOC_FINE_LEVELS * per)
        n = len(docs.documents)
        sample = self.sample(tokenizer, prompt, [gold_value], length, tokens, depth, seed, chat,
                             gold_document=round(depth * (n - 1)), documents=n, pairs=n * per)
        return dataclasses.replace(sample, documents=docs)
