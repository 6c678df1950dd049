"""Does the lookback detector see more than where the needle was? (docs/analyses.md, "At scale")

The labels depend strongly on the needle's depth and the prompt's length, and both could shape the lookback
ratios. This script cross-validates, with the library's own fit (5 stratified folds, seed 0, l2 1.0):
  1. the lookback detector on its 270 features (as `longreach lookback fit` does);
  2. a position-only detector on one-hot (length, depth) features: what knowing where the needle was gives;
and reports the lookback detector's out-of-fold AUROC inside each (length, depth) cell, where position is fixed.
Last, it rebuilds each prompt (the task's own builder, checked against the row's gold) and sorts the wrong
answers: another value of the prompt (a distractor needle's), the right value cut short, or a number found
nowhere in it.

    python docs/analyses/lookback-scale/by_position.py docs/analyses/lookback-scale/data.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from longreach.analysis.logistic import auroc, cross_validate
from longreach.eval.stats import mcnemar_exact, newcombe_paired


def main(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    y = torch.tensor([r["label"] for r in rows])
    x = torch.tensor([r["features"] for r in rows], dtype=torch.float64)
    cells = sorted({(r["length"], r["depth"]) for r in rows})
    onehot = torch.tensor([[float((r["length"], r["depth"]) == c) for c in cells] for r in rows], dtype=torch.float64)
    look, pos = cross_validate(x, y), cross_validate(onehot, y)
    print(f"{len(rows)} rows, {int(y.sum())} wrong; 5-fold cross-validation, seed 0")
    print(f"lookback features ({x.shape[1]}): accuracy {look.accuracy:.3f}, AUROC {look.auroc:.3f}")
    print(f"position only ({len(cells)} one-hot cells): accuracy {pos.accuracy:.3f}, AUROC {pos.auroc:.3f}")
    prob = torch.tensor(look.probabilities)
    hit_look = ((prob >= 0.5).long() == y).tolist()
    hit_pos = ((torch.tensor(pos.probabilities) >= 0.5).long() == y).tolist()
    pairs = Counter(zip(hit_look, hit_pos, strict=True))
    a, b, c, d = pairs[True, True], pairs[True, False], pairs[False, True], pairs[False, False]
    diff, lo, hi = newcombe_paired(a, b, c, d)
    print(f"lookback - position-only accuracy on the same rows: {100 * diff:+.1f} points [{100 * lo:+.1f}, "
          f"{100 * hi:+.1f}] (Newcombe 10), McNemar p = {mcnemar_exact(b, c):.2g} ({b} rows only lookback got "
          f"right, {c} only position)")
    print("\nlookback detector inside each cell (out-of-fold):")
    print("length depth  rows wrong  accuracy  cell-majority  AUROC")
    pooled = []
    for length, depth in cells:
        idx = torch.tensor([i for i, r in enumerate(rows) if (r["length"], r["depth"]) == (length, depth)])
        yc, pc = y[idx], prob[idx]
        acc = float(((pc >= 0.5).long() == yc).double().mean())
        major = max(float(yc.double().mean()), 1 - float(yc.double().mean()))
        both = 0 < int(yc.sum()) < len(yc)
        a = auroc(pc, yc) if both else float("nan")
        if both:
            pooled.append((a, int(yc.sum()) * int((1 - yc).sum())))
        print(f"{length:6d} {depth:5.2f} {len(yc):5d} {int(yc.sum()):5d}  {acc:8.3f}  {major:13.3f}  {a:5.3f}")
    weight = sum(w for _, w in pooled)
    print(f"\nwithin-cell AUROC, cells with both labels weighted by their (wrong, right) pairs: "
          f"{sum(a * w for a, w in pooled) / weight:.3f} over {weight} pairs")
    kinds = wrong_kinds(rows)
    print("\nwrong answers:", dict(Counter(k for k in kinds if k != "right")))
    for kind in sorted(set(kinds) - {"right"}):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        print(f"  {kind}: flagged wrong out of fold {sum(prob[i] >= 0.5 for i in idx)} of {len(idx)}")


def wrong_kinds(rows: list[dict]) -> list[str]:
    """'right', or for a wrong answer what its first number is: another 7-digit value of its prompt (a distractor
    needle's), the start of the right value, or neither."""
    from longreach.eval import Corpus, parse_task
    from longreach.models import load_tokenizer

    tok = load_tokenizer(rows[0]["model"])
    kinds = []
    for r in rows:
        sample = parse_task(r["task_spec"]).build(tok, Corpus.load(r["corpus"]), r["length"], r["depth"], r["seed"],
                                                  r["chat"])
        assert list(sample.gold) == r["gold"], "the prompt rebuilt is not the row's: another task version?"
        number = re.findall(r"\d+", r["prediction"])
        if r["label"] == 0:
            kinds.append("right")
        elif not number:
            kinds.append("no number")
        elif number[0] in re.findall(r"\d{7}", sample.prompt):
            kinds.append("another value of the prompt")
        elif any(g.startswith(number[0]) for g in r["gold"]):
            kinds.append("the right value cut short")
        else:
            kinds.append("a number not in the prompt")
    return kinds


if __name__ == "__main__":
    main(sys.argv[1])
