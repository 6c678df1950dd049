"""Accuracy vs measured KV bytes per (length, method) from eval results.jsonl files (rows deduplicated).

The ratio compares bytes right after the prompt (every method then holds the prompt's tokens); at the end,
transformers-free growing caches (dense, since the decode-speed work) also hold their reserved headroom."""
import json, sys
from collections import defaultdict
seen, d = set(), defaultdict(list)
for f in sys.argv[1:]:
    for l in open(f):
        r = json.loads(l)
        key = (r["length"], r["method"], r["task"], r["seed"])
        if key in seen: continue
        seen.add(key); d[(r["length"], r["method"])].append(r)
held = lambda r: r.get("kv_bytes_prompt") or r["kv_bytes"]
dense = {L: sum(held(r) for r in rs) / len(rs) for (L, m), rs in d.items() if m == "dense"}
print("| length | method | passkey | niah | both | KV MiB after prompt | KV MiB at end | dense / method (after prompt) | peak RSS MiB | prefill s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (L, m), rs in sorted(d.items(), key=lambda x: (x[0][0], x[0][1] != "dense")):
    pk = [r["score"] for r in rs if r["task"] == "passkey"]; nh = [r["score"] for r in rs if r["task"].startswith("niah")]
    kv = sum(r["kv_bytes"] for r in rs) / len(rs)
    kp = [r["kv_bytes_prompt"] for r in rs if r.get("kv_bytes_prompt")]
    f = lambda xs: f"{int(sum(xs))}/{len(xs)}" if xs else "–"
    name = m.replace("profile=docs/heads/smollm2-135m.json,", "").replace(":profile=docs/heads/smollm2-135m.json", "")
    print(f"| {L//1024}k | `{name}` | {f(pk)} | {f(nh)} | {f(pk+nh)} | {sum(kp)/len(kp)/2**20:.1f} |" if kp else f"| {L//1024}k | `{name}` | {f(pk)} | {f(nh)} | {f(pk+nh)} | – |", end="")
    print(f" {kv/2**20:.1f} | {dense.get(L, kv)/(sum(held(r) for r in rs)/len(rs)):.2f}x | {sum(r['peak_rss_mb'] for r in rs)/len(rs):.0f} | {sum(r['prefill_s'] for r in rs)/len(rs):.1f} |")
