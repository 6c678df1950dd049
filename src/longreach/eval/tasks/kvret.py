"""Key-value retrieval, "lost in the middle" style: a JSON object of uuid pairs, one key asked.

The gold pair's index is the depth (0 = first pair, 1 = last), so sweeping depths gives an
accuracy-vs-position curve. JSON pairs are ~70 tokens, so line breaks between pairs (valid JSON
whitespace) fine-tune the prompt to the exact length.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from ..corpus import Corpus
from ..fit import Frame, fit
from .base import Sample, Task, distinct_values

FINE_LEVELS = 16  # at most 15 blank lines between two pairs: enough to close a one-pair gap from n >= 6


@dataclass(frozen=True)
class KVRetrieval(Task):
    name = "kvret"
    summary = "key-value retrieval from a JSON of uuid pairs; the gold pair swept first to last (exact match)"
    max_new_tokens = 64  # a uuid is ~25 tokens; models often quote the key first

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        depth = 0.5 if depth is None else depth
        max_units = length // 8 + 4  # a pair of uuids is far more than 8 tokens
        uuids = distinct_values(random.Random(seed), "uuids", 2 * max_units)
        (gold_key, *keys), (gold_value, *values) = uuids[:max_units], uuids[max_units:]
        frame = Frame(
            "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n",
            f"\n\nKey: {json.dumps(gold_key)}",
            "Corresponding value:",
        )

        def pairs(n: int) -> list[str]:
            out = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in zip(keys[:n - 1], values, strict=False)]
            out.insert(round(depth * (n - 1)), f"{json.dumps(gold_key)}: {json.dumps(gold_value)}")
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
