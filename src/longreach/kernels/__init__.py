"""Kernels compute attention for a Selection; they never decide what to keep.

``reference`` is ground truth, ``gather`` is the CPU path, ``flex`` builds a FlexAttention BlockMask
from the Selection's indices (GPU prefill). ``auto`` picks by device and phase.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
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
    cap * tanh(s / cap)) and learned ``sinks`` (GPT-OSS: one logit per query head, (Hq,)) run on ``gather``
    (its PyTorch path, or its split-K decode kernel for a decode step over every key; or the reference kernel
    when asked for).
    """
    if v.shape[-1] != q.shape[-1]:
        return _unequal_widths(q, k, v, sel, scale, kernel, far, softcap, sinks)
    fn = resolve(kernel, q)
    if softcap is not None or sinks is not None:
        fn = reference.attend if fn is reference.attend else gather.attend
        return fn(q, k, v, sel, scale, far, softcap=softcap, sinks=sinks)
    if far is None:
        return fn(q, k, v, sel, scale)
    if fn is flex.attend:
        fn = gather.attend
    return fn(q, k, v, sel, scale, far)


def _unequal_widths(q: Tensor, k: Tensor, v: Tensor, sel: Selection, scale: float, kernel: str, far: FarKeys | None,
                    softcap: float | None, sinks: Tensor | None) -> Tensor:
    """Multi-head latent attention (DeepSeek-V3 as transformers runs it): value heads narrower or wider than
    query/key heads. Zero-padding the narrower side to the wider one is exact, and lets every kernel (which
    take one head width) run: zero value columns add zero output columns, which are cut off; zero q/k columns
    add 0 to every q.k. It costs the padded copy and its share of the attention work."""
    dk, dv = q.shape[-1], v.shape[-1]
    if dv < dk:
        out = attend(q, k, _pad_last(v, dk), sel, scale, kernel, far, softcap=softcap, sinks=sinks)
        return out[..., :dv]
    if far is not None:
        far = FarKeys(_pad_last(far.q, dv), _pad_last(far.k, dv), far.distance)
    return attend(_pad_last(q, dv), _pad_last(k, dv), v, sel, scale, kernel, far, softcap=softcap, sinks=sinks)


def _pad_last(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


__all__ = ["KERNELS", "FarKeys", "Kernel", "attend", "kernel_names", "resolve"]
