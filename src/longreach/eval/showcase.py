"""What ``longreach demo`` shows a newcomer: dense beside the most accurate fast prefill method and the best
KV press, at a length where each wins, with the accuracy, speed and cache memory measured on this machine.

The specs come from the measured docs (docs/sparse-8k.md: flexprefill kept dense's accuracy at 8k, 10%
density; docs/kv-presses.md: snapkv with pool=31 kept it at a 4x smaller cache). A demo's few prompts show
what each method does; they are not evidence of parity (the docs hold the intervals).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import parse_spec

DEMO_METHODS = ("dense", "flexprefill:density=0.1", "snapkv:density=0.25,pool=31")
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
