"""Per layer and head: how much of the LAST query's dense attention sits on the passkey's tokens, and the share
of it each method's selection keeps (docs/template-free.md). One dense forward; methods are replayed on each
layer's real queries and keys through ``apply``'s observer, as ``longreach diagnose`` does.

    python docs/examples/needle_mass.py --seed 2000 --length 4096 --no-chat \
        --method "flexprefill:density=0.1,exact_last=false" --method "flexprefill:density=0.1"
"""

from __future__ import annotations

import argparse

import torch

import longreach
from longreach import parse_spec
from longreach.eval import Corpus, parse_task
from longreach.methods import SelectContext


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--no-chat", dest="chat", action="store_false")
    ap.add_argument("--method", action="append", required=True)
    ap.add_argument("--min-mass", type=float, default=0.1, help="heads with at least this much on the needle")
    args = ap.parse_args()

    model, tok = longreach.load_model("smollm2-135m")
    sample = parse_task("passkey").build(tok, Corpus.load("canterbury"), args.length, args.depth, args.seed, args.chat)
    ids = tok(sample.prompt, return_tensors="pt", add_special_tokens=not sample.chat)["input_ids"]
    at = len(tok(sample.prompt[: sample.prompt.index(sample.gold[0])], add_special_tokens=not sample.chat)["input_ids"])
    needle = slice(at - 8, at + 8)  # the sentence around the code
    specs = [parse_spec(m) for m in args.method]
    print(f"{ids.shape[1]} tokens, needle tokens {needle.start}..{needle.stop}, prompt ends {sample.prompt[-60:]!r}")

    def observe(layer, q, k, v, scale, sliding, key_mask):
        if sliding is not None:
            return
        group = q.shape[1] // k.shape[1]
        probs = (torch.einsum("hd,htd->ht", q[0, :, -1], k[0].repeat_interleave(group, 0)).float() * scale).softmax(-1)
        mass = probs[:, needle].sum(-1)  # (Hq,)
        heads = [h for h in range(q.shape[1]) if mass[h] >= args.min_mass]
        if not heads:
            return
        kept = []
        for spec in specs:
            sel = spec.selector.select(q, k, SelectContext(layer, key_mask, None, {}, scale))
            rows = sel.mask_rows(torch.tensor([q.shape[2] - 1]))[0, :, 0]  # (Hs, Tk) the last query's keys
            rows = rows.repeat_interleave(q.shape[1] // rows.shape[0], 0)
            share = (probs * rows)[:, needle].sum(-1) / mass.clamp(min=1e-12)
            kept.append(f"{spec}: " + ", ".join(f"{share[h]:.2f}" for h in heads))
        print(f"layer {layer:2d} heads {heads} needle mass " + ", ".join(f"{mass[h]:.2f}" for h in heads)
              + " | kept " + " | ".join(kept))

    with torch.no_grad(), longreach.apply(model, "dense", track_density=False) as handle:
        handle.observer = observe
        model(input_ids=ids, use_cache=False)


if __name__ == "__main__":
    main()
