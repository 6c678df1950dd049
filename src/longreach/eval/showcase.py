"""What ``longreach demo`` shows a newcomer: dense beside a fast sparse prefill and the tuned KV press at 8k, with
the accuracy, speed and cache memory measured on this machine.

The press is the one ``longreach tune`` chose for SmolLM2 at 8k (docs/tuned/smollm2-8k.json: within the rule on 50
held-back prompts per task, at a 10x smaller cache). No sparse prefill passed that tune: flexprefill at 10%, the
fastest candidate, answered 35 of 50 held-back needles in prose against dense's 38. It is shown for the speed a
sparse prefill buys, and the demo says it did not pass. A demo's few prompts show what each method does; they are
not evidence of parity (docs/tuned.md holds the intervals).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import parse_spec

DEMO_METHODS = ("dense", "flexprefill:density=0.1", "snapkv:density=0.1,pool=31")
DEMO_NOTE = ("snapkv:density=0.1,pool=31 is the press `longreach tune` chose for SmolLM2 at 8k; no sparse prefill "
             "passed that tune (flexprefill at 10%: needle in prose 35/50 against dense's 38/50, -6 points, 95% CI "
             "[-17, +5]): docs/tuned.md")
DEMO_LENGTH = "8k"


def role(method: str) -> str:
    spec = parse_spec(method)
    if spec.of_kind("press"):
        return "KV press: smaller cache"
    if spec.of_kind("position"):
        return "context extension"
    return "baseline" if method == "dense" else "sparse prefill: faster"


@dataclass(frozen=True)
class Line:
    method: str
    role: str
    correct: int
    n: int
    prefill_s: float
    speed: float | None  # dense prefill time / this method's, same run
    decode_tok_s: float | None
    kv_mib: float | None  # KV cache right after the prompt (after any press)
    cache_ratio: float | None  # dense's cache / this method's


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(rows: list[dict]) -> list[Line]:
    """One line per method, in the order the methods first appear."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    prefill = {m: _mean([r["prefill_s"] for r in rows if r["method"] == m]) for m in methods}
    kv = {m: _mean([r["kv_bytes_prompt"] for r in rows if r["method"] == m and r.get("kv_bytes_prompt")])
          for m in methods}
    lines = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        tokens = sum(r.get("decode_tokens", 0) for r in mine)
        decode_s = sum(r.get("decode_s", 0.0) for r in mine)
        base_t, base_kv = prefill.get("dense"), kv.get("dense")
        lines.append(Line(m, role(m), sum(r["score"] == 1.0 for r in mine), len(mine), prefill[m] or 0.0,
                          base_t / prefill[m] if base_t and prefill[m] else None,
                          tokens / decode_s if decode_s > 0 else None,
                          kv[m] / 2**20 if kv[m] else None,
                          base_kv / kv[m] if base_kv and kv[m] else None))
    return lines
