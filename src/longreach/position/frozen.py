"""One set of RoPE frequencies per sequence, for the rope types whose frequencies follow the length.

transformers' ``longrope`` picks short or long factors, and ``dynamic`` grows the base, from the largest
position of the *current* forward. With a KV cache that breaks RoPE's premise (one rotation per
position for queries and keys alike): an 8,192-token prompt is encoded with LongRoPE's short factors,
and the first decode step (position 8,192) switches to the long ones, so the new query meets keys
rotated with other frequencies (passkey 0/5 at exactly the trained length, measured). vLLM fixes the
choice at start-up; Phi-3 in transformers discards the cache at the switch. Here the choice is made
once, when a sequence starts (its first forward has position 0), for the sequence's planned length,
and kept for its every later chunk and decode step.

The planned length is the first forward's length unless a caller that prefills in chunks announces the
whole prompt with ``planned_length(n)`` (``greedy`` and the perplexity task do).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor, nn

_PLANNED: ContextVar[int] = ContextVar("longreach_planned_length", default=0)

LENGTH_DEPENDENT = ("longrope", "dynamic")  # transformers rope types that re-pick frequencies per forward


@contextlib.contextmanager
def planned_length(tokens: int) -> Iterator[None]:
    """Sequences started inside pick their frequencies for at least ``tokens`` tokens."""
    reset = _PLANNED.set(int(tokens))
    try:
        yield
    finally:
        _PLANNED.reset(reset)


class PerSequenceFrequencies(nn.Module):
    """Wraps a length-dependent transformers rotary module: frequencies chosen at a sequence's start."""

    def __init__(self, inner: nn.Module, trained: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        # longrope scales cos/sin by its attention factor at every length; inside the trained length the model
        # must stay as it was (short factors are 1), so that factor applies only to sequences planned past it
        self.trained = trained
        self.past_scaling = {name: value for name, value in vars(inner).items()
                             if name.endswith("attention_scaling")}  # Gemma 3: one per layer type
        self._chosen: set[object] = set()  # layer types (None: the model's only one) with frequencies fixed
        decorated = type(inner).forward  # transformers' per-call update is a decorator: the plain forward
        self._plain = inspect.unwrap(decorated) if hasattr(decorated, "__wrapped__") else None

    def forward(self, x: Tensor, position_ids: Tensor, *args: object, **kwargs: object) -> tuple[Tensor, Tensor]:
        key = args[0] if args else kwargs.get("layer_type")
        if key not in self._chosen or int(position_ids.min()) == 0:
            length = max(_PLANNED.get(), int(position_ids.max()) + 1)
            last = torch.full((1, 1), length - 1, dtype=position_ids.dtype, device=position_ids.device)
            self.inner(x[:, :1], last, *args, **kwargs)  # transformers' own update picks for `length`
            if self.trained is not None:
                for name, value in self.past_scaling.items():
                    setattr(self.inner, name, 1.0 if length <= self.trained else value)
            self._chosen.add(key)
        if self._plain is None:  # a rotary module that never re-picks: nothing to hold
            return self.inner(x, position_ids, *args, **kwargs)
        with torch.no_grad():  # as transformers runs it (no_grad is one of the decorators unwrapped)
            return self._plain(self.inner, x, position_ids, *args, **kwargs)
