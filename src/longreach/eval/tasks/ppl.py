"""Perplexity on long real documents, reported per position bucket.

Does loss keep falling as the model sees more context, or blow up past its trained length (or
under a sparse method)? The sample is the first ``length`` tokens of real prose starting at a
seeded sentence; the runner scores every next-token prediction with the method applied.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...configurable import param
from ...errors import SpecError
from ..corpus import Corpus
from .base import Sample, Task


@dataclass(frozen=True)
class Perplexity(Task):
    name = "ppl"
    summary = "perplexity of real prose, per position bucket (lower is better)"
    metric = "ppl"
    uses_depth = False
    max_new_tokens = 0

    buckets: int = param(8, "equal-width position buckets the loss is reported in")

    def __post_init__(self) -> None:
        if self.buckets < 1:
            raise SpecError("ppl: buckets must be >= 1")

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        words = corpus.passage(seed, 2 * length + 64)
        text = "".join(words)
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) < length:
            raise ValueError(f"ppl: the corpus passage has only {len(ids)} tokens, fewer than {length}")
        # cut at exactly ``length`` tokens; the runner scores these ids, never a re-tokenised string
        return Sample(self.spec(), text, (), length, length, None, seed, False, 0, {"ids": ids[:length]})

    def score(self, prediction: str, gold: tuple[str, ...]) -> float:
        raise TypeError("ppl is scored by the runner from per-token losses, not from a prediction")
