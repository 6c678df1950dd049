"""RoPE frequency rescaling, configured through transformers' own rope types (never re-implemented).

Each spec sets ``rope_parameters`` on a copy of the model's config and rebuilds the rotary modules
from it; ``factor`` is the target length over the trained length (``factor=2`` reads 16k with an
8k model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..configurable import param
from ..errors import SpecError
from ..methods.registry import register
from .base import RopeScaling


def _params(method: RopeScaling, old: dict, **extra: object) -> dict:
    """The model's theta (and partial rotary factor) + this rope type, its factor and its own keys."""
    kept = {k: old[k] for k in ("partial_rotary_factor",) if k in old}
    return {"rope_theta": old.get("rope_theta", 10000.0), **kept, "rope_type": method.rope_type,
            "factor": float(method.factor), **extra}  # type: ignore[attr-defined]


@dataclass(frozen=True)
class FactorScaling(RopeScaling):
    """A rope type that takes its factor alone (linear, dynamic)."""

    factor: float = param(2.0, "target length / trained length")

    def rope_parameters(self, old: dict, trained: int, head_dim: int) -> dict:
        return _params(self, old)


@register
@dataclass(frozen=True)
class Linear(FactorScaling):
    name: ClassVar[str] = "linear"
    rope_type: ClassVar[str] = "linear"
    summary: ClassVar[str] = "position interpolation: every position divided by factor (PI)"
    paper: ClassVar[str] = "Extending Context Window of Large Language Models via Positional Interpolation " \
                           "(arXiv:2306.15595)"


@register
@dataclass(frozen=True)
class Dynamic(FactorScaling):
    name: ClassVar[str] = "dynamic"
    rope_type: ClassVar[str] = "dynamic"
    summary: ClassVar[str] = "dynamic NTK: the RoPE base grows with the current length past the trained one"
    paper: ClassVar[str] = "Dynamically Scaled RoPE further increases performance of long context LLaMA " \
                           "(r/LocalLLaMA, 2023); used by Code Llama / Qwen"

    def reach(self, trained: int) -> int | None:
        return None  # the base grows with the current length, whatever it is


@register
@dataclass(frozen=True)
class Yarn(RopeScaling):
    name: ClassVar[str] = "yarn"
    rope_type: ClassVar[str] = "yarn"
    summary: ClassVar[str] = "YaRN: NTK-by-parts interpolation of low frequencies + attention temperature"
    paper: ClassVar[str] = "YaRN: Efficient Context Window Extension of Large Language Models (arXiv:2309.00071)"

    factor: float = param(2.0, "target length / trained length")
    beta_fast: float = param(32.0, "rotations within the trained length above which a dimension is kept")
    beta_slow: float = param(1.0, "rotations below which a dimension is fully interpolated")
    attention_factor: float | None = param(None, "softmax temperature factor (default 0.1 ln(factor) + 1)")

    def rope_parameters(self, old: dict, trained: int, head_dim: int) -> dict:
        extra = {} if self.attention_factor is None else {"attention_factor": float(self.attention_factor)}
        return _params(self, old, original_max_position_embeddings=trained, beta_fast=float(self.beta_fast),
                       beta_slow=float(self.beta_slow), **extra)


@register
@dataclass(frozen=True)
class Llama3(RopeScaling):
    name: ClassVar[str] = "llama3"
    rope_type: ClassVar[str] = "llama3"
    summary: ClassVar[str] = "Llama 3.1 rule: high frequencies kept, low ones divided by factor, smooth between"
    paper: ClassVar[str] = "The Llama 3 Herd of Models (arXiv:2407.21783)"

    factor: float = param(2.0, "target length / trained length")
    low_freq_factor: float = param(1.0, "wavelengths above trained/low_freq_factor are fully interpolated")
    high_freq_factor: float = param(4.0, "wavelengths below trained/high_freq_factor are kept")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise SpecError(f"{self.name}: need 0 < low_freq_factor < high_freq_factor, got "
                            f"{self.low_freq_factor} and {self.high_freq_factor}")

    def rope_parameters(self, old: dict, trained: int, head_dim: int) -> dict:
        return _params(self, old, original_max_position_embeddings=trained,
                       low_freq_factor=float(self.low_freq_factor), high_freq_factor=float(self.high_freq_factor))


@register
@dataclass(frozen=True)
class LongRope(RopeScaling):
    """LongRoPE's per-dimension factors are found by an evolutionary search on the model; without one,
    the long factors here are that search's starting point (NTK-by-parts: high-frequency dimensions
    kept, low ones divided by ``factor``, a linear ramp between); the short factors keep inputs within
    the trained length exact."""

    name: ClassVar[str] = "longrope"
    rope_type: ClassVar[str] = "longrope"
    summary: ClassVar[str] = "LongRoPE: non-uniform per-dimension factors past the trained length"
    paper: ClassVar[str] = "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens (arXiv:2402.13753)"

    factor: float = param(2.0, "target length / trained length")
    beta_fast: float = param(32.0, "rotations within the trained length above which a dimension is kept")
    beta_slow: float = param(1.0, "rotations below which a dimension is divided by factor")

    def max_positions(self, trained: int) -> int:
        return math.ceil(trained * self.factor)

    def long_factors(self, old: dict, trained: int, head_dim: int) -> list[float]:
        dim = int(head_dim * old.get("partial_rotary_factor", 1.0))
        theta = float(old.get("rope_theta", 10000.0))
        out = []
        for i in range(0, dim, 2):
            rotations = trained / (2 * math.pi * theta ** (i / dim))  # full turns over the trained length
            ramp = (rotations - self.beta_slow) / max(self.beta_fast - self.beta_slow, 1e-9)
            keep = min(max(ramp, 0.0), 1.0)  # 1: many turns (local detail), keep; 0: interpolate
            out.append(keep + (1 - keep) * float(self.factor))
        return out

    def rope_parameters(self, old: dict, trained: int, head_dim: int) -> dict:
        long = self.long_factors(old, trained, head_dim)
        return _params(self, old, original_max_position_embeddings=trained, short_factor=[1.0] * len(long),
                       long_factor=long)
