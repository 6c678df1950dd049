"""Density accounting: the fraction of causal query-key pairs a handle's method really attended."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..selection import Selection


@dataclass
class DensityStats:
    """Query-key pairs kept vs. causal pairs, summed over heads and the layers the method controls
    (a model's own sliding-window layers keep their window and are not counted), per phase."""

    kept: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    causal: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})

    def add(self, phase: str, sel: Selection) -> None:
        total = float(sel.causal_counts().sum().item()) * sel.heads
        kept = total if sel.full else float(sel.visible_total())
        self.kept[phase] += kept
        self.causal[phase] += total

    def add_heads(self, phase: str, sel: Selection, n_heads: int, seen: int) -> None:
        """Count ``sel`` for ``n_heads`` query heads (head policies attend groups of heads apart); causal pairs
        are counted over the ``seen`` tokens, not just the keys still held."""
        kept = float(sel.causal_counts().sum().item()) if sel.full else float(sel.visible_total()) / sel.heads
        q = sel.q_len  # queries at positions seen - q .. seen - 1: q * (seen - q) + (1 + ... + q) causal pairs
        causal = float(q * (seen - q) + q * (q + 1) // 2)
        self.kept[phase] += kept * n_heads
        self.causal[phase] += causal * n_heads

    def density(self, phase: str | None = None) -> float | None:
        phases = [phase] if phase else list(self.kept)
        causal = sum(self.causal[p] for p in phases)
        return None if causal == 0 else sum(self.kept[p] for p in phases) / causal
