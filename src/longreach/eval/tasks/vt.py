"""Variable tracking (RULER): follow chains of assignments ``VAR A = 12345``, ``VAR B = VAR A``, ...

The chains sit at seeded random places in repetitive filler; distractor chains carry other values.
The model must list every variable bound to the asked value (scored as recall).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from ...configurable import param
from ...errors import SpecError
from ..corpus import Corpus, sentence_ends
from ..fit import Frame, fit
from .base import Sample, Task, distinct_values, insert_at, random_name
from .passkey import filler_pieces


@dataclass(frozen=True)
class VariableTracking(Task):
    name = "vt"
    summary = "variable tracking: list every variable a chain of assignments binds to a value (recall)"
    metric = "recall"
    uses_depth = False

    chains: int = param(1, "assignment chains (the first is asked, the others distract)")
    hops: int = param(4, "assignments after the first in each chain")

    def __post_init__(self) -> None:
        if self.chains < 1 or self.hops < 1:
            raise SpecError("vt: chains and hops must be >= 1")

    @property
    def max_new_tokens(self) -> int:  # type: ignore[override]
        return 6 * (self.hops + 1) + 8

    def build(self, tokenizer, corpus: Corpus, length: int, depth: float | None, seed: int, chat: bool) -> Sample:
        rng = random.Random(seed)
        values = distinct_values(rng, "numbers", self.chains)
        names: list[str] = []
        while len(names) < self.chains * (self.hops + 1):
            name = random_name(rng)
            if name not in names:
                names.append(name)
        inserts = []
        for c, value in enumerate(values):
            chain = names[c * (self.hops + 1):(c + 1) * (self.hops + 1)]
            places = sorted(rng.random() for _ in chain)  # assignments appear in order
            statements = [f"VAR {chain[0]} = {value}."] + [
                f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)]
            inserts += list(zip(places, statements, strict=True))
        gold = names[:self.hops + 1]
        frame = Frame(
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
            f"\n\nQuestion: Find all variables that are assigned the value {values[0]} in the text above.",
            f"Answer: According to the chain(s) of variable assignment in the text above, {len(gold)} variables "
            f"are assigned the value {values[0]}, they are:",
        )

        filler = filler_pieces(2 * length + 64)
        ends = sentence_ends(filler)  # once: insert_at ignores those past n

        def context(n: int, _m: int) -> str:
            return insert_at(filler[:n], inserts, ends)

        prompt, tokens = fit(tokenizer, length, chat, frame, context, max_units=len(filler))
        return self.sample(tokenizer, prompt, gold, length, tokens, None, seed, chat, value=values[0])
