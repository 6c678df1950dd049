"""Where HOMER's token reductions put a passkey: its digits' rank among the context tokens each merged node ranks.

    python docs/homer/reductions.py SEED DEPTH [VARIANT ...]     e.g.  2001 0.25 calibrate=0,final=1 calibrate=1

Builds the eval's passkey prompt (SmolLM2-135M, 16k, chat template, canterbury) for SEED at DEPTH, runs HOMER's
prefill once per variant (extra ``homer`` parameters), and prints, for every reduction above the leaves, the rank
of each key digit among the node's context tokens (0 = most significant) and the budget it kept. A digit ranked
at or past the budget is dropped there. The first predicted token is printed too (not the whole answer).
"""

from __future__ import annotations

import sys

import torch

from longreach import load_model, parse_spec
from longreach.cache.growing import growing_cache
from longreach.eval.corpus import Corpus
from longreach.eval.tasks import parse_tasks


def key_tokens(tok, ids: list[int], key: str) -> list[int]:
    """Indices of the prompt tokens that spell ``key`` (every occurrence)."""
    text, starts = "", []
    for t in ids:
        starts.append(len(text))
        text += tok.decode([t])
    hits = [m for m in range(len(text)) if text.startswith(key, m)]
    return sorted({i for i, st in enumerate(starts) for m in hits if m <= st < m + len(key)})


def main(seed: int, depth: float, variants: list[str]) -> None:
    model, tok = load_model("smollm2-135m")
    sample = parse_tasks("passkey")[0].build(tok, Corpus.load("canterbury"), 16384, depth, seed, True)
    ids = tok(sample.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    needle = key_tokens(tok, ids[0].tolist(), sample.gold[0])
    print(f"seed {seed}, depth {depth}: {ids.shape[1]} tokens, key {sample.gold[0]} at tokens {needle}")
    for variant in variants:
        homer = parse_spec(f"homer:{variant}" if variant else "homer").methods[0]
        head, tail = homer.prefix, homer.suffix
        with torch.no_grad():
            done = homer.prefill(model, ids, growing_cache(model.config))
        kept = {(r.level, r.index): r.kept.tolist() for r in done.trace}
        lines = []
        for r in done.trace:
            if r.level == 0:
                continue
            context = kept[(r.level - 1, 2 * r.index)] + kept[(r.level - 1, 2 * r.index + 1)]
            order = r.scores[head:len(r.scores) - tail].argsort(descending=True).tolist()
            rank = {context[j]: k for k, j in enumerate(order)}
            ranks = [rank[n] for n in needle if n in rank]
            if ranks:
                lines.append(f"level {r.level} node {r.index} at layer {r.layer}: ranks {ranks} of {len(context)}, "
                             f"keeps {len(r.kept)}")
        first = tok.decode([int(done.logits[0, -1].argmax())])
        print(f"{homer}: " + "; ".join(lines) + f" | first token {first!r}")


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:] or [""])
