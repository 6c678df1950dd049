"""Operator benchmark: a method's selection + kernel vs dense causal SDPA, measured in the same run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import median

import torch
import torch.nn.functional as F

from .. import kernels, parse_spec
from ..diagnostics import best_of
from ..methods import SelectContext
from ..methods.summaries import BlockSummaries
from ..plotting import pyplot
from ..provenance import describe, provenance
from ._plot import speedup_axis
from .roofline import Roofline


@dataclass
class Row:
    length: int
    spec: str
    kernel: str
    dense_s: float
    select_s: float
    attend_s: float
    density: float
    phase: str = "prefill"
    heads: str = "9/3/64"  # query heads / kv heads / head dim
    flops: float = 0.0  # attended query-key pairs x 4 x head dim (QK^T and PV)
    kv_bytes: float = 0.0  # K and V bytes the selected keys occupy (what decode must read)
    dense_flops: float = 0.0
    dense_bytes: float = 0.0
    speedups: tuple[float, ...] = ()  # dense / (select + attend) of each repeat, measured back to back

    @property
    def speedup(self) -> float:
        """The ratio of the medians (dense_s, select_s and attend_s are medians over the repeats)."""
        return self.dense_s / (self.select_s + self.attend_s)

    def roofline(self, peak: Roofline) -> float:
        """Attention kernel rate on the attended keys over the machine's ceiling: FLOP/s vs the matmul peak
        (prefill), bytes/s vs the read bandwidth (decode)."""
        if self.phase == "decode":
            return self.kv_bytes / self.attend_s / peak.bytes_per_s
        return self.flops / self.attend_s / peak.flops

    def dense_roofline(self, peak: Roofline) -> float:
        if self.phase == "decode":
            return self.dense_bytes / self.dense_s / peak.bytes_per_s
        return self.dense_flops / self.dense_s / peak.flops


def hardware() -> str:
    """CPU, ISA, threads, versions and commit: every table title and JSON names its machine."""
    return describe(provenance())


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's causal SDPA with GQA; the baseline every ratio is measured against."""
    causal = q.shape[2] == k.shape[2]  # a decode query sees every key
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _context(method, k: torch.Tensor, phase: str) -> SelectContext:
    """Decode selects with the block summaries the cache keeps incrementally (built here once, as prefill does)."""
    stats = getattr(method, "block_stats", ())
    if phase != "decode" or not stats:
        return SelectContext()
    summaries = BlockSummaries(getattr(method, "block_k", method.block), stats)
    summaries.update(k, new_sequence=True)
    return SelectContext(summaries=summaries)


def run(lengths: list[int], specs: list[str], kernel: str = "gather", q_heads: int = 9, kv_heads: int = 3,
        dim: int = 64, repeat: int = 3, phases: tuple[str, ...] = ("prefill",)) -> list[Row]:
    """Each repeat times dense SDPA and then every spec's select and attend, back to back, so every ratio
    compares timings taken moments apart; rows hold the medians and each repeat's ratio (after a warm-up)."""
    rows = []
    heads = f"{q_heads}/{kv_heads}/{dim}"
    for length in lengths:
        k = torch.randn(1, kv_heads, length, dim)
        v = torch.randn(1, kv_heads, length, dim)
        for phase in phases:
            q = torch.randn(1, q_heads, length if phase == "prefill" else 1, dim)
            causal_pairs = q_heads * (length * (length + 1) / 2 if phase == "prefill" else length)
            dense_flops, dense_bytes = 4 * dim * causal_pairs, 2 * kv_heads * length * dim * 4
            methods = {spec: parse_spec(spec).selector for spec in specs}
            ctxs = {spec: _context(m, k, phase) for spec, m in methods.items()}
            sels = {spec: m.select(q, k, ctxs[spec]) for spec, m in methods.items()}  # (also the selectors' warm-up)
            dense_fn = lambda q=q, k=k, v=v: dense_sdpa(q, k, v)  # noqa: E731
            best_of(dense_fn, warm_up=True)
            for sel in sels.values():
                kernels.attend(q, k, v, sel, dim**-0.5, kernel)  # warm-up apart (and the gather path choice)
            dense_t, select_t, attend_t = [], {s: [] for s in specs}, {s: [] for s in specs}
            for _ in range(repeat):
                dense_t.append(best_of(dense_fn)[1])
                for spec, m in methods.items():
                    select_t[spec].append(best_of(lambda m=m, ctx=ctxs[spec], q=q, k=k: m.select(q, k, ctx))[1])
                    attend_t[spec].append(best_of(
                        lambda sel=sels[spec], q=q, k=k, v=v: kernels.attend(q, k, v, sel, dim**-0.5, kernel))[1])
            for spec in specs:
                density = sels[spec].density()
                ratios = tuple(d / (a + b) for d, a, b in zip(dense_t, select_t[spec], attend_t[spec], strict=True))
                rows.append(Row(length, spec, kernel, median(dense_t), median(select_t[spec]), median(attend_t[spec]),
                                density, phase, heads, dense_flops * density, dense_bytes * density, dense_flops,
                                dense_bytes, ratios))
    return rows


