"""End-to-end benchmark: a real model on real text, transformers vs longreach methods (and llama.cpp).

For each prompt length and method: time to first token (the prefill forward that yields the first
token's logits), decode tokens/s over a fixed number of new tokens (no early stop), peak RSS and the KV
cache bytes after the run. Every row runs in a **fresh process** (a process's peak and glibc's retained
heap carry over from one run to the next), ``repeats`` times; the repeats interleave (every row once, then
again), and each figure is the median with its min-max. Ratios are against the ``transformers`` baseline —
the model as transformers runs it (SDPA, its DynamicCache) — at the same length; longreach's ``dense``
row shows what longreach's own runtime (the in-place growing cache) gives before any sparsity.

Decode is also put against this machine's memory bandwidth: a token must read the weights once (the tied
LM head included) and the KV it attends (the cache times the measured decode density), so
``bandwidth / bytes`` is the most tokens/s any implementation reaches here in this precision. The bandwidth is
measured again right after every run and paired with it: on a shared VM it moved between 38 and 61 GB/s from one
run of this benchmark to the next (AMD EPYC, 2 cores), so one figure taken at the start could not say what share
of the bound a run 40 minutes later reached.
llama.cpp, when installed, is a peer column (:mod:`.peer`): on the bundled GGUF and on an F32 copy of it, which
holds the weights longreach runs, so that dense is compared with dense.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import torch

from .. import apply, cache_bytes
from ..compat import output_cache
from ..errors import InputError
from ..generation import generate
from ..plan import MiB, peak_resident_bytes, reset_peak_resident, weight_bytes
from ..plotting import pyplot
from ..spec import parse_spec
from ._plot import speedup_axis
from .peer import ROW_SCRIPT, Peer
from .roofline import memory_bandwidth


@dataclass
class E2ERow:
    length: int
    method: str
    ttft_s: float  # the median of the repeats (so are decode_tok_s and peak_rss_mb)
    decode_tok_s: float
    decode_tokens: int
    peak_rss_mb: float
    kv_bytes: int | None
    ttft_runs: list[float] = field(default_factory=list)  # every repeat, in run order
    decode_runs: list[float] = field(default_factory=list)
    rss_runs: list[float] = field(default_factory=list)
    decode_bytes: int | None = None  # what one decode step reads: weights + the KV it attends
    bandwidth_runs: list[float] = field(default_factory=list)  # read bytes/s measured right after each repeat

    def vs(self, base: E2ERow | None) -> tuple[float | None, float | None]:
        """(TTFT speedup, decode speedup) against the baseline measured in the same run."""
        if base is None:
            return None, None
        return base.ttft_s / self.ttft_s, self.decode_tok_s / base.decode_tok_s

    def decode_bound(self, bytes_per_s: float | None = None) -> float | None:
        """The most decode tokens/s this machine's read bandwidth allows for this row's bytes per token: the median
        over the repeats of the bandwidth measured after each (``bytes_per_s`` for rows without them)."""
        if not self.decode_bytes:
            return None
        if self.bandwidth_runs:
            return median(self.bandwidth_runs) / self.decode_bytes
        return bytes_per_s / self.decode_bytes if bytes_per_s else None

    def bound_share(self, bytes_per_s: float | None = None) -> float | None:
        """The share of the bound decode reached: the median over the repeats of each run's tokens/s against the
        bound of the bandwidth measured right after it (``bytes_per_s`` for rows without them)."""
        if not self.decode_bytes:
            return None
        if self.bandwidth_runs:
            return median(t * self.decode_bytes / bw for t, bw in zip(self.decode_runs, self.bandwidth_runs,
                                                                        strict=True))
        bound = self.decode_bound(bytes_per_s)
        return self.decode_tok_s / bound if bound else None

    @classmethod
    def from_runs(cls, runs: list[dict]) -> E2ERow:
        """One row from its repeats (dicts from :func:`measure_row`): medians, and every run kept."""
        first = runs[0]
        return cls(first["length"], first["method"], median(r["ttft_s"] for r in runs),
                   median(r["decode_tok_s"] for r in runs), first["decode_tokens"],
                   median(r["peak_rss_mb"] for r in runs), first["kv_bytes"],
                   [r["ttft_s"] for r in runs], [r["decode_tok_s"] for r in runs], [r["peak_rss_mb"] for r in runs],
                   first.get("decode_bytes"), [r["read_bytes_per_s"] for r in runs if "read_bytes_per_s" in r])


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


def measure_row(model, tokenizer, text: str, length: int, spec: str | None, new_tokens: int,
                chunk: int | None = None, hf_generate: bool = False) -> dict:
    """One run in this process: ``spec`` None is the transformers baseline (no longreach, its own cache)."""
    ids = prompt_ids(tokenizer, text, length)
    weights = weight_bytes(model)
    with apply(model, spec) if spec else contextlib.nullcontext() as handle:
        generate(model, prompt_ids(tokenizer, text, 256), 2)  # warm-up apart (lazy init)
        if handle is not None:
            handle.reset_stats()
        if hf_generate:
            return _hf_generate_row(model, ids, length, spec or BASELINE, new_tokens)
        reset_peak_resident()
        run = generate(model, ids, new_tokens, chunk=chunk, cache="growing" if spec else "dynamic")
        decoded = len(run.tokens) - 1
        kv = cache_bytes(run.cache)
        density = (handle.density("decode") if handle is not None else None) or 1.0
        return {"length": length, "method": spec or BASELINE, "ttft_s": run.prefill_s,
                "decode_tok_s": decoded / run.decode_s if run.decode_s else 0.0, "decode_tokens": decoded,
                "peak_rss_mb": peak_resident_bytes() / MiB, "kv_bytes": kv,
                "decode_bytes": weights + int(kv * density) if kv is not None else None}


def run_rows(model: str, text: str, lengths: list[int], specs: list[str], new_tokens: int = 32,
             chunk: int | None = None, hf_generate: bool = False, repeats: int = 3,
             progress: Callable[[str], None] | None = None, peers: Sequence[Peer] = ()) -> list[E2ERow]:
    """Every (length, method) row ``repeats`` times, each run in a fresh process (see the module docstring).
    ``model`` is what ``load_model`` takes; with ``hf_generate`` each spec also runs through ``model.generate()``
    under ``apply`` (the README's path: it must cost what ``longreach.generate`` does). ``peers`` are llama.cpp
    rows (:mod:`.peer`), run the same way."""
    parallel = [s for s in specs if parse_spec(s).runs > 1]
    if hf_generate and parallel:
        raise InputError(f"--hf-generate times model.generate(), which cannot run {parallel[0]}: its runs are batched "
                         "and their logits combined by longreach.generate only; drop --hf-generate for it")
    jobs = [dict(spec=spec, hf_generate=False) for spec in [None, *specs]]
    jobs += [dict(spec=spec, hf_generate=True) for spec in specs if hf_generate]
    jobs += [dict(peer=p.job()) for p in peers]
    plan = [(n, i) for n in lengths for i in range(len(jobs))]
    runs: dict[tuple, list[dict]] = {key: [] for key in plan}
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "text.txt"
        text_file.write_text(text)
        for rep in range(repeats):
            for n, i in plan:
                job = dict(jobs[i], model=model, text_file=str(text_file), length=n, new_tokens=new_tokens,
                           chunk=chunk)
                if progress:
                    progress(f"repeat {rep + 1}/{repeats}: {n} tokens, {_job_name(job)}")
                done = _fresh_process(job)
                done["read_bytes_per_s"] = memory_bandwidth()  # the machine as the run left it (module docstring)
                runs[(n, i)].append(done)
    return [E2ERow.from_runs(runs[key]) for key in plan]


def _job_name(job: dict) -> str:
    if "peer" in job:
        return job["peer"]["label"]
    return (job["spec"] or BASELINE) + (HF_PATH if job["hf_generate"] else "")


def _fresh_process(job: dict) -> dict:
    """Run :func:`measure_row` (a llama.cpp row: ``peer_row.py``) in a new interpreter with the same threads, and
    read its one JSON line."""
    threads = torch.get_num_threads()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    row = ["-P", str(ROW_SCRIPT)] if "peer" in job else ["-m", "longreach.bench.e2e_row"]
    done = subprocess.run([sys.executable, *row, json.dumps({**job, "threads": threads})], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark row {job['length']} tokens, {_job_name(job)} failed in its "
                           f"process:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class _TokenClock:
    """A ``generate()`` streamer that only timestamps: its first ``put`` is the prompt, then one per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate_row(model, ids: dict, length: int, spec: str, new_tokens: int) -> dict:
    clock = _TokenClock()
    reset_peak_resident()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock, return_dict_in_generate=True)
    first, last = clock.times[1], clock.times[-1]
    decoded = len(clock.times) - 2
    kv = cache_bytes(output_cache(out))
    return {"length": length, "method": spec + HF_PATH, "ttft_s": first - start,
            "decode_tok_s": decoded / (last - first) if last > first else 0.0, "decode_tokens": decoded,
            "peak_rss_mb": peak_resident_bytes() / MiB, "kv_bytes": kv, "decode_bytes": None}


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
