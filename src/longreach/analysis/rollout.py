"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Per layer the attention map, averaged over heads, is mixed with the residual connection and row-normalised,
A'_l = norm(0.5 · mean_h(A_l) + 0.5 · I), and the layers are multiplied: R = A'_{L-1} ··· A'_1 A'_0. Row i of
R is how much each input token reaches token i's output through every path of attention and residual.

The streamed version never holds a T×T matrix: it keeps each layer's queries and keys from one dense forward,
then multiplies a few row vectors (the block-pooled rows and the last token's row) down through the layers,
top layer first, computing each layer's attention a chunk of query rows at a time. Memory is the stored q/k
(the size of a KV cache plus the queries) and (rows × T); time is one attention pass per layer.

Attention *flow* (the paper's max-flow variant) is left out: it solves a max-flow problem per (output, input)
pair on a graph of L·T nodes and L·T² edges, O(T²) max-flow problems each at least O(L·T²) work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import InputError
from .capture import ROW_BYTES, Captured, capture_prefill, head_mean_probs

MAX_TOKENS = 16384  # refused above this unless raised: time grows as T² per layer


def attention_rollout(attentions: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Rollout of full attention maps given layer 0 first, each (T, T) or (H, T, T) (heads are averaged).

    The plain-math path: every map is materialised. ``residual`` is the weight of the identity (0.5 in the paper).
    """
    if not attentions:
        raise InputError("attention rollout needs at least one layer's attention map")
    t = attentions[0].shape[-1]
    eye = torch.eye(t, dtype=torch.float64)
    out = eye.clone()
    for attn in attentions:
        a = attn.double().mean(0) if attn.dim() == 3 else attn.double()
        a = residual * eye + (1 - residual) * a
        out = (a / a.sum(-1, keepdim=True)) @ out
    return out


def pool_rows(tokens: int, block: int) -> Tensor:
    """(n, T) with n = ceil(T / block): row I averages the tokens of block I (the last block may be shorter)."""
    n = math.ceil(tokens / block)
    owner = torch.arange(tokens) // block
    pool = torch.zeros(n, tokens, dtype=torch.float64)
    pool[owner, torch.arange(tokens)] = 1.0
    return pool / pool.sum(-1, keepdim=True)


def pool_columns(x: Tensor, block: int) -> Tensor:
    """(r, T) -> (r, n): the mass each row puts on every block of ``block`` keys (sums, so rows keep their total)."""
    n = math.ceil(x.shape[-1] / block)
    return nn.functional.pad(x, (0, n * block - x.shape[-1])).view(*x.shape[:-1], n, block).sum(-1)


@dataclass
class Rollout:
    tokens: int
    block: int  # tokens per cell of ``matrix`` (1: full resolution)
    matrix: Tensor  # (n, n): mean over the queries of block I of the rollout mass on the keys of block J
    last: Tensor  # (T,): the last token's rollout over every position (it writes the next token)
    layers: list[int]
    residual: float

    def to_dict(self) -> dict:
        """JSON-ready, values to 7 significant digits (fp32 precision)."""
        def digits(x: Tensor) -> list:
            return [digits(row) for row in x] if x.dim() > 1 else [float(f"{v:.7g}") for v in x.tolist()]

        return {"tokens": self.tokens, "block": self.block, "residual": self.residual, "layers": self.layers,
                "matrix": digits(self.matrix), "last": digits(self.last)}


def times_layer(rows: Tensor, cap: Captured, residual: float) -> Tensor:
    """rows (r, T) @ A' for one layer, A' = norm(residual · I + (1 - residual) · mean_h(A)), built a chunk of
    query rows at a time (never (T, T), never (H, T, T))."""
    t, device = cap.q.shape[2], cap.q.device
    out = torch.zeros_like(rows)
    step = max(1, ROW_BYTES // (4 * cap.q.shape[1] * t))
    for lo in range(0, t, step):
        idx = torch.arange(lo, min(lo + step, t), device=device)
        a = (1 - residual) * head_mean_probs(cap, idx).double()  # (r, T)
        a[torch.arange(len(idx), device=device), idx] += residual
        out += rows[:, idx] @ (a / a.sum(-1, keepdim=True).clamp(min=1e-300))
    return out


def rollout(model: nn.Module, input_ids: Tensor, *, size: int = 256, residual: float = 0.5,
            max_tokens: int = MAX_TOKENS, kernel: str = "auto",
            progress: Callable[[int], None] | None = None) -> Rollout:
    """Attention rollout of one prompt: the pooled (at most ``size`` × ``size``) matrix and the last token's row.

    One dense forward stores every layer's q and k (about layers × (query + KV heads) × T × head_dim values);
    prompts longer than ``max_tokens`` are refused, since each layer then costs one T² attention pass.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError(f"rollout takes one prompt, input_ids (1, tokens); got {tuple(input_ids.shape)}")
    if size < 1:
        raise InputError(f"size must be >= 1, got {size}")
    t = int(input_ids.shape[1])
    if t > max_tokens:
        raise InputError(f"{t} tokens is over the rollout limit of {max_tokens}: it stores every layer's queries "
                         f"and keys and runs one {t}² attention pass per layer; raise max_tokens "
                         "(--rollout-max-tokens) if that time and memory are fine")
    captured = capture_prefill(model, input_ids, kernel)
    block = math.ceil(t / size)
    rows = torch.cat([pool_rows(t, block), torch.nn.functional.one_hot(torch.tensor([t - 1]), t).double()])
    rows = rows.to(input_ids.device if not captured else next(iter(captured.values())).q.device)
    layers = sorted(captured)
    for layer in reversed(layers):  # P R = P A'_{L-1} ··· A'_0: the top layer multiplies first
        rows = times_layer(rows, captured.pop(layer), residual)
        if progress is not None:
            progress(layer)
    rows = rows.cpu()
    return Rollout(t, block, pool_columns(rows[:-1], block).float(), rows[-1].float(), layers, residual)
