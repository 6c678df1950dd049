"""Kernels compute attention for a Selection; they never decide what to keep.

``reference`` is ground truth, ``gather`` is the CPU path, ``flex`` builds a FlexAttention BlockMask
from the Selection's indices (GPU prefill). ``auto`` picks by device and phase.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..errors import SpecError, did_you_mean
from ..selection import Selection
from . import flex, gather, reference
from .far import FarKeys

Kernel = Callable[..., Tensor]  # (q, k, v, sel, scale[, far]) -> (B, Tq, Hq, D)

KERNELS: dict[str, Kernel] = {
    "reference": reference.attend,
    "gather": gather.attend,
    "flex": flex.attend,
}


def kernel_names() -> list[str]:
    return ["auto", *KERNELS]


def resolve(name: str, q: Tensor) -> Kernel:
    """The kernel to run for ``name`` on these queries; ``auto``: flex for GPU prefill, gather otherwise."""
    if name == "auto":
        if q.device.type == "cuda" and q.shape[2] > 1 and flex.available():
            return KERNELS["flex"]
        return KERNELS["gather"]
    try:
        return KERNELS[name]
    except KeyError:
        raise SpecError(f"unknown kernel '{name}': {did_you_mean(name, kernel_names())}") from None


def attend(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float, kernel: str = "auto",
           far: FarKeys | None = None, *, softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """Attention for ``sel``: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D) -> (B, Tq, Hq, D).

    ``far``: two-piece position methods (keys at distance >= far.distance scored with far.q / far.k);
    the flex kernel has no such path, so those calls run on ``gather``. ``softcap`` (Gemma 2's
    cap * tanh(s / cap)) and learned ``sinks`` (GPT-OSS: one logit per query head, (Hq,)) run on ``gather``'s
    PyTorch path (or the reference kernel when asked for).
    """
    fn = resolve(kernel, q)
    if softcap is not None or sinks is not None:
        fn = reference.attend if fn is reference.attend else gather.attend
        return fn(q, k, v, sel, scale, far, softcap=softcap, sinks=sinks)
    if far is None:
        return fn(q, k, v, sel, scale)
    if fn is flex.attend:
        fn = gather.attend
    return fn(q, k, v, sel, scale, far)


__all__ = ["KERNELS", "FarKeys", "Kernel", "attend", "kernel_names", "resolve"]
