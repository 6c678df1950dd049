"""End-to-end benchmark: a real model on real text, transformers vs longreach methods (and llama.cpp).

For each prompt length and method: time to first token (the prefill forward that yields the first
token's logits), decode tokens/s over a fixed number of new tokens (no early stop), peak RSS (the
process high-water mark, reset per run) and the KV cache bytes after the run. Every length first runs
the ``transformers`` baseline — the model as transformers runs it (SDPA, its DynamicCache) — and
ratios are against it in the same run; longreach's ``dense`` row shows what longreach's own runtime
(the in-place growing cache) gives before any sparsity. ``llama-cpp-python`` on the same GGUF, when
installed, is a peer column; without it the run says so and goes on.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import apply, cache_bytes
from ..compat import output_cache
from ..generation import generate
from ..plan import MiB, peak_resident_bytes, reset_peak_resident
from ..plotting import pyplot
from ._plot import speedup_axis


@dataclass
class E2ERow:
    length: int
    method: str
    ttft_s: float
    decode_tok_s: float
    decode_tokens: int
    peak_rss_mb: float
    kv_bytes: int | None

    def vs(self, base: E2ERow | None) -> tuple[float | None, float | None]:
        """(TTFT speedup, decode speedup) against the baseline measured in the same run."""
        if base is None:
            return None, None
        return base.ttft_s / self.ttft_s, self.decode_tok_s / base.decode_tok_s


BASELINE = "transformers"


def baselines(rows: list[E2ERow]) -> dict[int, E2ERow]:
    return {r.length: r for r in rows if r.method == BASELINE}


def prompt_ids(tokenizer, text: str, length: int) -> dict:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < length:
        raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than the {length} asked for")
    ids = ids[:, :length]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


HF_PATH = " · model.generate()"  # suffix of rows measured through transformers' own generate() under apply


def run_model(model, tokenizer, text: str, lengths: list[int], specs: list[str], new_tokens: int = 32,
              chunk: int | None = None, hf_generate: bool = False) -> list[E2ERow]:
    """Rows per length: the transformers baseline, then each spec through ``longreach.generate`` and, with
    ``hf_generate``, through ``model.generate()`` under ``apply`` too (the README's path: it must cost the same)."""
    rows = []
    for length in lengths:
        ids = prompt_ids(tokenizer, text, length)
        for spec in [None, *specs]:  # None: the transformers baseline (no longreach, its own cache)
            with apply(model, spec, track_density=False) if spec else contextlib.nullcontext():
                generate(model, prompt_ids(tokenizer, text, 256), 2)  # warm-up apart (lazy init)
                reset_peak_resident()
                run = generate(model, ids, new_tokens, chunk=chunk, cache="growing" if spec else "dynamic")
                decoded = len(run.tokens) - 1
                rows.append(E2ERow(length, spec or BASELINE, run.prefill_s,
                                   decoded / run.decode_s if run.decode_s else 0.0, decoded,
                                   peak_resident_bytes() / MiB, cache_bytes(run.cache)))
                if spec and hf_generate:
                    rows.append(_hf_generate_row(model, ids, length, spec, new_tokens))
    return rows


class _TokenClock:
    """A ``generate()`` streamer that only timestamps: its first ``put`` is the prompt, then one per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate_row(model, ids: dict, length: int, spec: str, new_tokens: int) -> E2ERow:
    clock = _TokenClock()
    reset_peak_resident()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock, return_dict_in_generate=True)
    first, last = clock.times[1], clock.times[-1]
    decoded = len(clock.times) - 2
    return E2ERow(length, spec + HF_PATH, first - start, decoded / (last - first) if last > first else 0.0, decoded,
                  peak_resident_bytes() / MiB, cache_bytes(output_cache(out)))


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def run_llama_cpp(gguf: Path, text: str, lengths: list[int], new_tokens: int = 32) -> list[E2ERow]:
    """The same measurements through llama.cpp (its own tokenizer on the same text, same thread count),
    with its flash attention off (llama-cpp-python's default) and on (the llama.cpp CLI's choice on CPU)."""
    rows = []
    for length in lengths:
        for flash in (False, True):
            rows.append(_llama_cpp_row(gguf, text, length, new_tokens, flash))
    return rows


def _llama_cpp_row(gguf: Path, text: str, length: int, new_tokens: int, flash: bool) -> E2ERow:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=length + new_tokens + 8, n_threads=os.cpu_count(), flash_attn=flash,
                verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False)[:length]
        reset_peak_resident()
        start = time.perf_counter()
        llm.eval(tokens)
        ttft = time.perf_counter() - start
        token = int(llm.sample(temp=0.0))
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(llm.sample(temp=0.0))
        decode = time.perf_counter() - start
        name = "llama.cpp (flash attn)" if flash else "llama.cpp"
        return E2ERow(length, name, ttft, (new_tokens - 1) / decode, new_tokens - 1, peak_resident_bytes() / MiB, None)
    finally:
        with contextlib.suppress(Exception):
            llm.close()


def plot(rows: list[E2ERow], path: Path) -> bool:
    """TTFT and decode speedup vs T per method (transformers = 1); False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    base = baselines(rows)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method in dict.fromkeys(r.method for r in rows if r.method != BASELINE):
        pts = sorted((r.length, *r.vs(base.get(r.length))) for r in rows if r.method == method)
        pts = [p for p in pts if p[1] is not None]
        for ax, i in zip(axes, (1, 2), strict=True):
            ax.plot([p[0] for p in pts], [p[i] for p in pts], marker="o", label=method)
    for ax, what in zip(axes, ("time to first token", "decode tokens/s"), strict=True):
        speedup_axis(ax, f"{what}: speedup vs transformers")
        ax.set_xlabel("prompt tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