@dataclass
class UserPathRow:
    """One layer's attention as a user runs it (``apply`` + a model forward, density tracking on, the
    default) against the operator (select + attend) on the very q/k/v that layer received."""

    length: int
    spec: str
    heads: str
    runtime_s: float  # inside longreach's attention function: masks, stages, selection, kernel, accounting
    operator_s: float  # the selector's select + kernels.attend alone, same tensors, same process

    @property
    def overhead(self) -> float:
        return self.runtime_s / self.operator_s - 1


def user_path(lengths: list[int], specs: list[str], q_heads: int = 9, kv_heads: int = 3, dim: int = 64,
              repeat: int = 2) -> list[UserPathRow]:
    """A 1-layer Llama with these heads (random weights), one prefill forward per length and spec."""
    from .. import apply
    from ..hf import _RUNTIMES
    from ..models import random_model

    model = random_model(q_heads, kv_heads, dim, max_positions=max(lengths) + 1)
    rows = []
    for length in lengths:
        ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
        for spec in specs:
            with torch.no_grad(), apply(model, spec) as handle:
                (runtime,) = [r for r in _RUNTIMES.values() if r.handle is handle]
                inner, seen = runtime.forward, {}

                def timed(q, k, v, mask, scale, window, inner=inner, seen=seen):
                    out, seconds = best_of(lambda: inner(q, k, v, mask, scale, window))
                    seen.update(q=q, k=k, v=v, scale=scale, s=min(seen.get("s", float("inf")), seconds))
                    return out

                runtime.forward = timed
                model(ids[:, :256], use_cache=True)  # warm-up apart (and the kernel choice for this shape)
                seen.clear()
                for _ in range(repeat):
                    model(ids, use_cache=True, logits_to_keep=1)
                q, k, v, scale = seen["q"], seen["k"], seen["v"], seen["scale"]
                method = handle.spec.selector

                def operator(method=method, q=q, k=k, v=v, scale=scale):
                    sel = method.select(q, k, SelectContext(0, None, None, {}, scale))
                    return kernels.attend(q, k, v, sel, scale)

                _, operator_s = best_of(operator, repeat, warm_up=True)
            rows.append(UserPathRow(length, spec, f"{q_heads}/{kv_heads}/{dim}", seen["s"], operator_s))
    return rows


def plot(rows: list[Row], path: Path) -> bool:
    """Speedup vs T per method (one panel per phase and head shape); False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    panels = list(dict.fromkeys((r.phase, r.heads) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (phase, heads) in zip(axes[0], panels, strict=True):
        sub = [r for r in rows if (r.phase, r.heads) == (phase, heads)]
        for spec in dict.fromkeys(r.spec for r in sub):
            pts = sorted((r.length, r.speedup) for r in sub if r.spec == spec)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=spec)
        speedup_axis(ax, "speedup vs dense SDPA")
        ax.set_xlabel("T (tokens)")
        ax.set_title(f"{phase}, heads {heads}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
        seconds.append(best_of(lambda q=q, k=k: method.select(q, k, SelectContext()), repeat, warm_up=True)[1])
    return fit_t_log_t(lengths, seconds)


def kernel_choices() -> dict[str, dict]:
    """The gather path this machine measured faster per head shape and phase (``kernels.choice``)."""
    from ..kernels import choice

    return choice.chosen()
