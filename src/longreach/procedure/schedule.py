"""HOMER's plan for one prompt, in plain arithmetic: chunks, the merge tree, which layers each tree level runs,
how many tokens each node keeps, every token's position id, and the memory of the depth-first walk.

The driver (``procedure.homer``) follows this plan step by step and ``longreach plan`` reads its memory from it, so
what is planned is what runs. Shapes, for a prompt of ``P`` prefix + ``n`` context + ``S`` suffix tokens and a chunk
of ``C`` tokens (``room = C - P - S`` context tokens per chunk):

- ``2**height`` leaf chunks, the fewest (a power of two: the tree is balanced) whose context fits ``room``; the
  context is split evenly (sizes differ by at most one). Every leaf is ``prefix + its context + suffix``.
- Layers: ``warmup`` layers run on the leaves alone; the remaining ``N - warmup`` are split evenly over the
  ``height + 1`` tree levels (the remainder goes to the leaves, as in the paper's code). A node runs its level's
  layers, then, at the end of its last layer, keeps its ``budget`` best context tokens: ``ceil(room / 2)`` for a
  left child, ``floor(room / 2)`` for a right one, so two merged siblings fill at most one chunk again; the root
  keeps ``room``.
- Positions: every chunk uses the leaf layout (prefix ``0..P-1``, context from ``P``, suffix from ``P + E`` with
  ``E`` the longest leaf context), and a merged chunk keeps its tokens' leaf positions, so no position reaches
  ``C``. All positions are shifted by ``shift = final_length - (P + E + S)`` (RoPE only sees differences), so the
  last cached token sits at ``final_length - 1`` and decoding continues at the cache length, as any HF cache does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from ..errors import InputError


@dataclass(frozen=True)
class Memory:
    """The depth-first walk's high-water marks, in tokens (multiply by bytes per token)."""

    kv_peak: int  # token-layers of KV held at the worst moment (finished subtrees waiting + the current node)
    kv_final: int  # token-layers of the final cache (final_length x layers)
    waiting_rows: int  # most hidden-state rows of finished subtrees waiting for their sibling at once
    forward_max: int  # the longest chunk one layer forward sees


