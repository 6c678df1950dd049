"""What position methods need to know about a model's RoPE, and re-rotation of already-rotated q/k.

RoPE rotates each pair of dimensions by ``pos * inv_freq``; rotations compose, so a query or key that
transformers rotated at position ``p`` is moved to position ``p + delta`` by rotating it again by
``delta`` — no access to the un-rotated tensors and no model patching. Angles are computed in float64:
deltas reach tens of thousands of radians, where float32 angles lose the low bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError


@dataclass(frozen=True, eq=False)
class RopeInfo:
    """The rotary frequencies of the layers a position method re-maps (full-attention layers)."""

    inv_freq: Tensor  # (D_rot / 2,) float64
    trained: int  # the pretraining context length (max_position_embeddings)

    @property
    def rotated_dims(self) -> int:
        return 2 * self.inv_freq.shape[0]


def rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every rotary-embedding module: they own ``inv_freq`` buffers."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if hasattr(child, "rope_type") and any(b.endswith("inv_freq") for b, _ in child.named_buffers()):
                found.append((parent, name, child))
    return found


def text_config(model: nn.Module) -> object:
    config = model.config
    return getattr(config, "text_config", None) or config


def rope_info(model: nn.Module) -> RopeInfo:
    """Frequencies of the global-attention layers (Gemma 3's sliding layers keep their own RoPE)."""
    mods = rotary_modules(model)
    if not mods:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no rotary position embedding module: position methods re-map RoPE "
            "positions and need a RoPE model (Llama, Qwen2, Mistral, Gemma 3)")
    rotary = mods[0][2]
    freq = getattr(rotary, "inv_freq", None)
    if freq is None:
        freq = getattr(rotary, "full_attention_inv_freq", None)
    if freq is None:
        raise UnsupportedModelError(f"{type(rotary).__name__}: found no global-attention inv_freq to re-map")
    config = text_config(model)
    trained = int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    return RopeInfo(freq.detach().double().cpu(), trained)


def rerotate(x: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    """Move rotated vectors by ``delta`` positions: x (B, H, T, D); delta (T,) or (H, T), any real values.

    Uses transformers' half-split pairing (dimension i pairs with i + D_rot/2); dimensions past the
    rotated part (partial rotary) are left as they are.
    """
    half = inv_freq.shape[0]
    angle = delta.to(torch.float64).unsqueeze(-1) * inv_freq.to(delta.device, torch.float64)  # (..., T, half)
    cos = angle.cos().to(x.dtype)
    sin = angle.sin().to(x.dtype)
    if delta.dim() == 2:  # per head
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    a, b, rest = x[..., :half], x[..., half: 2 * half], x[..., 2 * half:]
    out = torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)
    return out
