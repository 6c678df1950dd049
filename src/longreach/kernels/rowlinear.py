"""One-row linear layers on every thread: what a decode step does with each projection, MLP matrix and the
LM head.

Why: torch's fp32 GEMV (a linear layer applied to one row) runs on one thread on our CPUs. On the 2-core AMD
EPYC, SmolLM2's LM head (49152 x 576, 113 MB) took 7.2-7.4 ms with 1 thread and with 2 (15 GB/s), its 30
layers' weights 27-29 ms, so a decode token streamed its 540 MB at one core's bandwidth; llama.cpp on the same
weights in F32 decodes about 3.5x faster on that machine. The compiled ``linear_row`` (``csrc/row_linear.cpp``)
splits the output rows over the threads (the LM head: 4.1 ms, 28 GB/s, with two threads).

It is used only where it measured faster on this machine (``choice.decide``, per weight shape, timed while
streaming more weights than a CPU cache holds, as decode does), and only for weights of at least ``MIN_BYTES``
(smaller ones sit in cache and do not pay for the fork). Sums run in another order than MKL's, so outputs
differ from ``F.linear`` by rounding (tests/test_rowlinear.py bounds it); no method's selection depends on it.
"""

from __future__ import annotations

import math
import os
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import choice, native

MIN_BYTES = 1 << 20
STREAM_BYTES = 64 << 20  # timed over copies adding up to this, so the weights come from memory as in decode
REPEAT = 3


def _timings(out_features: int, in_features: int) -> dict[str, float]:
    copies = max(2, math.ceil(STREAM_BYTES / (out_features * in_features * 4)))
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(out_features, in_features, generator=gen) for _ in range(copies)]
    x = torch.randn(1, 1, in_features, generator=gen)
    compiled = native.load()
    paths = {"native": lambda w: compiled.linear_row(x, w, None), "torch": lambda w: F.linear(x, w)}
    found = {}
    for path, run in paths.items():
        best = math.inf
        for _ in range(REPEAT + 1):  # the first pass warms up
            start = time.perf_counter()
            for w in weights:
                run(w)
            best = min(best, (time.perf_counter() - start) / copies)
        found[path] = best
    return found


_memo: dict[tuple, bool] = {}  # every decode call asks: a dict look-up, not the choice file's key


def faster(out_features: int, in_features: int) -> bool:
    """Whether the threaded one-row path beats ``F.linear`` for this weight shape on this machine."""
    key = (out_features, in_features, torch.get_num_threads(), os.environ.get("LONGREACH_NATIVE"))
    if key not in _memo:
        shape = f"linear_row/{out_features}/{in_features}"
        _memo[key] = choice.decide(shape, lambda: _timings(out_features, in_features))["path"] == "native"
    return _memo[key]


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    if (x.numel() == module.in_features and x.dtype == torch.float32 and x.device.type == "cpu"
            and weight.is_contiguous() and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and faster(*weight.shape)):
        return native.load().linear_row(x, weight, module.bias)
    return nn.Linear.forward(module, x)


def install(model: nn.Module) -> Callable[[], None]:
    """Route one-row calls of ``model``'s large fp32 CPU linear layers through the threaded path where it measured
    faster; returns the undo. Layers already given a forward of their own (hooks of other libraries) are left
    alone."""
    patched: list[nn.Linear] = []
    if native.load() is None:
        return lambda: None
    for module in model.modules():
        if (type(module) is nn.Linear and "forward" not in module.__dict__ and module.weight.device.type == "cpu"
                and module.weight.dtype == torch.float32 and module.weight.numel() * 4 >= MIN_BYTES):
            module.forward = types.MethodType(_forward, module)
            patched.append(module)

    def undo() -> None:
        for module in patched:
            module.__dict__.pop("forward", None)

    return undo
