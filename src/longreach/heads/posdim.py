"""Find each layer's positional q/k dimensions on a real model: what ``posdim:file=...`` scales.

One dense forward over a prose probe; an observer un-rotates every global layer's queries and keys (each token
by its own position) and scores them with ``position.posdim.position_scores`` (|rank correlation| of a
dimension's value with position). The model's own sliding-window layers (Gemma 3's local layers, their own
RoPE) score 0: ``posdim`` leaves them alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import InputError, UnsupportedModelError
from ..position import rerotate, rope_info
from ..position.posdim import PositionDims, model_shape, position_scores
from ..position.rotary import nope_layers
from .profile import model_name


class _Scorer:
    """Observer for ``Handle.observer``: each global layer's score, q heads and k heads weighing alike."""

    def __init__(self, layers: int, head_dim: int, skip: int, inv_freq: Tensor, no_rope: set[int]) -> None:
        self.skip, self.inv_freq, self.no_rope = skip, inv_freq, no_rope
        self.scores = torch.zeros(layers, head_dim, dtype=torch.float64)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, sliding: int | None,
                 key_mask: Tensor | None) -> None:
        if sliding is not None or layer >= self.scores.shape[0] or q.shape[-1] != self.scores.shape[1]:
            return
        pos = torch.arange(k.shape[2], device=k.device)
        if layer in self.no_rope:  # a NoPE layer's q/k were never rotated
            q0, k0 = q, k
        else:
            q0 = rerotate(q, -pos[-q.shape[2]:], self.inv_freq)
            k0 = rerotate(k, -pos, self.inv_freq)
        self.scores[layer] = ((position_scores(q0, self.skip) + position_scores(k0, self.skip)) / 2).cpu()


@torch.no_grad()
def find_position_dims(model: nn.Module, tokenizer, text: str, length: int = 1024, skip: int = 4) -> PositionDims:
    """Score every layer's head dims on the first ``length`` tokens of ``text`` (one dense forward)."""
    from ..hf import apply
    from ..version import __version__

    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:length]
    if len(ids) < min(length, skip + 16):
        raise InputError(f"the probe text has {len(ids)} tokens; give at least {min(length, skip + 16)}")
    layers, head_dim = model_shape(model)
    rope = rope_info(model)
    if rope.interleaved:
        raise UnsupportedModelError(f"{type(model).__name__} pairs rotary dims (2i, 2i+1): position dims are found "
                                    "and scaled in half-split order, which this model does not use")
    scorer = _Scorer(layers, head_dim, skip, rope.inv_freq, nope_layers(model))
    with apply(model, "dense", track_density=False) as handle:
        handle.observer = scorer
        model(input_ids=torch.tensor([ids], device=model.device), use_cache=False, logits_to_keep=1)
    probe = {"tokens": len(ids), "skip": skip,
             "score": "|Spearman correlation| of each un-rotated q/k head dim with position, mean over heads; "
                      "sliding-window layers 0"}
    scores = [[round(s, 4) for s in row] for row in scorer.scores.tolist()]
    return PositionDims(model_name(model), layers, head_dim, scores, probe, __version__)
