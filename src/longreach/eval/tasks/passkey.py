"""Passkey retrieval: a random 5-digit number hidden at a chosen depth of repetitive filler."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ...configurable import param
from ..corpus import Corpus, sentence_ends
from ..fit import Frame, fit
from .base import Sample, Task, check_variant, insert_at

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# needle=0 is the form the project's committed rows use. Its second sentence restates the answer prefix, and a
# model that continues the prefix by pattern ("The pass key is" -> "the number above.") scores 0 whatever it
# retrieved: Gemma-3-270M does so at 8k. needle=1 is Landmark Attention's form (also LongLM's and LongLoRA's).
NEEDLES = ("\nThe pass key is {key}. Remember it. The pass key is the number above.\n",
           "\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.\n\n")
# wording=0 is the classic passkey prompt; the others ask as a user might, so a method's defaults are checked
# against how the prompt ends (another question and prefix; the question alone, no answer prefix)
FRAMES = (
    Frame(INSTRUCTION, "\n\nWhat is the pass key? Answer with the number only.", "The pass key is"),
    Frame("Read the text below. Somewhere in it there is a pass key.\n\n",
          "\n\nWhich number was given as the pass key?", "Answer:"),
    Frame(INSTRUCTION, "\n\nWhat is the pass key mentioned in the text above?"),
)
WORDINGS = "0: the classic question and answer prefix; 1: another question, prefix 'Answer:'; 2: the question alone"


def filler_pieces(n: int, text: str = FILLER) -> list[str]:
    words = re.findall(r"\S+\s*", text)
    return [words[i % len(words)] for i in range(n)]


@dataclass(frozen=True)
class Passkey(Task):
    name = "passkey"
    summary = "a 5-digit pass key hidden in repetitive filler; exact match of the first number"

    wording: int = param(0, WORDINGS)
    needle: int = param(0, "0: '...Remember it. The pass key is the number above.'; "
                           "1: Landmark Attention's '...Remember it. {key} is the pass key.'")

    def __post_init__(self) -> None:
        check_variant(self.name, self.wording, len(FRAMES))
        check_variant(self.name, self.needle, len(NEEDLES), "needle")

    @property
    def max_new_tokens(self) -> int:  # type: ignore[override]
        """10 after an answer prefix; 16 without one, where a model may restate "The pass key is" first (Gemma-3
        then spends one token a digit: "The pass key is 4054" was cut off at 10, gold 40548)."""
        return 10 if FRAMES[self.wording].answer else 16

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        depth = 0.5 if depth is None else depth
        key = str(random.Random(seed).randint(10000, 99999))
        needle = NEEDLES[self.needle].format(key=key)

        filler = filler_pieces(2 * length + 64)
        ends = sentence_ends(filler)  # once: insert_at ignores those past n

        def context(n: int, _m: int) -> str:
            return insert_at(filler[:n], [(depth, needle)], ends)

        prompt, tokens = fit(tokenizer, length, chat, FRAMES[self.wording], context, max_units=len(filler))
        return self.sample(tokenizer, prompt, [key], length, tokens, depth, seed, chat)

    def score(self, prediction: str, gold: tuple[str, ...]) -> float:
        """1.0 when the first number in the continuation is the key."""
        found = re.findall(r"\d+", prediction)
        return float(bool(found) and found[0] == gold[0])
