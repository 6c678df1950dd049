"""What position methods need to know about a model's RoPE, and re-rotation of already-rotated q/k.

RoPE rotates each pair of dimensions by ``pos * inv_freq``; rotations compose, so a query or key that
transformers rotated at position ``p`` is moved to position ``p + delta`` by rotating it again by
``delta`` — no access to the un-rotated tensors and no model patching. Angles are computed in float64:
deltas reach tens of thousands of radians, where float32 angles lose the low bits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError


@dataclass(frozen=True, eq=False)
class RopeInfo:
    """The rotary frequencies of the layers a position method re-maps (full-attention layers)."""

    inv_freq: Tensor  # (D_rot / 2,) float64
    trained: int  # the pretraining context length (max_position_embeddings)
    theta: float = 10000.0  # the RoPE base of those layers (``buckets`` changes it)

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
    problem = rerotation_problem(model, config)
    if problem:
        raise UnsupportedModelError(
            f"{type(model).__name__}: {problem}, so re-rotating its queries and keys (selfextend, string, gali, "
            "mspoe) would not match its RoPE. Use a rope scaling method (yarn, linear, dynamic, llama3, "
            "longrope), which transformers applies with the model's own rotary code")
    trained = int(getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings)
    return RopeInfo(freq.detach().double().cpu(), trained, rope_theta(config, freq))


def rope_theta(config: object, inv_freq: Tensor) -> float:
    """The global layers' RoPE base: from the config, else read off the two highest frequencies."""
    params = getattr(config, "rope_parameters", None) or {}
    own = params.get("full_attention", params)  # per layer type (Gemma 3): the global layers'
    theta = own.get("rope_theta") if isinstance(own, dict) else None
    theta = theta or getattr(config, "rope_theta", None)
    if not theta and inv_freq.numel() > 1:  # inv_freq[i] = theta ** (-i / half) in the high-frequency dims
        theta = float((inv_freq[0].double() / inv_freq[1].double()) ** inv_freq.numel())
    return float(theta or 10000.0)


def rerotation_problem(model: nn.Module, config: object) -> str | None:
    """Why ``rerotate`` (half-split pairs, rotary dims first, every global layer rotated) would not match this
    model's RoPE; None when it does. Read from the config and the attention modules' own ``rotate_half``."""
    if 0 in (getattr(config, "no_rope_layers", None) or []):
        return "some of its layers use no position embedding at all (NoPE layers, as in Llama 4)"
    if getattr(config, "qk_rope_head_dim", None):
        return ("its rotary part is the last qk_rope_head_dim dims of each head (multi-head latent attention, "
                "as in DeepSeek-V3)")
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling"):
            rotate_half = getattr(sys.modules.get(type(module).__module__), "rotate_half", None)
            if rotate_half is not None:
                probe = torch.arange(1.0, 5.0)
                if not torch.equal(rotate_half(probe), torch.tensor([-3.0, -4.0, 1.0, 2.0])):
                    return "it pairs rotary dimensions interleaved (2i, 2i+1), as GLM-4 does, not half-split"
            break
    return None


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
