"""This machine's ceilings, measured in the same run as the benchmark they normalise.

A kernel's speed means little without the hardware's: ``matmul_peak`` is the best fp32 GEMM rate
torch reaches here (a large square matmul, best of a few), ``memory_bandwidth`` the best streaming
read rate (a sum over a buffer far larger than the caches). Attention prefill is compared with the
first (FLOP/s on the keys actually attended), decode with the second (K/V bytes actually read).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Roofline:
    flops: float  # FLOP/s
    bytes_per_s: float

    def as_dict(self) -> dict[str, float]:
        return {"matmul_gflops": self.flops / 1e9, "read_gb_per_s": self.bytes_per_s / 1e9}


def _best(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(n: int = 2048, repeat: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / _best(lambda: a @ b, repeat)


def memory_bandwidth(mib: int = 512, repeat: int = 3) -> float:
    x = torch.ones(mib * 2**20 // 4)
    return x.numel() * 4 / _best(lambda: x.sum(), repeat)


def measure(repeat: int = 3) -> Roofline:
    return Roofline(matmul_peak(repeat=repeat), memory_bandwidth(repeat=repeat))
