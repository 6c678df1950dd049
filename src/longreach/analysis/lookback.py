"""Lookback ratios (Chuang et al. 2024, "Lookback Lens: Detecting and Mitigating Contextual Hallucinations in
LLMs Using Only Attention Maps").

For a generated token and one (layer, head), the lookback ratio is the head's mean attention on the N context
(prompt) tokens over that plus its mean attention on the tokens generated so far:

    ratio = mean(attn[:N]) / (mean(attn[:N]) + mean(attn[N:]))

A head that keeps reading the context scores near 1; one that reads mostly its own answer scores near 0. A
span's features are the per-(layer, head) ratios averaged over the span's tokens, and a linear detector on
them predicts whether the span is grounded in the context.

Here each generated token is read as a *query*: during greedy decoding every generated token y_t is fed back
once (the last one too), and its query attends the N prompt tokens and y_1 .. y_t (itself included), so
"generated" is never empty. Only one query row per layer exists per step, so nothing T×T is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..compat import cache_kwargs, output_cache
from ..errors import InputError
from ..hf import apply
from .capture import Captured, check_all_layers, head_probs


def lookback_ratio(probs: Tensor, n_context: int, offset: int = 0) -> Tensor:
    """(..., Tk) attention rows -> (...) lookback ratios; positions 0 .. n_context - 1 are the context.

    Key j of ``probs`` sits at position ``offset + j``: a sliding-window layer's cache holds only the last keys,
    and the positions before them (attention 0) still count in the means.
    """
    seen = offset + probs.shape[-1]
    if not 0 < n_context < seen:
        raise InputError(f"need context and generated tokens: {n_context} context tokens of {seen}")
    split = max(0, n_context - offset)
    on_context = probs[..., :split].sum(-1) / n_context
    on_new = probs[..., split:].sum(-1) / (seen - n_context)
    return on_context / (on_context + on_new).clamp(min=1e-30)


def span_features(ratios: Tensor, start: int = 0, end: int | None = None) -> Tensor:
    """(steps, layers, heads) ratios -> (layers · heads,) features: the mean over generated tokens start..end."""
    span = ratios[start:end]
    if len(span) == 0:
        raise InputError(f"empty span {start}:{end} of {len(ratios)} generated tokens")
    return span.mean(0).flatten()


@dataclass
class LookbackRun:
    prompt_tokens: int
    tokens: list[int]  # the greedy continuation (EOS included when it came)
    ratios: Tensor  # (len(tokens), layers, query heads)
    layers: list[int]

    def features(self, start: int = 0, end: int | None = None) -> Tensor:
        return span_features(self.ratios, start, end)

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "tokens": self.tokens, "layers": self.layers,
                "heads": int(self.ratios.shape[2]), "ratios": self.ratios.tolist()}


@torch.no_grad()
def lookback_ratios(model: nn.Module, input_ids: Tensor, max_new_tokens: int = 32, eos: set[int] | None = None,
                    kernel: str = "auto") -> LookbackRun:
    """Greedy-decode up to ``max_new_tokens`` after ``input_ids`` (1, N) densely, and record every generated
    token's lookback ratio per (layer, query head)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise InputError(f"lookback takes one prompt, input_ids (1, tokens); got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    n_context, eos = int(input_ids.shape[1]), eos or set()
    step: dict[int, Tensor] = {}
    recording = False

    def observe(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, sliding: int | None,
                key_mask: Tensor | None) -> None:
        if recording:  # one query row: (Hq, 1, Tk) -> (Hq,); the query is token n_context + len(tokens) - 1
            probs = head_probs(Captured(q, k, scale, sliding, key_mask, handle.softmax_extras(layer)))[:, 0]
            step[layer] = lookback_ratio(probs, n_context, n_context + len(tokens) - k.shape[2])

    tokens: list[int] = []
    ratios: list[Tensor] = []
    ids = input_ids.to(model.device)
    with apply(model, "dense", kernel=kernel, track_density=False) as handle:
        handle.observer = observe
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, None))
        recording = True
        while True:
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(int(token))
            step.clear()
            out = model(input_ids=token, use_cache=True, logits_to_keep=1, **cache_kwargs(model, output_cache(out)))
            if not ratios:
                check_all_layers(model, set(step))
            ratios.append(torch.stack([step[layer] for layer in sorted(step)]).float().cpu())
            if len(tokens) >= max_new_tokens or tokens[-1] in eos:
                break
    return LookbackRun(n_context, tokens, torch.stack(ratios), sorted(step))
