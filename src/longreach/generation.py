"""Greedy decoding with the prefill and decode phases timed apart (what users pay for each)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .cache.compressed import cache_bytes
from .cache.growing import growing_cache
from .compat import cache_kwargs, output_cache
from .errors import InputError
from .position.frozen import planned_length


@dataclass
class Greedy:
    tokens: list[int]  # generated ids, the EOS included when it came
    prefill_s: float
    decode_s: float
    cache: object  # the transformers cache after the last step
    prompt_kv_bytes: int | None = None  # bytes the cache held right after the prompt (after any press)


def eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return {ids} if isinstance(ids, int) else set(ids or [])


@torch.no_grad()
def greedy(model, ids: dict, max_new_tokens: int, eos: set[int], hold_last: bool = False,
           chunk: int | None = None, cache: str = "growing") -> Greedy:
    """Prefill ``ids`` (batch of one), then one token at a time until EOS or ``max_new_tokens``.

    ``hold_last`` feeds the prompt's last token as a decode step after the prefill: with a press, the
    prefill's last query would otherwise still see every key, and the first answer token with it.
    ``chunk`` prefills that many tokens per forward, so activations stay O(chunk) instead of O(prompt).
    ``cache``: ``growing`` appends decode tokens in place (``cache.growing``); ``dynamic`` is transformers'
    default cache, which copies the whole cache every step (the baseline ``bench e2e`` compares with).
    """
    if chunk is not None and chunk < 1:
        raise InputError(f"chunk must be >= 1 token, got {chunk}")
    if cache not in ("growing", "dynamic"):
        raise InputError(f"cache must be 'growing' or 'dynamic', got {cache!r}")
    start = time.perf_counter()
    n = ids["input_ids"].shape[1]
    held = 1 if hold_last and n > 1 else 0
    step_size = chunk or n
    past, out = (growing_cache(model.config) if cache == "growing" else None), None
    with planned_length(n):  # a length-dependent RoPE picks its frequencies for the whole prompt
        for lo in range(0, n - held, step_size):
            hi = min(lo + step_size, n - held)
            out = model(input_ids=ids["input_ids"][:, lo:hi], attention_mask=ids["attention_mask"][:, :hi],
                        use_cache=True, logits_to_keep=1, **cache_kwargs(model, past))
            past = output_cache(out)
    if held:
        out = model(input_ids=ids["input_ids"][:, -1:], attention_mask=ids["attention_mask"],
                    use_cache=True, **cache_kwargs(model, past))
    prefill = time.perf_counter() - start
    past, token = output_cache(out), out.logits[:, -1:].argmax(-1)
    prompt_bytes = cache_bytes(past)
    new, mask = [int(token)], ids["attention_mask"]
    start = time.perf_counter()
    while len(new) < max_new_tokens and new[-1] not in eos:
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=-1)
        step = model(input_ids=token, attention_mask=mask, use_cache=True, **cache_kwargs(model, past))
        past, token = output_cache(step), step.logits[:, -1:].argmax(-1)
        new.append(int(token))
    return Greedy(new, prefill, time.perf_counter() - start, past, prompt_bytes)
