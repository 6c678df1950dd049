"""Decode attention over a float32 cache on the compiled split-K kernel (``csrc/dense_decode.cpp``): one query row
per head over every stored key, the path of a full selection at decode (dense, every press's compressed cache,
and a model's sliding-window layers while the cache fits their window).

Why: PyTorch's CPU SDPA splits a one-row query over (batch, head) only, so SmolLM2's 3 KV heads streamed the
cache at about 15 GB/s on 2 threads (1.7 ms a layer at 16k on the AMD EPYC, about half of a dense decode token).
The kernel splits the keys into chunks per KV head, so every thread streams, and reads each key and value row
once for its whole GQA group. It equals the float64 reference up to rounding (tests/test_dense_decode.py).

Which path runs is measured once per machine, head shape and softcap (``kernels.choice``): one query over
``choice.DECODE_T`` keys, batch 1, on both paths. The result is used at every cache length and batch size; shorter
caches were not timed by the choice (on the EPYC the kernel was also faster at 512 and 4096 keys, docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import choice, native

# what runs instead, (q, k, v, scale, softcap) -> output: the choice times it (``gather`` passes its own path)
Fallback = Callable[[Tensor, Tensor, Tensor, float, "float | None"], object]

STREAM_BYTES = 64 << 20  # the timing's caches add up to at least this: a decode step reads its cache from memory


def serves(q: Tensor, k: Tensor, v: Tensor, softcap: float | None, fallback: Fallback) -> bool:
    """Whether the compiled kernel runs this call: one float32 CPU query row per head, float32 keys and values
    of q's width, no autograd, and the kernel measured faster than ``fallback`` for the head shape."""
    if q.shape[2] != 1 or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return False
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or (t.requires_grad and torch.is_grad_enabled())
           for t in (q, k, v)):
        return False
    if k.shape != v.shape or k.shape[-1] != q.shape[-1] or native.load() is None:
        return False
    return faster(q.shape[1], k.shape[1], q.shape[-1], softcap is not None, fallback)


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """q (B, Hq, 1, D) over k/v (B, Hkv, n, D) -> out (B, 1, Hq, D) and lse (B, 1, Hq), as ``gather`` returns them."""
    batch, n_q, _, dim = q.shape
    k, v = (t if t.stride(-1) == 1 and t.stride(-2) == dim else t.contiguous() for t in (k, v))
    out, lse = native.load().dense_decode((q * scale).reshape(batch, n_q, dim), k, v, float(softcap or 0.0))
    return out.view(batch, 1, n_q, dim), lse.view(batch, 1, n_q)


def faster(n_q: int, n_kv: int, dim: int, softcapped: bool, fallback: Fallback) -> bool:
    """Whether the kernel beats ``fallback`` for this head shape on this machine (measured once, cached)."""
    shape = f"dense_decode/{n_q}/{n_kv}/{dim}" + ("/softcap" if softcapped else "")
    return choice.decide(shape, lambda: _timings(n_q, n_kv, dim, softcapped, fallback))["path"] == "native"


def _timings(n_q: int, n_kv: int, dim: int, softcapped: bool, fallback: Fallback) -> dict[str, float]:
    """Seconds per layer of each path, one query over ``choice.DECODE_T`` keys, over enough layers' caches that
    they come from memory as in decode."""
    gen = torch.Generator().manual_seed(0)
    shape = (1, n_kv, choice.DECODE_T, dim)
    layers = max(2, -(-STREAM_BYTES // (2 * 4 * n_kv * choice.DECODE_T * dim)))
    caches = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(layers)]
    q, scale, cap = torch.randn(1, n_q, 1, dim, generator=gen), dim**-0.5, 30.0 if softcapped else None
    paths = {"native": lambda: [attend(q, k, v, scale, cap) for k, v in caches],
             "torch": lambda: [fallback(q, k, v, scale, cap) for k, v in caches]}
    return {path: seconds / layers for path, seconds in choice.best_seconds(paths).items()}
