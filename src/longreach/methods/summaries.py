"""Per-block key statistics, kept incrementally so a decode step never re-reads all T keys.

Prefill summarises every complete block once (O(T*D)); each decode step only summarises a block
when it completes, plus the short partial tail block on the fly.
"""

from __future__ import annotations

import torch
from torch import Tensor

STATS = ("min", "max", "mean", "pooled")


def block_stats(keys: Tensor, block: int, stats: tuple[str, ...]) -> dict[str, Tensor]:
    """Statistics of consecutive key blocks: keys (B, H, T, D) -> each (B, H, ceil(T/block), D).

    The last block may be partial; its statistics cover only the keys it has.
    """
    batch, heads, length, dim = keys.shape
    n_full = length // block
    parts: dict[str, list[Tensor]] = {s: [] for s in stats}
    if n_full:
        full = keys[:, :, : n_full * block].reshape(batch, heads, n_full, block, dim)
        _append(parts, full, stats)
    if length % block:
        tail = keys[:, :, n_full * block :].unsqueeze(2)  # (B, H, 1, rest, D)
        _append(parts, tail, stats)
    return {s: torch.cat(parts[s], dim=2) for s in stats}


def _append(parts: dict[str, list[Tensor]], blocks: Tensor, stats: tuple[str, ...]) -> None:
    for s in stats:
        if s == "min":
            parts[s].append(blocks.amin(dim=3))
        elif s == "max":
            parts[s].append(blocks.amax(dim=3))
        elif s == "mean":
            parts[s].append(blocks.mean(dim=3))
        elif s == "pooled":  # the block's keys averaged with attention weights of their own mean (LongHeads)
            weights = (blocks @ blocks.mean(dim=3).unsqueeze(-1) * blocks.shape[-1] ** -0.5).softmax(dim=3)
            parts[s].append((weights * blocks).sum(dim=3))
        else:
            raise ValueError(f"unknown block statistic '{s}'; known: {', '.join(STATS)}")


class BlockSummaries:
    """Running statistics of complete key blocks of one layer's cache."""

    def __init__(self, block: int, stats: tuple[str, ...]) -> None:
        self.block = block
        self.stats = tuple(stats)
        self.blocks_done = 0
        self._store: dict[str, Tensor] = {}
        self._fingerprint: Tensor | None = None
        self.rebuilds = 0  # how many times the whole cache had to be re-summarised (tests watch this)

    def reset(self) -> None:
        self.blocks_done = 0
        self._store = {}
        self._fingerprint = None

    def _matches(self, keys: Tensor) -> bool:
        fp = self._fingerprint
        if fp is None:
            return False
        if keys.shape[2] < self.blocks_done * self.block or fp.shape != keys[:, :, 0].shape:
            return False
        return bool(torch.equal(fp, keys[:, :, 0]))

    def update(self, keys: Tensor, new_sequence: bool = False) -> None:
        """Summarise blocks that completed since the last call. keys: the whole cache (B, H, T, D)."""
        if new_sequence or not self._matches(keys):
            if self.blocks_done:
                self.rebuilds += 1
            self.reset()
            self._fingerprint = keys[:, :, 0].clone()
        n_full = keys.shape[2] // self.block
        if n_full <= self.blocks_done:
            return
        new = keys[:, :, self.blocks_done * self.block : n_full * self.block]
        fresh = block_stats(new, self.block, self.stats)
        for s in self.stats:
            self._write(s, self.blocks_done, fresh[s])
        self.blocks_done = n_full

    def _write(self, stat: str, at: int, values: Tensor) -> None:
        """Put ``values`` (B, H, n, D) at block ``at`` of the stored statistic, growing its buffer by half when
        full; one slot past the complete blocks stays free for the partial tail (``get``)."""
        buf = self._store.get(stat)
        need = at + values.shape[2] + 1
        if buf is None or buf.shape[2] < need:
            grown = values.new_empty(*values.shape[:2], need + need // 2, values.shape[3])
            if buf is not None:
                grown[:, :, :at] = buf[:, :, :at]
            self._store[stat] = buf = grown
        buf[:, :, at : at + values.shape[2]] = values

    def get(self, keys: Tensor) -> dict[str, Tensor]:
        """Statistics of every block of ``keys`` (B, H, ceil(T/block), D): stored ones + the partial tail.
        The tensors are views of the store, valid until the next ``update``/``get``."""
        length = keys.shape[2]
        n_full = length // self.block
        if n_full != self.blocks_done:
            self.update(keys)
        n_blocks = n_full
        if length % self.block:  # the tail's statistics go to the free slot after the complete blocks
            tail = block_stats(keys[:, :, n_full * self.block :], self.block, self.stats)
            for s in self.stats:
                self._write(s, n_full, tail[s])
            n_blocks += 1
        return {s: self._store[s][:, :, :n_blocks] for s in self.stats}
