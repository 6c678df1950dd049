"""Operator benchmark: a method's selection + kernel vs dense causal SDPA, measured in the same run."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels, parse_spec
from ..methods import SelectContext


@dataclass
class Row:
    length: int
    spec: str
    kernel: str
    dense_s: float
    select_s: float
    attend_s: float
    density: float

    @property
    def speedup(self) -> float:
        return self.dense_s / (self.select_s + self.attend_s)


def hardware() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _best(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up apart
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's causal SDPA with GQA; the baseline every ratio is measured against."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def run(lengths: list[int], specs: list[str], kernel: str = "gather", q_heads: int = 9, kv_heads: int = 3,
        dim: int = 64, repeat: int = 2) -> list[Row]:
    rows = []
    for length in lengths:
        q = torch.randn(1, q_heads, length, dim)
        k = torch.randn(1, kv_heads, length, dim)
        v = torch.randn(1, kv_heads, length, dim)
        dense_s = _best(lambda q=q, k=k, v=v: dense_sdpa(q, k, v), repeat)
        for spec in specs:
            method = parse_spec(spec).selector
            sel = method.select(q, k, SelectContext())
            select_s = _best(lambda m=method, q=q, k=k: m.select(q, k, SelectContext()), repeat)
            attend_s = _best(lambda sel=sel, q=q, k=k, v=v: kernels.attend(q, k, v, sel, dim**-0.5, kernel), repeat)
            rows.append(Row(length, spec, kernel, dense_s, select_s, attend_s, sel.density()))
    return rows


@dataclass
class ScalingFit:
    """Selection time vs length: the log-log slope and how well c * T * log2(T) explains the times."""

    lengths: list[int]
    seconds: list[float]
    slope: float  # d log(time) / d log(T): 1 = linear, 2 = quadratic
    c: float  # least-squares constant of time = c * T * log2(T)
    max_rel_residual: float  # worst |fit - measured| / measured of that model


def fit_t_log_t(lengths: list[int], seconds: list[float]) -> ScalingFit:
    t = torch.tensor(lengths, dtype=torch.float64)
    s = torch.tensor(seconds, dtype=torch.float64)
    x = t * torch.log2(t)
    c = float((x * s).sum() / (x * x).sum())
    slope = float(torch.linalg.lstsq(torch.stack([t.log(), torch.ones_like(t)], 1), s.log()[:, None]).solution[0])
    rel = ((c * x - s).abs() / s).max().item()
    return ScalingFit(lengths, seconds, slope, c, rel)


def selection_scaling(spec: str, lengths: list[int], q_heads: int = 9, kv_heads: int = 3, dim: int = 64,
                      repeat: int = 2) -> ScalingFit:
    """Time ``select`` alone (prefill, random q/k) at each length and fit c * T log T."""
    method = parse_spec(spec).selector
    seconds = []
    for length in lengths:
        q = torch.randn(1, q_heads, length, dim)
        k = torch.randn(1, kv_heads, length, dim)
        seconds.append(_best(lambda q=q, k=k: method.select(q, k, SelectContext()), repeat))
    return fit_t_log_t(lengths, seconds)