@dataclass(frozen=True)
class HomerSchedule:
    tokens: int  # prompt length
    prefix: int  # P: leading tokens shared by every chunk
    suffix: int  # S: trailing tokens shared by every chunk
    chunk: int  # C: longest chunk (prefix and suffix included)
    layers: int  # N: decoder layers
    warmup: int  # layers every leaf runs before the first merge level

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise InputError("homer: the prompt is empty")
        if self.single:
            return
        if self.room < 2:
            raise InputError(f"homer: prefix={self.prefix} + suffix={self.suffix} leave {self.room} context tokens "
                             f"per chunk of {self.chunk}; use a larger chunk= or a shorter prefix=/suffix=")
        if not 0 <= self.warmup < self.layers:
            raise InputError(f"homer: warmup={self.warmup} must be below the model's {self.layers} layers")
        merging = self.layers - self.warmup
        if merging < self.height + 1:
            raise InputError(
                f"homer: {self.tokens} tokens need {self.leaves} chunks of {self.chunk}, {self.height} merge levels "
                f"+ the leaves = {self.height + 1} layer groups, but only {merging} layers follow warmup="
                f"{self.warmup}; use a larger chunk= or a smaller warmup=")

    # -- the tree ---------------------------------------------------------------------------------------------
    @property
    def single(self) -> bool:
        """The prompt fits one chunk: no merge, no reduction (HOMER is then exactly the model)."""
        return self.tokens <= self.chunk

    @property
    def head(self) -> int:
        """Shared leading tokens in effect (a single chunk is all 'prefix': plain positions 0..n-1)."""
        return self.tokens if self.single else self.prefix

    @property
    def tail(self) -> int:
        return 0 if self.single else self.suffix

    @property
    def context(self) -> int:
        return self.tokens - self.head - self.tail

    @property
    def room(self) -> int:
        """Context tokens one chunk holds."""
        return self.chunk - self.prefix - self.suffix

    @cached_property
    def height(self) -> int:
        return 0 if self.single else math.ceil(math.log2(math.ceil(self.context / self.room)))

    @property
    def leaves(self) -> int:
        return 2**self.height

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Context tokens of each leaf (an even split)."""
        n, k = self.context, self.leaves
        return tuple((i + 1) * n // k - i * n // k for i in range(k))

    def bounds(self, leaf: int) -> tuple[int, int]:
        """[lo, hi): the prompt indices of a leaf's context."""
        lo = self.head + leaf * self.context // self.leaves
        return lo, lo + self.sizes[leaf]

    def span(self, level: int) -> tuple[int, int]:
        """[start, stop): the layers a node at ``level`` (0 = leaves) runs."""
        if self.single:
            return 0, self.layers
        merging = self.layers - self.warmup
        per = merging // (self.height + 1)
        first = self.warmup + merging - per * (self.height + 1) + per  # the leaves also take the remainder
        return (0, first) if level == 0 else (first + (level - 1) * per, first + level * per)

    def budget(self, level: int, index: int) -> int:
        """Context tokens a node keeps after its last layer."""
        if self.single:
            return self.context
        if level == self.height:
            return self.room
        return -(-self.room // 2) if index % 2 == 0 else self.room // 2

    def kept(self, level: int, index: int) -> int:
        """Context tokens node (level, index) holds after its reduction."""
        if level == 0:
            held = self.sizes[index]
        else:
            held = self.kept(level - 1, 2 * index) + self.kept(level - 1, 2 * index + 1)
        return min(held, self.budget(level, index))

    # -- positions and the result -------------------------------------------------------------------------------
    @cached_property
    def final_length(self) -> int:
        """Tokens in every layer of the final KV cache."""
        return self.head + self.kept(self.height, 0) + self.tail

    @property
    def leaf_length(self) -> int:
        """The leaf layout's length: prefix + longest leaf context + suffix."""
        return self.head + max(self.sizes) + self.tail

    @property
    def shift(self) -> int:
        return self.final_length - self.leaf_length

    def positions(self, leaf: int) -> list[int]:
        """Position ids of a leaf's rows (prefix, context, suffix), shift included."""
        size, width = self.sizes[leaf], max(self.sizes)
        ids = [*range(self.head), *range(self.head, self.head + size),
               *range(self.head + width, self.head + width + self.tail)]
        return [p + self.shift for p in ids]

    # -- memory -------------------------------------------------------------------------------------------------
    def memory(self) -> Memory:
        """High-water marks of the depth-first walk (the paper's memory-optimal order: a finished subtree waits
        only for its sibling, so at most one per tree level is held, O(log chunks)). A node's KV peaks at the end
        of its last layer, before its reduction; a merge briefly holds both children's caches."""
        peak = {"kv": 0, "waiting": 0, "forward": 0}

        def rows(ctx: int) -> int:
            return self.head + ctx + self.tail

        def walk(level: int, index: int, held_kv: int, held_rows: int) -> int:
            start, stop = self.span(level)
            peak["waiting"] = max(peak["waiting"], held_rows)
            if level == 0:
                n = rows(self.sizes[index])
            else:
                left = walk(level - 1, 2 * index, held_kv, held_rows)
                below = self.span(level - 1)[1]
                right = walk(level - 1, 2 * index + 1, held_kv + rows(left) * below, held_rows + rows(left))
                peak["kv"] = max(peak["kv"], held_kv + (rows(left) + rows(right)) * start)  # the merge
                n = rows(left + right)
            peak["kv"] = max(peak["kv"], held_kv + n * stop)  # the node's last layer, before its reduction
            peak["forward"] = max(peak["forward"], n)
            return self.kept(level, index)

        walk(self.height, 0, 0, 0)
        return Memory(peak["kv"], self.final_length * self.layers, peak["waiting"], peak["forward"])
