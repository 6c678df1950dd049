"""Every torch/transformers version difference and private op lives here, nowhere else."""

from __future__ import annotations

import functools
import inspect

import torch

_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def fused_lse_available(q: torch.Tensor) -> bool:
    """Whether :func:`attention_with_lse` runs torch's fused CPU kernel for ``q`` (else it builds L x S scores)."""
    return _CPU_FLASH is not None and q.device.type == "cpu" and q.dtype == torch.float32


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
    causal: bool = False, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of each row, so partial results can be merged.

    Inputs are 4-D ``(N, H, L, D)`` / ``(N, H, S, D)``; ``bias`` is an additive float mask broadcastable to
    ``(N, H, L, S)`` (0 keep, -inf drop). Rows whose keys are all dropped come back with ``out = 0`` and
    an arbitrary lse: callers mark such rows themselves (they know which rows are empty).
    ``causal`` (square inputs, no bias): the fused kernel's own causal path, no L x S mask built.

    On CPU this uses torch's fused flash kernel (measured: an additive mask costs ~7% over no mask,
    while a boolean mask in public SDPA costs ~2.5x). Elsewhere, if the op is missing, or with ``softcap``
    (scores pass through cap * tanh(s / cap) first, which the fused kernel cannot do), the plain math.
    """
    if fused_lse_available(q) and softcap is None and q.shape[-1] == v.shape[-1]:
        if bias is not None and bias.dtype != q.dtype:
            bias = bias.to(q.dtype)
        out, lse = _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
        return out, lse
    if causal:
        upper = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        bias = torch.zeros(upper.shape, dtype=q.dtype, device=q.device).masked_fill_(upper, float("-inf"))
    return attention_with_lse_math(q, k, v, bias, scale, softcap)


def attention_with_lse_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-math path beside the fused one: same contract, materialises the (L, S) scores."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (N, H, L, S)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)  # (N, H, L)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe.unsqueeze(-1))
    out = torch.matmul(probs, v)
    return out, safe


def flex_attention_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def can_set_attn_implementation(model: torch.nn.Module) -> bool:
    """Whether transformers can switch this model's attention through AttentionInterface."""
    probe = getattr(type(model), "_can_set_attn_implementation", None)
    if probe is None:
        return False
    try:
        return bool(probe())
    except Exception:
        return False


# transformers 5.24 renamed the cache argument and output field from ``past_key_values`` to ``cache`` (the old
# name is deprecated, to be removed in 5.40). Both names are read and written here, nowhere else. GPT-NeoX's
# attention module takes its cache as ``layer_past``.
CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def cache_from_kwargs(kwargs: dict) -> object | None:
    """The cache an attention module (or model) was called with, under whichever name this version uses."""
    for name in CACHE_NAMES:
        found = kwargs.get(name)
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=64)
def _cache_argument(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters  # the deprecation decorator keeps the wrapped signature
    return "cache" if "cache" in params else "past_key_values"


def trained_length(model: torch.nn.Module) -> int | None:
    """The context a model was trained to: its text config's ``original_max_position_embeddings`` where it keeps one
    (Phi-3, a model already rope-scaled), else ``max_position_embeddings``; None when the config names neither."""
    config = getattr(model.config, "text_config", None) or model.config
    value = getattr(config, "original_max_position_embeddings", None)
    value = value or getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def cache_kwargs(model: torch.nn.Module, cache: object | None) -> dict:
    """``{name: cache}`` for ``model(...)``, under the name this model's forward declares."""
    return {_cache_argument(type(model)): cache}


def output_cache(out: object) -> object | None:
    """The cache a model output carries (``out.cache`` from 5.24 on, ``out.past_key_values`` before)."""
    fields = getattr(type(out), "__dataclass_fields__", {})
    for name in ("cache", "past_key_values"):
        if name in fields:
            return getattr(out, name)
    return None
