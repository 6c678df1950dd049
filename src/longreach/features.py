"""Attention features a model uses, found from its config and modules before any forward.

``apply()`` refuses what the kernels do not compute yet (never at the first forward, never with a raw torch
error): a kernel that ignored a feature would silently compute a different attention. Logit softcapping and
learned sinks the kernels compute (``softmax_extras``), and so do the methods that score keys with a softmax of
their own (``stages.SoftmaxExtras``); one that declares ``scores_attention`` (its softmax leaves them out) is
refused on such models.
"""

from __future__ import annotations

from torch import nn


def latent_cache(modules: list[nn.Module]) -> str | None:
    """Whether this model caches a latent instead of per-head keys and values (else None), and what it holds.
    Multi-head latent attention (DeepSeek-V3 in transformers) caches one latent per token (``kv_lora_rank``
    wide, plus the shared rotary key part) and expands per-head keys and values from it at every call: the
    kernels attend the expanded heads exactly (value width != key width included); a press may drop whole
    tokens of the latent (its heads' scores averaged), but a head policy or kvquant, which work per key/value
    head, cannot cut a latent no head owns."""
    for m in modules:
        rank = getattr(m, "kv_lora_rank", None)
        if rank is not None:
            return (f"cache holds one latent per token shared by every head (multi-head latent attention, "
                    f"kv_lora_rank={rank}), not per-head keys and values")
    return None


def softmax_extras(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    """What joins this model's attention softmax besides q.k: a logit softcap (Gemma 2) and learned sink logits
    (GPT-OSS). The kernels compute both, and so does every method scoring keys with a softmax of its own, except
    one that declares ``scores_attention``."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    found = []
    cap = getattr(text, "attn_logit_softcapping", None)
    if cap is not None or any(getattr(m, "attn_logit_softcapping", None) is not None for m in modules):
        found.append(f"logit softcapping (cap={cap}: scores pass through cap * tanh(s / cap))")
    if any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in modules):
        found.append("learned attention-sink logits (one extra logit per head joins each softmax)")
    return found


def sliding_everywhere(model: nn.Module) -> int | None:
    """The window, when every attention layer of ``model`` is a sliding-window layer (Mistral-7B-v0.1 style:
    ``sliding_window`` set and no per-layer types, or every layer type sliding); else None. longreach leaves
    a model's own sliding layers as they are, so on such a model a method would change nothing."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    if not window:
        return None
    types = getattr(text, "layer_types", None)
    if types is None:
        return int(window)
    return int(window) if all(t == "sliding_attention" for t in types) else None


def own_attention_layers(model: nn.Module) -> set[int]:
    """Layers that keep the model's own attention under any method: chunked local attention (Llama 4: a query
    sees only its own chunk of ``attention_chunk_size`` keys). Like sliding layers, they are local by design;
    unlike them, no Selection (sinks + window + blocks) spells their mask, so transformers' SDPA runs them."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    types = getattr(text, "layer_types", None) or []
    return {i for i, t in enumerate(types) if t == "chunked_attention"}

