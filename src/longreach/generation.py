"""``longreach.generate``: greedy decoding with the prefill and decode phases timed apart (what users pay
for each). It runs the same path as ``model.generate()`` under ``apply``: the attention runtime grows the
cache in place and holds the prompt's last token back for presses, so both give the same tokens and the
same cache bytes (tests/test_generation.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .cache.compressed import cache_bytes
from .cache.growing import growing_cache
from .compat import cache_kwargs, output_cache
from .errors import InputError
from .hf import Handle, applied
from .position.bucketruns import BucketRuns, running
from .position.frozen import planned_length


@dataclass
class Generation:
    tokens: list[int]  # generated ids, the EOS included when it came
    prefill_s: float
    decode_s: float
    cache: object  # the transformers cache after the last step
    prompt_kv_bytes: int | None = None  # bytes of the tokens cached right after the prompt (after any press)
    # per generated token, its probability minus the runner-up's: a small lead is a near-tie that any change to
    # attention can flip (docs/evaluation.md, "Near-ties")
    leads: list[float] = field(default_factory=list)


def prefill_chunks(module, input_ids: Tensor, chunk: int | None, cache: object | None = None,
                   attention_mask: Tensor | None = None, **forward: object
                   ) -> Iterator[tuple[int, int, object, object]]:
    """Feed ``input_ids`` (1, n) through ``module`` (a model or its decoder) ``chunk`` tokens per forward, with
    the cache; yields ``(lo, hi, output, cache)`` per chunk. Activations stay O(chunk), and a length-dependent RoPE
    picks its frequencies once for the whole text (``planned_length``)."""
    n = input_ids.shape[1]
    step = chunk or n
    with planned_length(n):
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            mask = {} if attention_mask is None else {"attention_mask": attention_mask[:, :hi]}
            out = module(input_ids=input_ids[:, lo:hi], use_cache=True, **mask, **forward,
                         **cache_kwargs(module, cache))
            cache = output_cache(out)
            yield lo, hi, out, cache


def eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return {ids} if isinstance(ids, int) else set(ids or [])


def as_batch(ids: dict | Tensor) -> dict:
    """A tokenizer's output as it is, or a tensor of ids ((n,) or (1, n)) with an all-ones attention mask."""
    if isinstance(ids, Tensor):
        ids = {"input_ids": ids.unsqueeze(0) if ids.dim() == 1 else ids}
    if not hasattr(ids, "keys") or "input_ids" not in ids:
        raise InputError(f"ids must be a tokenizer's output (with input_ids) or a tensor of token ids, got "
                         f"{type(ids).__name__}")
    input_ids = ids["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise InputError(f"generate takes one non-empty prompt (token ids shaped (n,) or (1, n)), got shape "
                         f"{tuple(input_ids.shape)}")
    if ids.get("attention_mask") is None:
        ids = {**ids, "attention_mask": torch.ones_like(input_ids)}
    return ids


@torch.no_grad()
def generate(model, ids: dict | Tensor, max_new_tokens: int, eos: set[int] | None = None, chunk: int | None = None,
             cache: str = "growing") -> Generation:
    """Prefill ``ids`` (a tokenizer's output, or a tensor of token ids; batch of one), then one token at a time
    until EOS or ``max_new_tokens``.

    ``chunk`` prefills that many tokens per forward, so activations stay O(chunk) instead of O(prompt).
    ``cache``: ``growing`` appends decode tokens in place (``cache.growing``); ``dynamic`` is transformers'
    default cache, which copies the whole cache every step (the baseline ``bench e2e`` compares with; under
    ``apply`` the runtime makes its layers grow in place too).

    Under ``buckets-runs`` the prompt runs once per RoPE base, as a batch, and every step feeds each run the token
    of their combined logits; the cache (and its bytes) holds every run.
    """
    if chunk is not None and chunk < 1:
        raise InputError(f"chunk must be >= 1 token, got {chunk}")
    if cache not in ("growing", "dynamic"):
        raise InputError(f"cache must be 'growing' or 'dynamic', got {cache!r}")
    ids = as_batch(ids)
    eos = eos or set()
    handle = applied(model)
    parallel = handle.parallel if handle is not None else None  # buckets-runs: the prompt once per RoPE base
    n = parallel.runs if parallel is not None else 1
    if n > 1:
        ids = {key: ids[key].expand(n, -1) for key in ("input_ids", "attention_mask")}
    with running(n):
        return _generate(model, ids, max_new_tokens, eos, chunk, cache, handle, parallel)


def _generate(model, ids: dict, max_new_tokens: int, eos: set[int], chunk: int | None, cache: str,
              handle: Handle | None, runs: BucketRuns | None) -> Generation:
    procedure = handle.procedure if handle is not None else None  # homer: builds the cache itself
    if procedure is not None and chunk is not None:
        raise InputError(f"{procedure.name} prefills in its own chunks (its chunk= parameter): drop chunk / --chunk")
    start = time.perf_counter()
    # the cache will be given the prompt and every new token but the last: allocated once at that size
    expected = ids["input_ids"].shape[1] + max_new_tokens - 1 if procedure is None else None
    past = growing_cache(model.config, expected) if cache == "growing" or procedure is not None else None
    if procedure is not None:
        done = procedure.prefill(model, ids["input_ids"], past)
        logits, mask = done.logits, ids["attention_mask"].new_ones(1, done.length)  # the cache's rows, not the prompt's
    else:
        *_, (_, _, out, past) = prefill_chunks(model, ids["input_ids"], chunk, past, ids["attention_mask"],
                                               logits_to_keep=1)
        logits, mask = out.logits, ids["attention_mask"]
    prefill = time.perf_counter() - start
    token, lead = next_token(logits, runs)
    prompt_bytes = cache_bytes(past, room=False)  # the prompt's tokens, not the room reserved for new ones
    new, leads = [int(token[0])], [lead]
    start = time.perf_counter()
    while len(new) < max_new_tokens and new[-1] not in eos:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        step = model(input_ids=token, attention_mask=mask, use_cache=True, **cache_kwargs(model, past))
        past = output_cache(step)
        token, lead = next_token(step.logits, runs)
        new.append(int(token[0]))
        leads.append(lead)
    return Generation(new, prefill, time.perf_counter() - start, past, prompt_bytes, leads)


def next_token(logits: Tensor, runs: BucketRuns | None) -> tuple[Tensor, float]:
    """Greedy: (B, 1) ids from the last position of ``logits`` (B, T, V), and the chosen token's probability
    minus the runner-up's (of the first row; parallel runs (B = runs) all get the token of their combined
    logits, and the lead is that distribution's)."""
    last = logits[:, -1]
    scores = last[0] if runs is None else runs.combine(last)
    top = scores.float().softmax(-1).topk(2).values
    token = scores.argmax().view(1, 1).expand(last.shape[0], 1)
    return token, float(top[0] - top[1])
