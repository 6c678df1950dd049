"""Markdown tables for docs/benchmarks.md from the benchmarks' JSON output.

    python3 docs/benchmarks/summarise.py docs/benchmarks/attention-*.json docs/benchmarks/e2e-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def attention(data: dict) -> str:
    roof = data["roofline"]
    out = [f"{data['hardware']}; measured in the same run: matmul peak {roof['matmul_gflops']:.0f} GFLOP/s, "
           f"read bandwidth {roof['read_gb_per_s']:.1f} GB/s", "",
           "| phase | T | method | density | dense SDPA s | select s | attend s | speedup | select share "
           "| roofline | dense roofline |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        share = r["select_s"] / (r["select_s"] + r["attend_s"])
        out.append(f"| {r['phase']} | {r['length'] // 1024}k | `{r['spec']}` | {r['density']:.3f} | {r['dense_s']:.4f} "
                   f"| {r['select_s']:.4f} | {r['attend_s']:.4f} | **{r['speedup']:.2f}x** | {share:.0%} "
                   f"| {r['roofline_fraction']:.1%} | {r['dense_roofline_fraction']:.1%} |")
    return "\n".join(out)


def e2e(data: dict) -> str:
    out = [f"{data['hardware']}; model {data['model']}", "",
           "| T | method | TTFT s | decode tok/s | TTFT vs transformers | decode vs transformers | peak RSS MiB | KV MiB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ratio = lambda x: f"**{x:.2f}x**" if x else "–"  # noqa: E731
        kv = f"{r['kv_bytes'] / 2**20:.1f}" if r.get("kv_bytes") is not None else "–"
        out.append(f"| {r['length'] // 1024}k | `{r['method']}` | {r['ttft_s']:.2f} | {r['decode_tok_s']:.2f} "
                   f"| {ratio(r['ttft_speedup'])} | {ratio(r['decode_speedup'])} | {r['peak_rss_mb']:.0f} | {kv} |")
    return "\n".join(out)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        data = json.loads(Path(name).read_text())
        print(f"### {Path(name).stem}\n")
        print(attention(data) if "roofline" in data else e2e(data))
        print()
