"""How close was dense to a different answer? A diagnostic for tuning prompts the sparse prefill candidates lost.

The needle prompt (SmolLM2-135M, Canterbury, chat template, the tune's depth for that seed) is followed by its gold
answer, and each spec's forward gives, at every answer token, the gold token's probability and the most likely
other token with its probability (teacher forcing). Every row of the prompt and of the answer runs through the spec
as prompt rows in one forward; an eval decodes the answer one row at a time, with the spec's decode selection and
the prompt's last row held back, so for a sparse spec this approximates the eval's path, and for dense it is the
same computation. Where dense's gold token barely leads, a small change of attention can flip greedy decoding:
that prompt is a near-tie (docs/tuning.md).

    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/tuned/near_tie.py 8192 102 0.5 \
        "dense;vslash:density=0.9;flexprefill:density=0.2;vslash:density=0.2" > docs/tuned/near-tie-8k-102.txt
    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/tuned/near_tie.py 4096 101 0.25 \
        "dense;flexprefill:density=0.1;vslash:density=0.1" > docs/tuned/near-tie-4k-101.txt
"""

from __future__ import annotations

import sys

import torch

import longreach
from longreach.eval.corpus import Corpus
from longreach.eval.tasks import parse_task
from longreach.provenance import provenance


def main(length: int, seed: int, depth: float, specs: list[str]) -> None:
    torch.set_num_threads(1)
    model, tok = longreach.load_model("smollm2-135m")
    sample = parse_task("niah").build(tok, Corpus.load("canterbury"), length, depth, seed, True)
    prompt = tok(sample.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    answer = tok(" " + sample.gold[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids, n = torch.cat([prompt, answer], 1), answer.shape[1]
    prov = provenance()
    print(f"commit {prov['commit'][:7]}{'+dirty' if prov['dirty'] else ''}, {prov['cpu']}, {prov['threads']} thread, "
          f"torch {prov['torch']}, transformers {prov['transformers']}")
    print(f"seed {seed}, depth {depth}: {prompt.shape[1]} prompt tokens, gold {sample.gold[0]!r}, prompt ends "
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
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(";"))
