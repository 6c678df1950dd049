"""How close was dense to a different answer? A diagnostic for a tuning prompt that every sparse prefill lost.

The needle prompt (SmolLM2-135M, 8k, Canterbury, chat template, depth 0.5, the given seed) is followed by its gold
answer, and each spec's forward gives, at every answer token, the gold token's probability and the most likely
other token with its probability (teacher forcing: every row of the prompt and of the answer runs through the spec, so a
prefill spec also covers the answer's rows, which an eval would decode densely). Where dense's gold token barely
leads, any change of attention can flip greedy decoding: that prompt is a near-tie (docs/tuning.md).

    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/tuned/near_tie.py 102 \
        "dense;vslash:density=0.9;flexprefill:density=0.2" > docs/tuned/near-tie-102.txt
"""

from __future__ import annotations

import sys

import torch

import longreach
from longreach.eval.corpus import Corpus
from longreach.eval.tasks import parse_task


def main(seed: int, specs: list[str]) -> None:
    torch.set_num_threads(1)
    model, tok = longreach.load_model("smollm2-135m")
    sample = parse_task("niah").build(tok, Corpus.load("canterbury"), 8192, 0.5, seed, True)
    prompt = tok(sample.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    answer = tok(" " + sample.gold[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids, n = torch.cat([prompt, answer], 1), answer.shape[1]
    print(f"seed {seed}: {prompt.shape[1]} prompt tokens, gold {sample.gold[0]!r}, prompt ends "
          f"{sample.prompt[-80:]!r}")
    print("spec: per answer token, gold token:p(gold) (the most likely other token: p)")
    for spec in specs:
        with torch.no_grad(), longreach.apply(model, spec):
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1).logits[0, :-1]
        probs = logits.float().softmax(-1)
        parts = []
        for j in range(n):
            gold = int(answer[0, j])
            other = int(probs[j].index_fill(0, torch.tensor([gold]), -1.0).argmax())
            parts.append(f"{tok.decode([gold])!r}:{probs[j, gold]:.3f} ({tok.decode([other])!r}: "
                         f"{probs[j, other]:.3f})")
        print(f"{spec}: " + " ".join(parts), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2].split(";"))
