"""The README's headline results, computed from the committed rows (standard library only).

    python3 docs/headline.py            # from the repository root (paths are relative to this file)
    python3 docs/headline.py --check    # also verify the interval code against hand-checked cases

Accuracy cells: k/n with a Wilson 95% score interval, and where dense ran on the same prompts (paired by
task, length, depth, seed *and* the prompt's hash) the paired difference method - dense with Newcombe's
(1998) method 10 interval: Wilson intervals for both marginals combined by square-and-add with the phi
correlation of the 2x2 table of paired outcomes (numerator ad - bc shrunk by n/2 towards 0 when
positive, as in Newcombe's paper; phi = 0 when a margin is empty). Speed cells: the medians and min–max of the
benchmark JSON the README quotes (3 repeats in one run; ratios hold within a run, not across machines).

The interval code is the library's, `longreach.eval.stats` (what `longreach report` uses too); without
longreach installed, this script loads that module from src/ by path, so it still runs on plain python3.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent

try:
    from longreach.eval.stats import newcombe_paired, wilson
except ImportError:  # plain python3 without longreach installed: the same module, loaded from its file (stdlib only)
    import importlib.util

    _spec = importlib.util.spec_from_file_location("longreach_eval_stats", DOCS.parent / "src/longreach/eval/stats.py")
    _stats = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_stats)
    newcombe_paired, wilson = _stats.newcombe_paired, _stats.wilson


def rows(*paths: str) -> list[dict]:
    out, seen = [], set()
    for path in paths:
        for line in (DOCS / path).read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            key = (path, r["method"], r["task"], r["length"], r["depth"], r["seed"])
            if key not in seen:  # a resumed run never duplicates, but be safe
                seen.add(key)
                out.append(r)
    return out


def paired(method: str, base: str, *paths: str, keep=lambda r: True) -> dict:
    """Pair each row of `method` with the row of `base` on the same prompt in the same folder."""
    table = {}
    for path in paths:
        for r in rows(path):
            if keep(r) and r["method"] in (method, base):
                key = (path, r["task"], r["length"], r["depth"], r["seed"])
                table.setdefault(key, {})[r["method"]] = r
    a = b = c = d = 0
    density = []
    for key, pair in sorted(table.items()):
        if method not in pair or base not in pair:
            continue
        m, o = pair[method], pair[base]
        if m.get("prompt_sha") != o.get("prompt_sha"):
            raise SystemExit(f"{key}: {method} and {base} saw different prompts")
        x, y = m["score"] >= 1.0, o["score"] >= 1.0
        a, b, c, d = a + (x and y), b + (x and not y), c + (y and not x), d + (not x and not y)
        density.append(m["density"])
    n = a + b + c + d
    return {"n": n, "k": a + b, "k_base": a + c, "table": (a, b, c, d), "density": sum(density) / n}


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def points(x: float) -> str:
    return "0" if round(100 * x) == 0 else f"{100 * x:+.0f}"


def accuracy(label: str, method: str, *paths: str, keep=lambda r: True) -> None:
    p = paired(method, "dense", *paths, keep=keep)
    n, k, kb = p["n"], p["k"], p["k_base"]
    lo, hi = wilson(k, n)
    blo, bhi = wilson(kb, n)
    diff, dlo, dhi = newcombe_paired(*p["table"])
    density = f"; prefill density {p['density']:.3f}" if p["density"] < 1 else ""
    print(
        f"| {label} | `{method}` | {k}/{n} ({pct(k / n)}; {pct(lo)}–{pct(hi)}) "
        f"| {kb}/{n} ({pct(kb / n)}; {pct(blo)}–{pct(bhi)}) "
        f"| {points(diff)} points [{points(dlo)}, {points(dhi)}] "
        f"| {'/'.join(map(str, p['table']))}{density} |"
    )


SPEED_RUN = "benchmarks/issue20/{}-ed4d699.json"  # the runs README headline 2 quotes (medians of 3, fresh processes)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def speed() -> None:
    att = json.loads((DOCS / SPEED_RUN.format("attention")).read_text())
    e2e = json.loads((DOCS / SPEED_RUN.format("e2e-16k")).read_text())
    print(f"\nSpeed, 3 repeats in one run: the ratio of median times, and the per-repeat ratios' min–max (attention;"
          f" end to end: the two median times, or the decode runs' min–max); {att['hardware']}\n")
    print("| benchmark | T | method | ratio of medians (decode: median) | spread |")
    print("|---|---|---|---|---|")
    for r in att["rows"]:
        if r["phase"] == "prefill" and r["length"] in (16384, 32768):
            print(f"| attention, SmolLM2 heads {r['heads']}, vs causal SDPA | {r['length'] // 1024}k | `{r['spec']}` "
                  f"| {r['speedup']:.2f}x | {spread(r['speedups'])}x |")
    base = next(r for r in e2e["rows"] if r["method"] == "transformers")
    for r in e2e["rows"]:
        if r["method"] != "transformers":
            print(f"| end to end, SmolLM2-135M, time to first token vs transformers | {r['length'] // 1024}k "
                  f"| `{r['method']}` | {r['ttft_speedup']:.2f}x | {r['ttft_s']:.1f} s vs {base['ttft_s']:.1f} s |")
    for r in e2e["rows"]:
        print(f"| end to end, SmolLM2-135M, decode tok/s | {r['length'] // 1024}k | `{r['method']}` "
              f"| {r['decode_tok_s']:.2f} | {spread(r['decode_runs'])} |")


def check() -> None:
    """Hand-checked cases: Wilson 0/10 and 10/10, a zero difference of identical columns, and the
    square-and-add bounds with phi = 0 recomputed by hand."""
    lo, hi = wilson(0, 10)
    assert abs(lo) < 1e-12 and abs(hi - 0.2775) < 1e-4, (lo, hi)
    lo, hi = wilson(10, 10)
    assert abs(lo - 0.7225) < 1e-4 and abs(hi - 1) < 1e-12, (lo, hi)
    diff, lo, hi = newcombe_paired(20, 0, 0, 0)  # all right in both: +-(1 - Wilson lower of 20/20)
    assert diff == 0 and abs(hi - (1 - wilson(20, 20)[0])) < 1e-12 and abs(lo + hi) < 1e-12
    # b = 1, c = 0, a = 0, d = 1 (n = 2): ad - bc = 0 -> phi = 0, plain square-and-add
    l1, u1 = wilson(1, 2)
    _, u2 = wilson(0, 2)
    diff, lo, hi = newcombe_paired(0, 1, 0, 1)
    assert abs(lo - (0.5 - math.hypot(0.5 - l1, u2))) < 1e-12 and abs(hi - (0.5 + math.hypot(0.0, u1 - 0.5))) < 1e-12
    # the interval for method - dense is the mirror image of dense - method
    d1, lo1, hi1 = newcombe_paired(11, 3, 1, 5)
    d2, lo2, hi2 = newcombe_paired(11, 1, 3, 5)
    assert abs(d1 + d2) < 1e-12 and abs(lo1 + hi2) < 1e-12 and abs(hi1 + lo2) < 1e-12
    print("checks passed")


def main() -> None:
    if "--check" in sys.argv:
        check()
    print(
        "| result | method | method right (Wilson 95% CI) | dense on the same prompts | paired difference, "
        "method - dense (95% CI, Newcombe 10) | pairs: both / only method / only dense / neither |"
    )
    print("|---|---|---|---|---|---|")
    for length in ("4k", "8k"):  # longreach tune's choices, on their held-back reporting prompts (docs/tuned.md)
        for task in ("passkey", "niah"):
            accuracy(f"tuned KV press, 10% cache, {length}, {task}", "snapkv:density=0.1,pool=31",
                     f"tuned/smollm2-{length}/reporting/results.jsonl", keep=lambda r, task=task: r["task"] == task)
    for length in ("4k", "8k"):  # the same texts as the reporting prompts, without the chat template
        for task in ("passkey", "niah"):
            accuracy(f"tuned KV press, 10% cache, {length}, no chat template, {task}", "snapkv:density=0.1,pool=31",
                     f"heldout/smollm2-{length}-nochat-austen/results.jsonl",
                     keep=lambda r, task=task: r["task"] == task)
    for density in ("0.1", "0.2"):  # the fastest prefill candidates, sent on by --tune-slack: both failed
        for task in ("passkey", "niah"):
            accuracy(f"sparse prefill, 8k, {task} (the spec failed the tune on niah)",
                     f"flexprefill:density={density}", "tuned/smollm2-8k/reporting/results.jsonl",
                     keep=lambda r, task=task: r["task"] == task)
    accuracy("tuned KV press, 10% cache, 4k, multikey needle", "snapkv:density=0.1,pool=31",
             "heldout/smollm2-4k-multikey-austen/results.jsonl")
    accuracy("tuned KV press, 10% cache, 8k, multikey needle", "snapkv:density=0.1,pool=31",
             "heldout/smollm2-8k-multikey-austen/results.jsonl")
    for density in ("0.1", "0.25"):  # a bare question, no template: the press stops at once more often than dense
        accuracy(f"KV press, {float(density):.0%} cache, 4k, niah, no template, no answer prefix",
                 f"snapkv:density={density},pool=31",
                 "heldout/smollm2-4k-niah-wording2-nochat-austen-fixed/results.jsonl")
    accuracy("tuned KV press, 10% cache, 4k, niah, no template, no answer prefix, fresh prompts (Canterbury)",
             "snapkv:density=0.1,pool=31", "heldout/smollm2-4k-niah-wording2-nochat-canterbury-vote/results.jsonl")
    for density in ("0.1", "0.25"):  # tuned on the bare form (docs/tuned/smollm2-4k-bare/): fresh Austen prompts
        accuracy(f"bare-form tune, {float(density):.0%} cache, 4k, niah, no template, no answer prefix",
                 f"snapkv:density={density},hold=false,pool=31,vote=max",
                 "tuned/smollm2-4k-bare/reporting/results.jsonl")
    for task in ("passkey", "niah"):
        for spec, when in (("flexprefill:density=0.1,exact_last=false", "before"),
                           ("flexprefill:density=0.1", "after")):
            accuracy(f"template-free fix, {when}: sparse prefill, 4k, {task}, no template",  # docs/template-free.md
                     spec, "heldout/smollm2-4k-nochat-austen-prefill/results.jsonl",
                     keep=lambda r, task=task: r["task"] == task)
    for task in ("passkey", "niah"):  # every block of the last queries ranked exactly (6451936; template-free.md)
        accuracy(f"template-free fix, question split by a block boundary, after: sparse prefill, 4k, {task}, "
                 "no template", "flexprefill:density=0.1", "heldout/smollm2-4k-nochat-austen-lastq/results.jsonl",
                 keep=lambda r, task=task: r["task"] == task)
    for task in ("passkey", "niah"):  # quest's share rule (docs/template-free.md#quest), both forms at d4c78a1
        for spec, when in (("quest:density=0.1,share=false", "before"), ("quest:density=0.1", "after")):
            accuracy(f"quest share rule, {when}: sparse attention, 4k, {task}, no template", spec,
                     "heldout/smollm2-4k-nochat-quest-share/results.jsonl", keep=lambda r, task=task: r["task"] == task)
    for task in ("passkey", "niah"):  # the bare-form choice on the template's prompt form (the 4k tune's prompts)
        accuracy(f"bare-form tune's press, 25% cache, 4k, chat template, {task}",
                 "snapkv:density=0.25,hold=false,pool=31,vote=max",
                 "heldout/smollm2-4k-chat-austen-bareform/results.jsonl", keep=lambda r, task=task: r["task"] == task)
        accuracy(f"bare-form tune's press, 25% cache, 4k, no template, answer prefix, {task}",
                 "snapkv:density=0.25,hold=false,pool=31,vote=max",
                 "heldout/smollm2-4k-nochat-austen-bareform/results.jsonl", keep=lambda r, task=task: r["task"] == task)
    for task in ("passkey", "niah"):  # a second corpus with the template
        accuracy(f"tuned KV press, 10% cache, 4k, Canterbury, {task}", "snapkv:density=0.1,pool=31",
                 "heldout/smollm2-4k-chat/results.jsonl", keep=lambda r, task=task: r["task"] == task)
    for task in ("passkey:needle=1", "niah"):  # Gemma-3-270M at 16k: nothing passed (docs/tuned/gemma3-16k/)
        for spec in ("snapkv:density=0.1,pool=31", "vslash:density=0.2"):
            accuracy(f"Gemma-3-270M, 16k, {task}", spec, "tuned/gemma3-16k/reporting/results.jsonl",
                     keep=lambda r, task=task: r["task"] == task)
    for task in ("passkey", "niah"):  # inside the trained length, tune --positions chose Self-Extend
        accuracy(f"tuned position method, 8k, {task}", "selfextend:group=2",
                 "tuned/smollm2-8k-positions/reporting/results.jsonl", keep=lambda r, task=task: r["task"] == task)
    for task in ("niah", "passkey"):  # Gemma-3-270M: passkey under the default needle does not measure retrieval
        accuracy(f"tuned KV press, Gemma-3-270M, 8k, {task}", "snapkv:density=0.1,pool=31",
                 "tuned/gemma3-8k/reporting/results.jsonl", keep=lambda r, task=task: r["task"] == task)
    accuracy("tuned KV press, Gemma-3-270M, 8k, passkey with Landmark Attention's needle",
             "snapkv:density=0.1,pool=31", "heldout/gemma3-8k-passkey-landmark-austen/results.jsonl")
    accuracy(
        "KV press, 25% cache, 4k + 8k",
        "snapkv:density=0.25,pool=31",
        "kv-presses/4k-wide-pool/results.jsonl",
        "kv-presses/8k/results.jsonl",
    )
    accuracy(
        "KV press, 25% cache: the 20 prompts not used to choose pool=31",
        "snapkv:density=0.25,pool=31",
        "kv-presses/4k-wide-pool/results.jsonl",
        "kv-presses/8k/results.jsonl",
        keep=lambda r: r["length"] == 8192 or r["seed"] >= 5,
    )
    accuracy("context extension, 16k + 32k", "selfextend", "extension/16k/results.jsonl", "extension/32k/results.jsonl")
    accuracy(
        "untuned sparse prefill, 8k, 10% budget (superseded by the tune's rows)",
        "flexprefill:density=0.1",
        "sparse-8k/results.jsonl",
        "sparse-8k/more/results.jsonl",
    )
    accuracy(
        "untuned runner-up sparse prefill, 8k, 10% budget",
        "vslash:density=0.1",
        "sparse-8k/results.jsonl",
        "sparse-8k/more/results.jsonl",
    )
    speed()


if __name__ == "__main__":
    main()
