"""Asymmetric integer quantization in groups, and 4-bit packing: the arithmetic of ``kvquant`` (KIVI).

A group of elements is stored as unsigned codes with one scale and one zero point (the group's minimum):
``x ≈ code * scale + zero``, ``scale = (max - min) / (2**bits - 1)``. Rounding to the nearest code makes the
error of every element at most ``scale / 2`` when the scale and zero point are fp32 (in a bf16/fp16 cache they
are stored rounded, and the bound holds only up to that rounding). Groups run along one axis of a (B, H, n, D)
tensor: along the tokens (``axis=-2``, one scale per channel and group of tokens: KIVI's keys, whose outliers
sit in fixed channels) or along the channels (``axis=-1``, one scale per token and group of channels: KIVI's values). A
last group shorter than ``group`` gets its own statistics (it is padded with its own last element, which moves
neither its minimum nor its maximum), and no code is stored for the padding.

Codes are ``uint8``: one per byte at 8 bits, two per byte at 4 bits (packed along the head dim, the low nibble
first). Scales and zero points keep the tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

BITS = (8, 4)


@dataclass
class Quantized:
    """A (B, H, n, D) tensor held as codes plus per-group scales and zero points (see the module doc)."""

    codes: Tensor  # (B, H, n, D) uint8, or (B, H, n, ceil(D / 2)) at 4 bits
    scale: Tensor  # axis=-2: (B, H, ceil(n / group), D); axis=-1: (B, H, n, ceil(D / group)); the source dtype
    zero: Tensor  # like scale
    bits: int
    group: int
    axis: int  # -2: groups of tokens (per channel); -1: groups of channels (per token)
    dim: int  # D, the unpacked head dim

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes the codes, scales and zero points hold."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def dequantize_into(self, out: Tensor) -> bool:
        """Write the approximation into ``out`` (B, H, n, D), rows of D contiguous values, in two passes (codes times
        scales straight into ``out``, then the zero points added in place), when the groups tile ``out`` exactly;
        False otherwise (the caller falls back to ``dequantize``). Decode calls this every step on the whole
        cache: the general path below makes about five full-size fp32 temporaries."""
        n, d, g = self.tokens, self.dim, self.group
        if out.shape[-2:] != (n, d):
            return False
        codes = unpack_int4(self.codes, d) if self.bits == 4 else self.codes
        if self.axis == -2 and n % g == 0:  # groups of tokens: (B, H, n/g, g, D), one scale per group and channel
            view, codes = out.unflatten(-2, (n // g, g)), codes.unflatten(-2, (n // g, g))
            scale, zero = self.scale.unsqueeze(-2), self.zero.unsqueeze(-2)
        elif self.axis == -1 and d % g == 0:  # groups of channels: (B, H, n, D/g, g), one scale per token and group
            view, codes = out.unflatten(-1, (d // g, g)), codes.unflatten(-1, (d // g, g))
            scale, zero = self.scale.unsqueeze(-1), self.zero.unsqueeze(-1)
        else:
            return False
        torch.mul(codes, scale, out=view)
        view.add_(zero)
        return True

    def dequantize(self) -> Tensor:
        """The (B, H, n, D) approximation, in the scales' dtype (a temporary: nothing keeps it)."""
        codes = unpack_int4(self.codes, self.dim) if self.bits == 4 else self.codes
        groups, n = _groups(codes.float(), self.group, self.axis, pad_value=0.0)
        scale, zero = _stats_view(self.scale, self.axis), _stats_view(self.zero, self.axis)
        x = groups * scale[..., None].float() + zero[..., None].float()
        return _ungroup(x, n, self.axis).to(self.scale.dtype)

    def cat(self, other: Quantized) -> Quantized:
        """Both, one after the other along the tokens. With token groups, ``self`` must end on a group
        boundary (its statistics would otherwise cover tokens from both)."""
        if self.axis == -2 and self.tokens % self.group:
            raise ValueError(f"{self.tokens} quantized tokens do not fill groups of {self.group}: cannot append")
        return Quantized(torch.cat([self.codes, other.codes], dim=-2), torch.cat([self.scale, other.scale], dim=-2),
                         torch.cat([self.zero, other.zero], dim=-2), self.bits, self.group, self.axis, self.dim)

    def edit(self, fn: Callable[[Tensor], Tensor]) -> Quantized:
        """The same with ``fn`` applied to every stored tensor (batch edits, device moves)."""
        return Quantized(fn(self.codes), fn(self.scale), fn(self.zero), self.bits, self.group, self.axis, self.dim)


def quantize(x: Tensor, bits: int, group: int, axis: int) -> Quantized:
    """Quantize (B, H, n, D) ``x`` in groups of ``group`` elements along ``axis`` (-2 tokens, -1 channels)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group < 1 or axis not in (-2, -1):
        raise ValueError(f"need group >= 1 and axis -2 or -1, got group={group}, axis={axis}")
    top = 2**bits - 1
    groups, n = _groups(x.float(), group, axis, pad_value=None)  # (..., n_groups, group)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    # the grid is the stored (source-dtype) scale and zero point, so codes are nearest on what dequantize uses
    zero = lo.to(x.dtype)
    scale = ((hi - zero.float()) / top).to(x.dtype)
    s, z = scale.float(), zero.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))  # a constant group: code 0, dequantized to its value
    codes = ((groups - z[..., None]) * inv[..., None]).round_().clamp_(0, top).to(torch.uint8)
    codes = _ungroup(codes, n, axis)
    if bits == 4:
        codes = pack_int4(codes)
    return Quantized(codes, _stats_store(scale, axis), _stats_store(zero, axis), bits, group, axis, x.shape[-1])


def pack_int4(codes: Tensor) -> Tensor:
    """(..., D) uint8 codes in [0, 15] -> (..., ceil(D / 2)) bytes, element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: Tensor, dim: int) -> Tensor:
    """Inverse of ``pack_int4``: (..., ceil(D / 2)) bytes -> (..., D) codes."""
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=-1)  # (..., ceil(D / 2), 2)
    return pairs.flatten(-2)[..., :dim]


def _groups(x: Tensor, group: int, axis: int, pad_value: float | None) -> tuple[Tensor, int]:
    """(B, H, n, D) -> (..., n_groups, group) with ``axis`` last, and that axis' length. The last group is
    padded with its own last element (``pad_value=None``: statistics stay the group's) or ``pad_value``."""
    x = x.movedim(axis, -1)  # axis=-2: (B, H, D, n); axis=-1: unchanged
    n = x.shape[-1]
    pad = -n % group
    if pad:
        fill = x[..., -1:].expand(*x.shape[:-1], pad) if pad_value is None else x.new_full((*x.shape[:-1], pad),
                                                                                            pad_value)
        x = torch.cat([x, fill], dim=-1)
    return x.reshape(*x.shape[:-1], -1, group), n


def _ungroup(groups: Tensor, n: int, axis: int) -> Tensor:
    """Inverse of ``_groups``: (..., n_groups, group) -> (B, H, n, D)."""
    return groups.flatten(-2)[..., :n].movedim(-1, axis)


def _stats_store(stats: Tensor, axis: int) -> Tensor:
    """Group statistics as stored, with the tokens on dim -2: axis=-2 (B, H, D, g) -> (B, H, g, D)."""
    return stats.movedim(-1, -2).contiguous() if axis == -2 else stats.contiguous()


def _stats_view(stats: Tensor, axis: int) -> Tensor:
    """Inverse of ``_stats_store``: statistics in the grouped layout of ``_groups``."""
    return stats.movedim(-2, -1) if axis == -2 else stats
