"""The parts of a Llama-like causal LM that a prefill procedure drives itself, layer by layer.

HOMER runs chunks through different layer ranges and prunes rows between layers, which no single model forward
can express; so it calls the model's own modules (embeddings, each decoder layer with its rotary embeddings and a
causal mask, the final norm, the LM head) in its own order. That is only as exact as our knowledge of the
family's layer contract, so it is limited to the families whose decoder layer we have checked:
``transformers``' Llama, Mistral, Mixtral, Qwen2, Qwen3 and Qwen3-MoE (every layer full attention; Qwen3's
per-head query norm is applied where queries are recomputed). Nothing here imports transformers: the
model object is read by its attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..compat import cache_kwargs
from ..errors import UnsupportedModelError

SUPPORTED = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe")
# what to use instead: the position methods reach past the trained window on every RoPE family
ALTERNATIVE = ("for prompts past the trained window use a position method instead (selfextend or yarn, where "
               "docs/models.md shows the family takes it)")
# attention implementations that read ``attention_mask=None`` as causal (eager gets an explicit additive mask)
CAUSAL_WITHOUT_MASK = ("sdpa", "longreach", "flash_attention_2", "flash_attention_3")


def unsupported(model: nn.Module) -> str | None:
    """Why this model's decoder cannot be driven layer by layer; None when it can."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return (f"{type(model).__name__} ({kind}) is not a family whose decoder layers it drives; supported: "
                f"{', '.join(SUPPORTED)} (Llama-like layers: pre-norm attention + MLP, RoPE, no softcap or sinks); "
                f"{ALTERNATIVE}")
    base = model.get_decoder()
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, a)]
    if missing or model.get_output_embeddings() is None:
        return (f"{type(model).__name__} has no {', '.join(missing) or 'output embeddings'} where {kind} models do; "
                f"{ALTERNATIVE}")
    types = getattr(config, "layer_types", None) or []
    window = [getattr(layer.self_attn, "sliding_window", getattr(config, "sliding_window", None))
              for layer in base.layers]
    if any(t != "full_attention" for t in types) or any(window):
        return (f"{type(model).__name__} has sliding-window layers; chunks are merged across the whole context, "
                f"which a window would cut (every layer must be full attention); {ALTERNATIVE}")
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl != "eager" and impl not in CAUSAL_WITHOUT_MASK:
        return (f"attention implementation '{impl}' is not one of eager, {', '.join(CAUSAL_WITHOUT_MASK)}; load the "
                "model with attn_implementation='sdpa' or 'eager'")
    return None


class Capture:
    """Stands in for a transformers cache during one layer call: keeps the layer's new keys and values and hands
    them back unchanged, so the layer attends exactly its own chunk."""

    keys: Tensor | None = None
    values: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: object, **kwargs: object
               ) -> tuple[Tensor, Tensor]:
        self.keys, self.values = key_states, value_states
        return key_states, value_states


@dataclass(frozen=True, eq=False)
class Decoder:
    model: nn.Module

    @classmethod
    def of(cls, model: nn.Module, who: str) -> Decoder:
        problem = unsupported(model)
        if problem:
            raise UnsupportedModelError(f"{who}: {problem}")
        return cls(model)

    @property
    def base(self) -> nn.Module:
        return self.model.get_decoder()

    @property
    def n_layers(self) -> int:
        return len(self.base.layers)

    def embed(self, ids: Tensor) -> Tensor:
        """(T,) token ids -> (1, T, hidden)."""
        return self.base.embed_tokens(ids.unsqueeze(0))

    def rope(self, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (1, T, D) at ``positions`` (T,): the model's own rotary module (a rope type swapped in by
        ``apply``, e.g. yarn, included)."""
        return self.base.rotary_emb(hidden, position_ids=positions.unsqueeze(0))

    def mask(self, hidden: Tensor) -> Tensor | None:
        """The causal mask a layer call needs: None where the implementation reads None as causal."""
        if getattr(self.model.config, "_attn_implementation", None) != "eager":
            return None
        t = hidden.shape[1]
        upper = torch.ones(t, t, dtype=torch.bool, device=hidden.device).triu(1)
        return torch.zeros(t, t, dtype=hidden.dtype, device=hidden.device).masked_fill(
            upper, torch.finfo(hidden.dtype).min)[None, None]

    def layer(self, i: int, hidden: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor]
              ) -> tuple[Tensor, Tensor, Tensor]:
        """Run decoder layer ``i`` on one chunk (rows in causal order): (hidden out, keys, values), keys rotated
        at ``positions``."""
        layer, capture = self.base.layers[i], Capture()
        out = layer(hidden, attention_mask=self.mask(hidden), position_ids=positions.unsqueeze(0),
                    position_embeddings=rope, use_cache=True, **cache_kwargs(layer, capture))
        out = out[0] if isinstance(out, tuple) else out
        assert capture.keys is not None and capture.values is not None
        return out, capture.keys, capture.values

    def queries(self, i: int, hidden_in: Tensor, rope: tuple[Tensor, Tensor], rows: Tensor) -> Tensor:
        """Layer ``i``'s rotated queries of ``rows`` (R,), (1, Hq, R, D): recomputed from the layer's input the way
        the layer computes them (pre-norm, q projection, Qwen3's per-head query norm, RoPE)."""
        attn = self.base.layers[i].self_attn
        x = self.base.layers[i].input_layernorm(hidden_in[:, rows])
        q = attn.q_proj(x).view(1, rows.numel(), -1, attn.head_dim)  # (1, R, Hq, D)
        norm = getattr(attn, "q_norm", None)  # Qwen3: RMSNorm over each head's dims, before RoPE
        q = (q if norm is None else norm(q)).transpose(1, 2)  # (1, Hq, R, D)
        cos, sin = (r[:, rows].unsqueeze(1) for r in rope)  # (1, 1, R, D)
        half = q.shape[-1] // 2
        rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        return q * cos + rotated * sin

    def attention_logits(self, i: int, hidden_in: Tensor, keys: Tensor, rope: tuple[Tensor, Tensor], rows: Tensor
                         ) -> Tensor:
        """Scaled attention logits of ``rows`` (R,) of layer ``i`` over all its keys, in float32: (Hq, R, T), -inf
        where a key comes after the row (causal in row order)."""
        attn = self.base.layers[i].self_attn
        q = self.queries(i, hidden_in, rope, rows).float()
        k = keys.float().repeat_interleave(attn.num_key_value_groups, dim=1)  # (1, Hq, T, D)
        scores = (q @ k.transpose(-1, -2))[0].mul_(attn.scaling)  # (Hq, R, T), in place: one such tensor at a time
        future = torch.arange(k.shape[2], device=k.device)[None, :] > rows[:, None]
        return scores.masked_fill_(future, float("-inf"))

    def attention_from_last(self, i: int, hidden_in: Tensor, keys: Tensor, rope: tuple[Tensor, Tensor], n: int
                            ) -> Tensor:
        """Softmax attention probabilities of the last ``n`` rows of layer ``i`` over all its keys, in float32:
        (Hq, n, T), causal among those rows."""
        t = keys.shape[2]
        return self.attention_logits(i, hidden_in, keys, rope, torch.arange(t - n, t, device=keys.device)
                                     ).softmax(dim=-1)

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits of the last row, (1, 1, V)."""
        return self.model.get_output_embeddings()(self.base.norm(hidden[:, -1:]))
