"""Density accounting: the fraction of causal query-key pairs a handle's method really attended.

It runs at every attention call of a tracked handle, so it must cost next to nothing: causal pairs are a
closed form, and the kept pairs of selections that share one geometry (the layers of a decode step all do)
are counted together in one ``visible_total`` over their stacked block indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..selection import Selection

FOLD_EVERY = 64  # selections stacked per count: a decode step's layers, bounded so memory stays flat


def causal_pairs(sel: Selection) -> int:
    """Causal (non-padding) query-key pairs of ``sel`` over batch and heads (``causal_counts().sum() * heads``)."""
    if sel.key_mask is not None:
        return int(sel.causal_counts().sum()) * sel.heads
    q, off = sel.q_len, sel.q_offset  # queries at positions off .. off + q - 1 see pos + 1 keys each
    return (q * off + q * (q + 1) // 2) * sel.batch * sel.heads


@dataclass
class DensityStats:
    """Query-key pairs kept vs. causal pairs, summed over heads and the layers the method controls
    (a model's own sliding-window layers keep their window and are not counted), per phase."""

    kept: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    causal: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})
    # selections not counted yet: one geometry (phase, template) and the block indices of each
    _pending: list[torch.Tensor] = field(default_factory=list)
    _template: tuple[str, Selection, float] | None = None

    def add(self, phase: str, sel: Selection, query_heads: int | None = None) -> None:
        """Count ``sel``; with ``query_heads``, per query head, so that a layer weighs the same whether its
        Selection has a row per KV head, per query head or one for all (a dense layer beside sparse ones)."""
        weight = query_heads / sel.heads if query_heads else 1.0
        total = causal_pairs(sel) * weight
        self.causal[phase] += total
        if sel.full:
            self.kept[phase] += total
        elif sel.key_mask is not None:
            self.kept[phase] += float(sel.visible_total()) * weight
        else:
            if self._template is not None and not _same_geometry(self._template, phase, sel, weight):
                self._fold()
            self._template = (phase, sel, weight)
            self._pending.append(sel.indices)
            if len(self._pending) >= FOLD_EVERY:
                self._fold()

    def _fold(self) -> None:
        """Count the pending selections at once: stacked on the batch axis they are one Selection."""
        if self._template is None:
            return
        phase, sel, weight = self._template
        stacked = replace(sel, indices=torch.cat(self._pending, dim=0))
        self.kept[phase] += float(stacked.visible_total()) * weight
        self._pending, self._template = [], None

    def add_heads(self, phase: str, sel: Selection, n_heads: int, seen: int) -> None:
        """Count ``sel`` for ``n_heads`` query heads (head policies attend groups of heads apart); causal pairs
        are counted over the ``seen`` tokens, not just the keys still held."""
        kept = float(causal_pairs(sel)) / sel.heads if sel.full else float(sel.visible_total()) / sel.heads
        q = sel.q_len  # queries at positions seen - q .. seen - 1: q * (seen - q) + (1 + ... + q) causal pairs
        causal = float(q * (seen - q) + q * (q + 1) // 2)
        self.kept[phase] += kept * n_heads
        self.causal[phase] += causal * n_heads

    def density(self, phase: str | None = None) -> float | None:
        self._fold()
        phases = [phase] if phase else list(self.kept)
        causal = sum(self.causal[p] for p in phases)
        return None if causal == 0 else sum(self.kept[p] for p in phases) / causal


def _same_geometry(template: tuple[str, Selection, float], phase: str, sel: Selection, weight: float) -> bool:
    """Whether ``sel`` stacks with the pending ones: every field but the indices' batch axis must agree."""
    t_phase, t, t_weight = template
    return (t_phase == phase and t_weight == weight and t.indices.shape[1:] == sel.indices.shape[1:]
            and (t.q_len, t.kv_len, t.block_q, t.block_k, t.sinks, t.window)
            == (sel.q_len, sel.kv_len, sel.block_q, sel.block_k, sel.sinks, sel.window)
            and t.indices.device == sel.indices.device)
