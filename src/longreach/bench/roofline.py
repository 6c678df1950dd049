"""This machine's ceilings, measured in the same run as the benchmark they normalise.

A kernel's speed means little without the hardware's: ``matmul_peak`` is the best fp32 GEMM rate
torch reaches here (a large square matmul, best of a few), ``memory_bandwidth`` the best streaming
read rate (a sum over a buffer far larger than the caches). Attention prefill is compared with the
first (FLOP/s on the keys actually attended), decode with the second (K/V bytes actually read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..diagnostics import best_of


@dataclass(frozen=True)
class Roofline:
    flops: float  # FLOP/s
    bytes_per_s: float

    def as_dict(self) -> dict[str, float]:
        return {"matmul_gflops": self.flops / 1e9, "read_gb_per_s": self.bytes_per_s / 1e9}


def matmul_peak(n: int = 2048, repeat: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(lambda: a @ b, repeat, warm_up=True)[1]


def memory_bandwidth(mib: int = 512, repeat: int = 3) -> float:
    x = torch.ones(mib * 2**20 // 4)
    return x.numel() * 4 / best_of(lambda: x.sum(), repeat, warm_up=True)[1]


def measure(repeat: int = 3) -> Roofline:
    return Roofline(matmul_peak(repeat=repeat), memory_bandwidth(repeat=repeat))
