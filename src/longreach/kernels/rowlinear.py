"""One-row linear layers on every thread: what a decode step does with each projection, MLP matrix and the
LM head.

Why: torch's fp32 GEMV (a linear layer applied to one row) runs on one thread on our CPUs. On the 2-core AMD
EPYC, SmolLM2's LM head (49152 x 576, 113 MB) took 7.2-7.4 ms with 1 thread and with 2 (15 GB/s), and its 30
layers' weights 27-29 ms, so a decode token streamed its 540 MB at one core's bandwidth. The compiled
``linear_row`` (``csrc/row_linear.cpp``) splits the output rows over the threads: the same LM head in 3.5 ms.

It is used only where it measured faster on this machine (``choice.decide``, per weight shape, timed on weights
that come from memory as in decode: the layer's own weight when it holds over half of ``STREAM_BYTES``, else
random copies adding up to at most that), only for weights of at least ``MIN_BYTES``, and never under autograd or
autocast. SmolLM2's key and value projections (192 x 576, 442 KB) are above it: 14.9 against 30.4 us a call on the
EPYC (timed as above); weights of tiny test models are below it, and are not worth a measurement. Sums run in
another order than MKL's, so outputs differ from ``F.linear`` by rounding (tests/test_rowlinear.py bounds it); no
selection depends on it.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import choice, native

MIN_BYTES = 1 << 18
STREAM_BYTES = 64 << 20

def _timings(weight: torch.Tensor) -> dict[str, float]:
    """Seconds per call of each path, best of ``choice.REPEAT`` passes over weights that do not fit a CPU cache: the
    layer's own weight when it holds over half of ``STREAM_BYTES``, else random ones of its shape (at least two,
    at most ``STREAM_BYTES`` in all)."""
    out_features, in_features = weight.shape
    nbytes = weight.numel() * weight.element_size()
    gen = torch.Generator().manual_seed(0)
    weights = [weight] if 2 * nbytes > STREAM_BYTES else [
        torch.randn(out_features, in_features, generator=gen) for _ in range(STREAM_BYTES // nbytes)]
    x = torch.randn(1, 1, in_features, generator=gen)
    compiled = native.load()
    paths = {"native": lambda w: compiled.linear_row(x, w, None), "torch": lambda w: F.linear(x, w)}
    timed = choice.best_seconds({path: lambda run=run: [run(w) for w in weights] for path, run in paths.items()})
    return {path: seconds / len(weights) for path, seconds in timed.items()}


_memo: dict[tuple, bool] = {}  # every decode call asks: a dict look-up, not the choice file's key


def faster(weight: torch.Tensor) -> bool:
    """Whether the threaded one-row path beats ``F.linear`` for this weight's shape on this machine."""
    out_features, in_features = weight.shape
    key = (out_features, in_features, torch.get_num_threads(), os.environ.get("LONGREACH_NATIVE"))
    if key not in _memo:
        shape = f"linear_row/{out_features}/{in_features}"
        _memo[key] = choice.decide(shape, lambda: _timings(weight.detach()))["path"] == "native"
    return _memo[key]


def _forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    if (x.numel() == module.in_features and x.shape[-1] == module.in_features and x.dtype == torch.float32
            and x.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu") and faster(weight)):
        return native.load().linear_row(x, weight, module.bias)
    return nn.Linear.forward(module, x)


def _large(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module) is nn.Linear and "forward" not in module.__dict__ and weight is not None
            and weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.numel() * 4 >= MIN_BYTES)


def install(model: nn.Module) -> Callable[[], None]:
    """Route one-row calls of ``model``'s large fp32 CPU linear layers through the threaded path where it measured
    faster; returns the undo. Layers already given a forward of their own (hooks of other libraries) are left
    alone, and the undo removes only the forwards it installed."""
    candidates = [m for m in model.modules() if _large(m)]
    if not candidates or native.load() is None:  # a CUDA or bf16 model never builds the extension for this
        return lambda: None
    mine = {}
    for module in candidates:
        module.forward = mine[module] = types.MethodType(_forward, module)

    def undo() -> None:
        for module, forward in mine.items():
            if module.__dict__.get("forward") is forward:
                del module.forward

    return undo
