"""``longreach.homer_generate``: HOMER (hierarchical context merging) on one prompt, the paper's interface.

The prompt comes as the paper gives it, ``(prefix, context, question)`` (strings or token ids), or whole (ids,
a tokenizer's output or a string) with the shared prefix and suffix taken as the first and last ``prefix`` /
``suffix`` tokens. It is the same run as ``with apply(model, "homer:..."): generate(model, ids, ...)`` (what
``longreach eval --methods homer`` does); this function only fills in the prefix and suffix lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import InputError
from .generation import Generation, eos_ids, generate
from .hf import apply
from .procedure import Homer


def homer_generate(model: nn.Module, tokenizer: object, prompt: object, max_new_tokens: int = 32, *,
                   chunk: int | None = None, warmup: int | None = None, final: int = 1, prefix: int = 64,
                   suffix: int = 64, position: str | None = None, add_special_tokens: bool = True,
                   calibrate: int = 0) -> Generation:
    """Greedy generation with HOMER's prefill; ``Generation.tokens`` are the new ids (decode with the tokenizer).

    ``prompt``: ``(prefix, context, question)`` (each a string or a (1, n) id tensor; their lengths set the
    shared prefix and suffix), or the whole prompt (a string, a (1, n) id tensor or a tokenizer's output) with
    ``prefix``/``suffix`` tokens shared. ``chunk``: longest chunk and final cache length (default half the trained
    window). ``position``: a rope scaling spec to stack (e.g. ``"yarn:factor=2"``). ``calibrate=1``: rank tokens by
    the calibrated logits (docs/homer.md). ``tokenizer`` may be None for id inputs (then generation stops only at
    ``max_new_tokens``).
    """
    if isinstance(prompt, tuple):
        if len(prompt) != 3:
            raise InputError("homer_generate: give the prompt as (prefix, context, question) or whole")
        pieces = [_ids(tokenizer, p, add_special_tokens and i == 0) for i, p in enumerate(prompt)]
        ids = torch.cat([p.to(pieces[1].device) for p in pieces], dim=1)
        prefix, suffix = pieces[0].shape[1], pieces[2].shape[1]
    else:
        ids = _ids(tokenizer, prompt, add_special_tokens)
    method = Homer(chunk=chunk, prefix=prefix, suffix=suffix, warmup=warmup, final=final, calibrate=calibrate)
    spec = str(method) if position is None else f"{method}+{position}"
    device = next(model.parameters()).device
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
    eos = eos_ids(model, tokenizer) if tokenizer is not None else set()
    with apply(model, spec):
        return generate(model, inputs, max_new_tokens, eos)


def _ids(tokenizer: object, piece: object, special: bool) -> Tensor:
    """A (1, n) id tensor from a string (tokenized), a tokenizer's output or ids."""
    if isinstance(piece, str):
        if tokenizer is None:
            raise InputError("homer_generate: pass a tokenizer to give the prompt as text")
        return tokenizer(piece, return_tensors="pt", add_special_tokens=special)["input_ids"]  # type: ignore[operator]
    if isinstance(piece, dict) or hasattr(piece, "keys"):
        piece = piece["input_ids"]  # type: ignore[index]
    if not isinstance(piece, Tensor):
        raise InputError(f"homer_generate: a prompt piece must be text or token ids, got {type(piece).__name__}")
    return piece if piece.dim() == 2 else piece.unsqueeze(0)
