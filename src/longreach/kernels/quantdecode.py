"""Decode attention over a kvquant cache's codes (``csrc/quant_decode.cpp``): one query per head attends the
int8/int4 keys and values, and the full-precision residual after them, without dequantizing the cache.

Why: dequantizing first writes the whole cache in fp32 and reads it again at every step, so kvquant's 3-5x
fewer stored bytes decoded slower than dense (docs/kvquant.md). The compiled kernel reads each code once. It
is exact up to rounding against dequantize-then-attend (tests/test_quant_decode.py): the same codes, scales and
zero points, summed in another order.

This module only computes; the cache layer (``cache.quantized``) decides when to call it, and measures on each
machine whether it beats its fallback (``kernels.choice``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from . import native
from .lse import with_sink


class QuantizedRows(Protocol):
    """What the kernel reads of a quantized tensor (``cache.quant.Quantized``): keys grouped over tokens
    (``axis=-2``), values over channels (``axis=-1``)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    group: int
    axis: int
    dim: int


def usable(q: Tensor, keys: QuantizedRows, values: QuantizedRows) -> bool:
    """Whether the compiled kernel serves this call: one float32 CPU query row per head, no autograd, the
    layout kvquant writes (keys per channel over whole token groups, values per token, fp32 statistics)."""
    if q.device.type != "cpu" or q.dtype != torch.float32 or q.shape[2] != 1:
        return False
    if q.requires_grad and torch.is_grad_enabled():
        return False
    if keys.axis != -2 or values.axis != -1 or keys.bits != values.bits or keys.group != values.group:
        return False
    if keys.codes.shape[-2] % keys.group or keys.dim != q.shape[-1] or values.dim != q.shape[-1]:
        return False
    if any(t.dtype != torch.float32 for t in (keys.scale, keys.zero, values.scale, values.zero)):
        return False
    return native.load() is not None


def attend(q: Tensor, keys: QuantizedRows, values: QuantizedRows, k_rest: Tensor, v_rest: Tensor, scale: float,
           softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """q (B, Hq, 1, D) over the quantized tokens, then ``k_rest`` / ``v_rest`` (B, Hkv, r, D) -> (B, 1, Hq, D),
    the layout of ``kernels.attend``. ``softcap`` and learned ``sinks`` (Hq,) join the softmax as in the model."""
    batch, n_q, _, dim = q.shape
    out, lse = native.load().quant_decode(
        (q * scale).view(batch, n_q, dim), keys.codes.contiguous(), keys.scale.contiguous(), keys.zero.contiguous(),
        values.codes.contiguous(), values.scale.contiguous(), values.zero.contiguous(), k_rest.float(),
        v_rest.float(), keys.bits, keys.group, float(softcap or 0.0))
    out, lse = out.view(batch, 1, n_q, dim), lse.view(batch, 1, n_q)
    return out if sinks is None else with_sink(out, lse, sinks)
