"""The split-K decode kernel alone against SDPA (the fallback): one query row per head over L keys, SmolLM2's
heads (9 query, 3 KV, d = 64), over enough layers' caches (at least 120 MB) that they come from memory. Both paths
take turns for 5 rounds after a warm-up; the best round of each. Prints JSON.

    python docs/benchmarks/issue20/decode_kernel.py > decode-kernel.json
"""

import json
import time

import torch

from longreach.kernels import decode, dense
from longreach.provenance import provenance

torch.set_num_threads(2)
rows = []
for length in (512, 4096, 16384, 32768):
    layers = max(3, 120_000_000 // (length * 3 * 64 * 8))
    caches = [(torch.randn(1, 3, length, 64), torch.randn(1, 3, length, 64)) for _ in range(layers)]
    q = torch.randn(1, 9, 1, 64)
    paths = {"kernel": lambda: [decode.attend(q, k, v, 0.125) for k, v in caches],
             "sdpa": lambda: [dense.causal_attention(q, k, v, 0.125) for k, v in caches]}
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(6):  # the first round warms up
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    mb = 2 * 3 * length * 64 * 4 / 1e6
    row = {"keys": length, "layers": layers, "cache_mb_per_layer": mb}
    for name, seconds in best.items():
        row[f"{name}_ms_per_layer"] = seconds / layers * 1e3
        row[f"{name}_gb_s"] = mb / (seconds / layers) / 1e3
    row["speedup"] = best["sdpa"] / best["kernel"]
    rows.append(row)
print(json.dumps({"rows": rows, "provenance": provenance()}, indent=1))
