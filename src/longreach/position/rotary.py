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

from ..compat import trained_length
from ..errors import UnsupportedModelError


@dataclass(frozen=True, eq=False)
class RopeInfo:
    """The rotary frequencies of the layers a position method re-maps (full-attention layers)."""

    inv_freq: Tensor  # (D_rot / 2,) float64
    trained: int  # the pretraining context length (max_position_embeddings)
    theta: float = 10000.0  # the RoPE base of those layers (``buckets`` changes it)
    # the model pairs rotary dims (2i, 2i+1) (GLM-4), not (i, i + D_rot/2): the runtime re-orders q/k dims into
    # half-split order before a position method sees them (``half_split``)
    interleaved: bool = False

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


def trained_positions(model: nn.Module) -> int:
    """The trained length a position method extends; refused for a config that names none."""
    trained = trained_length(model)
    if trained is None:
        raise UnsupportedModelError(f"{type(model).__name__}: its config names no max_position_embeddings, the "
                                    "trained length a position method starts from")
    return trained


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
    return RopeInfo(freq.detach().double().cpu(), trained_positions(model), rope_theta(config, freq),
                    interleaved_pairs(model))


def global_rope_parameters(config: object) -> dict:
    """The ``rope_parameters`` entry of the global-attention layers (the ``full_attention`` one where the config keeps
    one per layer type, as Gemma 3's does); the dict itself, so a caller may change a copied config's; {} when none."""
    params = getattr(config, "rope_parameters", None) or {}
    own = params.get("full_attention", params) if isinstance(params, dict) else None
    return own if isinstance(own, dict) else {}


def rope_theta(config: object, inv_freq: Tensor) -> float:
    """The global layers' RoPE base: from the config, else read off the two highest frequencies."""
    theta = global_rope_parameters(config).get("rope_theta")
    theta = theta or getattr(config, "rope_theta", None)
    if not theta and inv_freq.numel() > 1:  # inv_freq[i] = theta ** (-i / half) in the high-frequency dims
        theta = float((inv_freq[0].double() / inv_freq[1].double()) ** inv_freq.numel())
    return float(theta or 10000.0)


def rerotation_problem(model: nn.Module, config: object) -> str | None:
    """Why ``rerotate`` (rotary dims first, pairs half-split or re-ordered so) would not match this model's RoPE;
    None when it does. NoPE layers (Llama 4) are left alone by the runtime, interleaved pairs (GLM-4) re-ordered."""
    if getattr(config, "qk_rope_head_dim", None):
        return ("its rotary part is the last qk_rope_head_dim dims of each head (multi-head latent attention, "
                "as in DeepSeek-V3)")
    return None


def nope_layers(model: nn.Module) -> set[int]:
    """Layers that use no position embedding (Llama 4's NoPE layers: ``no_rope_layers[i] == 0``): a position
    method has nothing to re-map there and the runtime leaves them as they are."""
    flags = getattr(text_config(model), "no_rope_layers", None) or []
    return {i for i, uses_rope in enumerate(flags) if not uses_rope}


def interleaved_pairs(model: nn.Module) -> bool:
    """Whether the model's ``rotate_half`` pairs dims (2i, 2i+1), as GLM-4's does, instead of (i, i + D/2); read
    from the attention modules' own function, so a renamed family is still read right."""
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling"):
            rotate_half = getattr(sys.modules.get(type(module).__module__), "rotate_half", None)
            if rotate_half is not None:
                probe = torch.arange(1.0, 5.0)
                return torch.equal(rotate_half(probe), torch.tensor([-2.0, 1.0, -4.0, 3.0]))
            break
    return False


def half_split(x: Tensor, rotated: int) -> Tensor:
    """x (..., D) with interleaved rotary pairs (2i, 2i+1) in its first ``rotated`` dims -> the same vectors
    with those dims re-ordered to half-split pairs (i, i + rotated/2). q and k re-ordered alike keep every q.k,
    so attention is unchanged, and ``rerotate`` then applies as to any half-split model."""
    order = torch.cat([torch.arange(0, rotated, 2), torch.arange(1, rotated, 2), torch.arange(rotated, x.shape[-1])])
    return x[..., order.to(x.device)]


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
