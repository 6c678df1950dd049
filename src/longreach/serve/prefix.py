"""The prefix cache: KV caches of prompts already prefilled, so a document sent again costs only its new tokens.

An entry is the cache right after the server prefilled ``tokens`` under ``spec``: a *snapshot*, never handed
out. A request gets a copy (``restore``), so nothing a later request does (decode appends, a press's
compression, the held-back last token) can change an entry.

The server prefills in chunks that start at multiples of ``block`` tokens and snapshots only at those
boundaries. The cache at a boundary is then a function of the tokens before it alone (each chunk reads the
cache of the chunks before it; a press compresses after each chunk, voting with that chunk's own queries), so
continuing from a snapshot gives exactly what a cold, chunked prefill of the whole prompt gives.

Two kinds of entry:

* **truncatable** (every layer holds each token's keys, in order: dense and select methods): it can serve any
  shorter boundary too, by copying only its first ``r`` keys;
* **whole** (a press dropped keys, or a layer keeps only a window): the stored keys are no token-exact prefix,
  so the entry serves a request only when its whole key is a prefix of the request's tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..cache.compressed import CompressedLayer, cache_bytes
from ..cache.growing import GrowingLayer


class _Stored:
    """Owner of the compressed layers inside a snapshot: never active, so a snapshot refuses to be decoded into."""

    active = False


STORED = _Stored()


def _plain(layer: object) -> bool:
    """Whether a layer holds every token's keys in order (so any prefix of it is the cache of that prefix); the
    runtime makes every full-attention layer a ``GrowingLayer``, a press makes it a ``CompressedLayer``."""
    return type(layer) is GrowingLayer


def truncatable(cache: object) -> bool:
    return all(_plain(layer) for layer in cache.layers)  # type: ignore[attr-defined]


def copy_cache(cache: object, owner: object = STORED, length: int | None = None) -> object:
    """A deep copy of a transformers ``DynamicCache`` whose tensors share nothing with ``cache``.

    ``length``: keep only the first ``length`` tokens (truncatable caches only). Compressed layers are rebuilt
    for ``owner`` (the handle of the request that will decode into them; they refuse updates once it is gone).
    """
    out = copy.copy(cache)
    layers = []
    for layer in cache.layers:  # type: ignore[attr-defined]
        if _plain(layer):
            fresh = GrowingLayer()
            if layer.is_initialized and layer.keys is not None:
                keys, values = layer.keys, layer.values
                if length is not None:
                    keys, values = keys[..., :length, :], values[..., :length, :]
                fresh.update(keys.clone(), values.clone())
            layers.append(fresh)
        elif isinstance(layer, CompressedLayer):
            if length is not None:
                raise ValueError("a compressed cache is no token-exact prefix: it cannot be truncated")
            fresh = CompressedLayer(layer.keys.clone(), layer.values.clone(), layer.seen, owner)
            if layer.short is not None:
                part = layer.short
                fresh.long_heads = None if layer.long_heads is None else layer.long_heads.clone()
                fresh.short = dataclasses.replace(
                    part, heads=part.heads.clone(), keys=part.keys.clone(), values=part.values.clone(),
                    comp_keys=None if part.comp_keys is None else part.comp_keys.clone(),
                    comp_values=None if part.comp_values is None else part.comp_values.clone())
            layers.append(fresh)
        else:  # a model's own sliding-window layer (and any other): its tensors copied as they are
            if length is not None:
                raise ValueError(f"a {type(layer).__name__} keeps only recent keys: it cannot be truncated")
            layers.append(copy.deepcopy(layer))
    out.layers = layers  # type: ignore[attr-defined]
    return out


def stored_bytes(cache: object) -> int:
    """A lower bound on a snapshot's bytes, read without copying: the keys and values every layer exposes (a
    snapshot copies at least these; spare room and a press's side parts come on top)."""
    total = 0
    for layer in cache.layers:  # type: ignore[attr-defined]
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@dataclass
class Entry:
    spec: str
    tokens: tuple[int, ...]
    cache: object  # the snapshot (owned by STORED): copied out, never used directly
    nbytes: int
    truncatable: bool


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """LRU entries keyed by (spec, token prefix), bounded by the bytes their KV tensors hold. Thread-safe."""

    def __init__(self, max_bytes: int, block: int) -> None:
        if max_bytes < 0 or block < 1:
            raise ValueError(f"prefix cache: need max_bytes >= 0 and block >= 1, got {max_bytes}, {block}")
        self.max_bytes = max_bytes
        self.block = block
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, spec: str, tokens: tuple[int, ...], limit: int) -> tuple[Entry | None, int]:
        """The entry that covers the most of ``tokens`` (at most ``limit`` of them, at a block boundary) and how
        many tokens it covers; (None, 0) when none does."""
        best, reuse = None, 0
        with self._lock:
            for entry in self._entries.values():
                if entry.spec != spec:
                    continue
                if entry.truncatable:
                    n = min(common_prefix(entry.tokens, tokens), limit) // self.block * self.block
                else:
                    k = len(entry.tokens)
                    n = k if k <= limit and tokens[:k] == entry.tokens else 0
                if n > reuse:
                    best, reuse = entry, n
            if best is not None:
                self._entries.move_to_end((best.spec, best.tokens))
                self.hits += 1
            else:
                self.misses += 1
        return best, reuse

    def restore(self, entry: Entry, length: int, owner: object) -> object:
        """A private copy of ``entry``'s first ``length`` tokens for a request whose handle is ``owner``."""
        return copy_cache(entry.cache, owner, length if entry.truncatable and length < len(entry.tokens) else None)

    def put(self, spec: str, tokens: tuple[int, ...], cache: object) -> bool:
        """Snapshot ``cache`` (the cache after exactly ``tokens``) and evict the least recently used entries
        past the byte bound; False when the snapshot alone is over the bound (then nothing is kept). A cache
        whose keys and values alone pass the bound is refused before it is copied: with ``--cache-bytes 0``
        no request pays for a copy."""
        key = (spec, tokens)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        if stored_bytes(cache) > self.max_bytes:
            return False
        snap = copy_cache(cache)
        nbytes = cache_bytes(snap) or 0
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            self._entries[key] = Entry(spec, tokens, snap, nbytes, truncatable(snap))
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                total -= old.nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict:
        with self._lock:
            entries = list(self._entries.values())
        return {"entries": len(entries), "bytes": sum(e.nbytes for e in entries), "max_bytes": self.max_bytes,
                "block": self.block, "hits": self.hits, "misses": self.misses}
