"""Run one sample on a model with a method applied, and measure what users pay for it.

Generation is a plain greedy loop (prefill, then one token at a time, stopping at EOS) so the
prefill and decode phases are timed separately; perplexity scores every position in one
forward pass, with the vocabulary projection chunked so 8k-token logits never sit in memory at once.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import cache_bytes
from ..generation import eos_ids, prefill_chunks
from ..generation import generate as generate_ids
from ..plan import MiB, peak_resident_bytes, reset_peak_resident
from . import sharing
from .tasks import Sample, Task

WORD_END = re.compile(r"[\w-]$")  # an answer ending here could still go on
LOGIT_CHUNK = 1024  # positions per vocabulary projection in perplexity


def prompt_sha(sample: Sample) -> str:
    return hashlib.sha256(sample.prompt.encode()).hexdigest()[:12]


def generate(model, tokenizer, sample: Sample, chunk: int | None = None,
             score: Callable[[str], float] | None = None) -> dict:
    ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=not sample.chat).to(model.device)
    run = generate_ids(model, ids, sample.max_new_tokens, eos_ids(model, tokenizer), chunk)
    text = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True).strip()  # noqa: E731
    return {
        "prediction": text(run.tokens),
        "answer_lead": None if score is None else answer_lead(run.tokens, run.leads, text, score),
        "tokens": ids["input_ids"].shape[1],
        "prefill_s": run.prefill_s,
        "decode_s": run.decode_s,
        "decode_tokens": len(run.tokens) - 1,
        "kv_bytes": cache_bytes(run.cache),
        "kv_bytes_prompt": run.prompt_kv_bytes,
    }


def answer_lead(tokens: list[int], leads: list[float], text: Callable[[list[int]], str],
                score: Callable[[str], float]) -> float | None:
    """The smallest lead (chosen token's probability minus the runner-up's) among the generated tokens up to the
    one with which the answer reached its final score, and the token after it when the text then ends inside a
    word (a digit or letter: that token decided whether the answer ended there, "42" then "." against "423");
    None when it scored nothing. A small value marks a near-tie: the greedy answer hung on that token, and a
    small change to attention could have flipped it."""
    final = score(text(tokens))
    if not final > 0:
        return None
    n = next((n for n in range(1, len(tokens)) if score(text(tokens[:n])) >= final), len(tokens))
    if n < len(tokens) and WORD_END.search(text(tokens[:n])):
        n += 1
    return round(min(leads[:n]), 4)


@torch.no_grad()
def perplexity(model, sample: Sample, buckets: int, chunk: int | None = None) -> dict:
    """Next-token loss at every position, averaged per equal-width position bucket.

    With ``chunk`` the text goes through the decoder that many tokens at a time (with the cache), so
    hidden states and logits never exist for the whole text at once.
    """
    ids = torch.tensor([sample.meta["ids"]], device=model.device)
    start = time.perf_counter()
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    losses, cache = [], None
    for lo, hi, out, cache in prefill_chunks(model.get_decoder(), ids, chunk):  # noqa: B007 (cache: read below)
        targets = ids[0, lo + 1:hi + 1]
        hidden = out.last_hidden_state[0][: len(targets)]  # the last token has nothing to predict
        for h0 in range(0, hidden.shape[0], LOGIT_CHUNK):
            logits = head(hidden[h0:h0 + LOGIT_CHUNK]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            losses.append(F.cross_entropy(logits, targets[h0:h0 + LOGIT_CHUNK], reduction="none"))
    elapsed = time.perf_counter() - start
    nll = torch.cat(losses)  # nll[i] is the loss of predicting token i + 1
    edges = [round(i * len(nll) / buckets) for i in range(buckets + 1)]
    table = [[lo + 1, hi + 1, float(nll[lo:hi].mean())] for lo, hi in itertools.pairwise(edges) if hi > lo]
    mean = float(nll.mean())
    return {
        "prediction": "",
        "tokens": ids.shape[1],
        "prefill_s": elapsed,
        "decode_s": 0.0,
        "decode_tokens": 0,
        "kv_bytes": cache_bytes(cache),
        "loss": mean,
        "loss_buckets": table,
        "ppl": math.exp(mean),
    }


@torch.no_grad()
def warm_up(model, tokens: int = 256, through_generate: bool = False) -> None:
    """One short forward per method before timing, so one-time costs (lazy init, compilation) are not billed
    to the first sample; through ``generate`` under a procedure (homer) or parallel runs (buckets-runs), which
    refuse a plain forward."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(tokens, device=model.device).remainder(vocab - 1).add(1).unsqueeze(0)
    if through_generate:
        generate_ids(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 1)
        return
    model(input_ids=ids, use_cache=True, logits_to_keep=1)


def run_sample(model, tokenizer, task: Task, sample: Sample, handle, chunk: int | None = None) -> dict:
    """One measured row (without the run's identity fields, which the runner adds)."""
    handle.reset_stats()
    reset_peak_resident()
    before = sharing.snapshot()
    if task.metric == "ppl":
        row = perplexity(model, sample, task.buckets, chunk)
        row["score"] = row["ppl"]
    else:
        row = generate(model, tokenizer, sample, chunk=chunk, score=lambda text: task.score(text, sample.gold))
        row["score"] = task.score(row["prediction"], sample.gold)
    row["density"] = handle.density("prefill")
    row["density_decode"] = handle.density("decode")
    row["select_s"], row["select_decode_s"] = handle.select_s["prefill"], handle.select_s["decode"]
    row["peak_rss_mb"] = round(peak_resident_bytes() / MiB, 1)
    row["others_cpu"] = sharing.others_share(before, sharing.snapshot())
    return row
