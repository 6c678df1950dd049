"""Control for the attention-sorting run at 8k, depth 0 (docs/attention-sorting.md): the same 10 prompts with their
8 documents in a random order (seeded by the prompt's seed) instead of the order one round of sorting gave.

If a shuffle, which moves the first document inward 7 times in 8, recovers as many needles as sorting did, the
gain came from leaving position 0, not from the attention ranking. Answers as `longreach eval` does (the same
sample builder, `run_sample`, dense, chat template), so the rows pair with niah-8k-depth0/ by seed.

    PYTHONPATH=src python docs/attention-sorting/shuffle_control.py > docs/attention-sorting/shuffle-control.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import random

import longreach
from longreach.eval import Corpus, parse_task
from longreach.eval.measure import run_sample
from longreach.provenance import provenance

SEEDS = range(1000, 1010)
DOCS = 8


def main() -> None:
    model, tok = longreach.load_model("smollm2-135m")
    task, corpus = parse_task(f"niah:docs={DOCS}"), Corpus.load("austen")
    with longreach.apply(model, "dense") as handle:
        for seed in SEEDS:
            sample = task.build(tok, corpus, 8192, 0.0, seed, True)
            order = list(range(DOCS))
            random.Random(seed).shuffle(order)  # order[j]: the original document placed j-th
            docs = sample.documents.reordered(order)
            answered = dataclasses.replace(sample, prompt=docs.prompt, documents=docs)
            measured = run_sample(model, tok, task, answered, handle)
            print(json.dumps({"seed": seed, "depth": 0.0, "order": order, "gold_document": 0,
                              "gold_document_shuffled": order.index(0), "gold": list(sample.gold),
                              "prediction": measured["prediction"], "score": measured["score"],
                              "provenance": provenance()}), flush=True)


if __name__ == "__main__":
    main()
