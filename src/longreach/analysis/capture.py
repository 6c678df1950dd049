"""Real attention probabilities for the analyses, read through the runtime's observer (no transformers internals).

Under ``apply(model, "dense")`` every attention call hands the observer its post-RoPE queries and keys; the
probabilities are then recomputed a few query rows at a time with the same softmax the methods score with,
so no analysis needs ``output_attentions`` (eager attention, one (H, T, T) tensor per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..hf import apply
from ..methods.scoring import causal_probs
from ..stages import PLAIN, SoftmaxExtras

ROW_BYTES = 64 * 2**20  # attention probabilities materialised per chunk of query rows


@dataclass
class Captured:
    """One attention call of one layer: q (1, Hq, Tq, D), k (1, Hkv, Tk, D), as the kernel saw them."""

    q: Tensor
    k: Tensor
    scale: float
    window: int | None  # the model's own sliding window on this layer
    key_mask: Tensor | None
    extras: SoftmaxExtras = PLAIN  # the model's softcap and sink logits: its softmax, not plain softmax(q.k)


def head_probs(cap: Captured, rows: Tensor | None = None) -> Tensor:
    """Softmax of the chosen query rows over the keys, one row per query head: (Hq, R, Tk), fp32."""
    return causal_probs(cap.q, cap.k, cap.scale, rows, cap.key_mask, cap.window, cap.extras).flatten(1, 2)[0]


def head_mean_probs(cap: Captured, rows: Tensor) -> Tensor:
    """The chosen query rows' attention averaged over query heads: (R, Tk), fp32."""
    return causal_probs(cap.q, cap.k, cap.scale, rows, cap.key_mask, cap.window, cap.extras).mean(dim=(1, 2))[0]


def n_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(getattr(config, "text_config", None) or config, "num_hidden_layers", 0))


def check_all_layers(model: nn.Module, seen: set[int]) -> None:
    expected = set(range(n_layers(model)))
    if expected and seen != expected:
        missing = sorted(expected - seen)
        raise UnsupportedModelError(f"{type(model).__name__}: layers {missing} run the model's own attention "
                                    "(e.g. chunked local attention), which longreach cannot observe")


def capture_prefill(model: nn.Module, input_ids: Tensor, kernel: str = "auto") -> dict[int, Captured]:
    """Every layer's queries and keys from one dense forward of ``input_ids`` (no cache)."""
    captured: dict[int, Captured] = {}

    def observe(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, sliding: int | None,
                key_mask: Tensor | None) -> None:
        captured[layer] = Captured(q.detach(), k.detach(), scale, sliding, key_mask, handle.softmax_extras(layer))

    with torch.no_grad(), apply(model, "dense", kernel=kernel, track_density=False) as handle:
        handle.observer = observe
        model(input_ids=input_ids.to(model.device), use_cache=False, logits_to_keep=1)
    check_all_layers(model, set(captured))
    return captured
