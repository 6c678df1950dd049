"""Passkey accuracy and perplexity per (length, method) from eval results.jsonl files (rows deduplicated;
perplexity per text: texts differ too much in difficulty to average)."""
import json
import sys
from collections import defaultdict

seen, cells = set(), defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        key = (r["length"], r["method"], r["task"], r["seed"], r.get("chunk"))
        if key not in seen:
            seen.add(key)
            cells[(r["length"], r["method"], r.get("chunk"))].append(r)
print("| length | method | prefill chunk | passkey | perplexity, text 1 / 2 | loss over the last 2k tokens | passkey prefill s (mean) "
      "| peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|")
order = lambda c: (c[0][0], c[0][1] != "dense", c[0][1])  # noqa: E731
for (length, method, chunk), rows in sorted(cells.items(), key=order):
    pk = [r["score"] for r in rows if r["task"] == "passkey"]
    ppl = [r["ppl"] for r in rows if r["metric"] == "ppl"]
    acc = f"{int(sum(pk))}/{len(pk)}" if pk else "–"
    texts = sorted((r for r in rows if r["metric"] == "ppl"), key=lambda r: r["seed"])  # per text, not averaged
    per = " / ".join(f"{r['ppl']:.2f}" for r in texts) or "–"
    last = " / ".join(f"{r['loss_buckets'][-1][2]:.2f}" for r in texts if r.get("loss_buckets")) or "–"
    timed = [r["prefill_s"] for r in rows if r["task"] == "passkey"]
    pre = f"{sum(timed) / len(timed):.0f}" if timed else "–"
    rss = sum(r["peak_rss_mb"] for r in rows) / len(rows)
    print(f"| {length // 1024}k | `{method}` | {chunk or '–'} | {acc} | {per} | {last} | {pre} | {rss:.0f} |")
