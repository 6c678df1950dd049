"""Hand freed heap memory back to the system between the layers of a prefill (glibc only).

After a large block is freed, glibc raises its mmap threshold (up to 32 MiB), so the next tensors of a few MiB
come from its heap; a long-lived one allocated among them (this layer's KV cache) pins the heap, and what the
previous layer freed below it stays resident. ``malloc_trim(0)`` gives those free pages back (inside the heap
too, since glibc 2.8) without changing how anything is allocated. SmolLM2 at 16k, fresh processes, medians of
two or three on an AMD EPYC: moba 10% peaked at 2534 MiB untrimmed and 2213 MiB trimmed, dense at 2228 and
2154 MiB, transformers' own run at 2229-2537 MiB; the price is ~3% of prefill time (docs/benchmarks.md).

The runtime trims twice per layer of a prefill: before the layer (what the previous one freed) and between the
selector and the kernel (the q/k/v projections' and the selector's scratch, which would otherwise sit under
the attention output): on a 4-layer SmolLM2-shaped model at 16k the second trim lowered the peak from 1105.5
to 1063.5 MiB for dense and from 1113.1 to 1067.0 MiB for moba 10% (docs/benchmarks/issue20/peak-probe.txt).

Only forwards that attend at least ``MIN_KEYS`` keys trim. A trim's price is mostly refaulting the pages the next
layer allocates again, about a second per SmolLM2 prefill here (1.35 s at 4k, 0.97 s at 8k, ~3% of a 16k prefill),
so it is a large share of a short prefill and a small one of a long prefill, where the peak matters. SmolLM2,
`bench e2e`, 2 fresh processes each, same AMD EPYC (docs/benchmarks.md, "Heap trims by length"): at 4k trimming
cost +16% time to first token (9.93 vs 8.58 s) for −16% peak RSS (1270 vs 1504 MiB); at 8k +4% (25.42 vs
24.45 s) for −10% (1552 vs 1733 MiB).

``LONGREACH_TRIM=0`` switches it off (to measure what it buys).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import cache


@cache
def _malloc_trim():
    if os.environ.get("LONGREACH_TRIM", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc's; musl and macOS have none
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


MIN_KEYS = 8192


def release_free_memory(keys: int) -> bool:
    """Return the heap's free pages to the system before or inside a forward attending ``keys`` keys; False where it
    is not worth it (fewer than ``MIN_KEYS``) or the C library cannot (nothing happens)."""
    trim = _malloc_trim()
    if trim is None or keys < MIN_KEYS:
        return False
    trim(0)
    return True
