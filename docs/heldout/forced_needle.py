"""Is the 10% press's loss on the bare question the needle's? A diagnostic, not an option of the press.

On the fresh prompts where dense answered and `snapkv:density=0.1,hold=false,pool=31,vote=max` did not
(docs/heldout/README.md: Canterbury, `niah:wording=2`, no template, 4k), the press's top-k is patched so that
given spans of the prompt are kept in every layer and head. If keeping the needle sentence everywhere brings the
answers back, the press lost the needle; if not, something else in what it dropped decided the answer. Each line:
the variant, the answer, its score, and the share of the needle's tokens (and of the
value's) kept, averaged over layers and heads.

    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/heldout/forced_needle.py > docs/heldout/forced-needle.jsonl
"""

from __future__ import annotations

import json

import torch

import longreach
from longreach.cache import compressed, press
from longreach.eval import Corpus, parse_task
from longreach.eval.measure import run_sample
from longreach.provenance import provenance

SEEDS = {3000: 0.0, 3026: 0.25, 3039: 1.0, 3040: 0.0, 3046: 0.25}  # seed: depth, as the eval cycled them
PRESS = "snapkv:density={},hold=false,pool=31,vote=max"
VARIANTS = [("press", 0.1, ()), ("needle forced", 0.1, ("needle",)),
            ("needle and instruction forced", 0.1, ("needle", "instruction")), ("density 0.25", 0.25, ())]


def spans(tok, prompt: str, gold: str) -> dict[str, list[int]]:
    """Token indices of the instruction, the needle sentence and its value."""
    offsets = tok(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]

    def tokens(start: int, stop: int) -> list[int]:
        return [i for i, (a, b) in enumerate(offsets) if a < stop and b > start]

    needle = prompt.index("One of the special magic")
    return {"instruction": tokens(0, prompt.index("afterwards.") + len("afterwards.")),
            "needle": tokens(needle, prompt.index(".", needle + 30) + 1),
            "value": tokens(prompt.index(gold), prompt.index(gold) + len(gold))}


def main() -> None:
    model, tok = longreach.load_model("smollm2-135m")
    task, corpus = parse_task("niah:wording=2"), Corpus.load("canterbury")
    kept: list[torch.Tensor] = []
    keep, top_keep = compressed.CompressedLayer.keep, press.top_keep

    def recording_keep(layer, idx):
        kept.append(idx[0].clone())
        return keep(layer, idx)

    compressed.CompressedLayer.keep = recording_keep
    for seed, depth in SEEDS.items():
        sample = task.build(tok, corpus, 4096, depth, seed, False)
        where = spans(tok, sample.prompt, sample.gold[0])
        for name, density, forced in VARIANTS:
            force = [i for span in forced for i in where[span]]

            def forced_top_keep(scores, capacity, sinks, recent, force=force):
                scores = scores.clone()
                scores[..., force] = float("inf")
                return top_keep(scores, capacity, sinks, recent)

            press.top_keep = forced_top_keep
            kept.clear()
            with longreach.apply(model, PRESS.format(density)) as handle:
                row = run_sample(model, tok, task, sample, handle)
            heads = [h.tolist() for idx in kept for h in idx]  # every layer's and head's kept positions
            share = {span: sum(len(set(where[span]) & set(h)) for h in heads) / (len(where[span]) * len(heads))
                     for span in ("needle", "value")}
            print(json.dumps({"seed": seed, "depth": depth, "variant": name, "spec": PRESS.format(density),
                              "forced": list(forced), "gold": list(sample.gold), "prediction": row["prediction"],
                              "score": row["score"],
                              "needle_kept": round(share["needle"], 3), "value_kept": round(share["value"], 3),
                              "provenance": provenance()}), flush=True)
    press.top_keep = top_keep


if __name__ == "__main__":
    main()
