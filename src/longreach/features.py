"""Attention features a model uses, found from its config and modules before any forward.

``apply()`` refuses what the kernels do not compute yet (never at the first forward, never with a raw torch
error): a kernel that ignored a feature would silently compute a different attention. Logit softcapping and
learned sinks the kernels compute (``softmax_extras``); methods that score keys with a softmax of their own
are refused on such models until that softmax holds them too.
"""

from __future__ import annotations

from torch import nn


def unsupported_features(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    """One reason per attention feature of ``model`` that the kernels lack (empty: all supported)."""
    found = []
    for m in modules:
        v_dim, qk_dim = getattr(m, "v_head_dim", None), getattr(m, "qk_head_dim", None)
        if v_dim is not None and qk_dim is not None and v_dim != qk_dim:
            found.append(f"a value head dim ({v_dim}) different from the query/key head dim ({qk_dim}), as in "
                         "multi-head latent attention")
            break
    return found


def softmax_extras(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    """What joins this model's attention softmax besides q.k: a logit softcap (Gemma 2) and learned sink logits
    (GPT-OSS). The kernels compute both; a method scoring keys with its own softmax does not."""
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
