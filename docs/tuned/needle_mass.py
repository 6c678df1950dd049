"""Where does a sparse prefill lose the needle? Per layer, the row whose logits give the answer's first digit
against the needle sentence's tokens. The answer's leading space (what the eval generates first) is appended to
the prompt, so that row is the prefill's last one and attends under the prefill's selection; in the eval it is a
decode step, with the method's decode selection.

For each spec the model runs the needle prompt (SmolLM2-135M, chat template, the eval's corpus, seed and depth) with
the spec applied; at every layer an observer takes that layer's q and k as the spec's run produced them and reports:

- ``mass``: the last row's exact attention on the needle sentence (the head that attends it most, of 9);
- ``kept``: the share of that head's needle mass inside the keys the spec's selection lets the last row see
  (the selection is recomputed from the same q/k, as the runtime chose it; 1.000 for dense).

A layer where dense puts mass on the needle and the spec keeps little of it is where the spec lost it; a layer where
the spec's own ``mass`` is already low lost it earlier (the needle's or the question's states changed upstream).

    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/tuned/needle_mass.py 8192 1012 0.5 austen \
        "dense;flexprefill:density=0.1;flexprefill:density=0.1,group=q;flexprefill:density=0.2" \
        > docs/tuned/needle-mass-8k-1012.txt
    PYTHONPATH=src OMP_NUM_THREADS=1 python docs/tuned/needle_mass.py 4096 101 0.25 canterbury \
        "dense;flexprefill:density=0.1;flexprefill:density=0.1,group=q;vslash:density=0.1;vslash:density=0.1,group=q" \
        > docs/tuned/needle-mass-4k-101.txt

(The committed 8k file also holds ``last_heads=max``, an option of commit 9dc0af7 that this file's numbers showed
did not help, and which was reverted.)
"""

from __future__ import annotations

import sys

import torch

import longreach
from longreach.eval.corpus import Corpus
from longreach.eval.tasks import parse_task
from longreach.methods import SelectContext
from longreach.provenance import provenance


def needle_tokens(tok, prompt: str, gold: str) -> tuple[torch.Tensor, range]:
    """The prompt's ids and the token range of the sentence holding the gold value."""
    end = prompt.index(gold) + len(gold)
    start = prompt.rindex("One of the special magic", 0, end)
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
    spans = enc["offset_mapping"][0].tolist()
    inside = [i for i, (a, b) in enumerate(spans) if b > start and a < end]
    return enc["input_ids"], range(inside[0], inside[-1] + 1)


def last_row_report(spec: str, q: torch.Tensor, k: torch.Tensor, scale: float, layer: int, needle: range
                    ) -> tuple[float, float]:
    """(the most needle-attending head's needle mass, the share of it the selection keeps) for the last row."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1).float()
    probs = (q[:, :, -1:].float() @ kk.transpose(-1, -2) * scale).softmax(-1)[0, :, 0]  # (Hq, Tk)
    mass = probs[:, needle.start:needle.stop].sum(-1)
    head = int(mass.argmax())
    selector = longreach.parse_spec(spec).selector
    sel = selector.select(q, k, SelectContext(layer_idx=layer, scale=scale))
    row = sel.mask_rows(torch.tensor([sel.q_len - 1]))[0, :, 0]  # (Hs, Tk) bool: per KV head (or query head)
    seen = row[{1: 0, q.shape[1]: head}.get(row.shape[0], head // group)]  # a dense selection has one row
    kept = float(probs[head, needle.start:needle.stop][seen[needle.start:needle.stop]].sum() / mass[head])
    return float(mass[head]), kept


def main(length: int, seed: int, depth: float, corpus: str, specs: list[str]) -> None:
    torch.set_num_threads(1)
    model, tok = longreach.load_model("smollm2-135m")
    sample = parse_task("niah").build(tok, Corpus.load(corpus), length, depth, seed, True)
    ids, needle = needle_tokens(tok, sample.prompt, sample.gold[0])
    answer = tok(" " + sample.gold[0], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids, digit = torch.cat([ids, answer[None, :1]], 1), int(answer[1])  # the space, then the first digit
    prov = provenance()
    print(f"commit {prov['commit'][:7]}{'+dirty' if prov['dirty'] else ''}, {prov['cpu']}, 1 thread, "
          f"torch {prov['torch']}, transformers {prov['transformers']}")
    print(f"{corpus} seed {seed}, depth {depth}: {ids.shape[1]} prompt tokens, gold {sample.gold[0]!r}, needle "
          f"tokens {needle.start}-{needle.stop - 1}")
    print("per layer: mass (the most needle-attending head's share on the needle) / kept (share of it selected)")
    for spec in specs:
        rows: dict[int, tuple[float, float]] = {}
        with torch.no_grad(), longreach.apply(model, spec) as handle:
            handle.observer = lambda layer, q, k, v, scale, window, mask, rows=rows, spec=spec: rows.__setitem__(
                layer, last_row_report(spec, q, k, scale, layer, needle))
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
        probs = logits.float().softmax(-1)
        top = probs.topk(3)
        first = ", ".join(f"{tok.decode([int(i)])!r} {float(p):.3f}" for p, i in zip(*top, strict=True))
        print(f"\n{spec}: p(first digit {tok.decode([digit])!r}) {float(probs[digit]):.3f}; top 3: {first}")
        print(" ".join(f"L{n}:{m:.3f}/{kept:.2f}" for n, (m, kept) in sorted(rows.items())), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5].split(";"))
