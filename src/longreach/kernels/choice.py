"""Which gather path runs, chosen by measurement on this machine: the compiled kernel or the PyTorch path.

On an AMD EPYC (AVX2-era tuning) the compiled kernel was 7x faster than dense attention at 16k; on an Intel
Xeon with AVX-512 the same kernel lost to the PyTorch path (2.2x vs 3.5x). So neither is the default: at
first use for a head shape and phase, both paths attend the same random 10%-density selection at a
representative length (prefill: 4096 queries; decode: one query over 16384 keys), best of 3 each (taking
turns), and the faster one is used from then on. The result is cached per CPU model, torch version and kernel source
(``$LONGREACH_CACHE/kernels/<torch>/choice.json``), so it is measured once per machine; ``LONGREACH_NATIVE=0``
or ``=1`` forces a path. Both paths equal the reference kernel (tests/test_kernels.py), so the choice never
changes a result, only the time.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..machine import cpu_model
from ..paths import cache_dir
from ..selection import Selection
from . import native

PREFILL_T, DECODE_T, BLOCK, DENSITY, REPEAT = 4096, 16384, 64, 0.1, 3
_memo: dict[str, dict] = {}


def _store() -> Path:
    return cache_dir() / "kernels" / torch.__version__.replace("+", "_") / "choice.json"


def choice_key() -> str:
    """CPU model, threads, torch and the kernel source: a choice is valid for exactly these (asked on every
    attention call, so nothing here reads a file twice)."""
    return (f"{cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__} "
            f"| kernel {native.source_hash()}")


def shape_key(n_q: int, n_kv: int, dim: int, decode: bool) -> str:
    return f"{n_q}/{n_kv}/{dim}/{'decode' if decode else 'prefill'}"


def _timings(n_q: int, n_kv: int, dim: int, decode: bool, run: Callable[..., object]) -> dict[str, float]:
    """Best-of-3 seconds of each path on a representative random selection of this head shape (``run``:
    gather's ``attend_with_lse``, which takes ``use_native``)."""
    t_k = DECODE_T if decode else PREFILL_T
    t_q = 1 if decode else t_k
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, n_q, t_q, dim, generator=gen)
    k, v = torch.randn(1, n_kv, t_k, dim, generator=gen), torch.randn(1, n_kv, t_k, dim, generator=gen)
    n_qb, n_kb = math.ceil(t_q / BLOCK), math.ceil(t_k / BLOCK)
    take = max(1, int(DENSITY * n_kb))
    idx = torch.rand(1, n_kv, n_qb, n_kb, generator=gen).argsort(-1)[..., :take]
    sel = Selection(idx, t_q, t_k, BLOCK, BLOCK, 4, BLOCK)
    return best_seconds({path: lambda native_on=native_on: run(q, k, v, sel, dim**-0.5, use_native=native_on)
                         for path, native_on in (("native", True), ("torch", False))})


def best_seconds(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Each run's fastest of ``REPEAT`` timed calls, after one untimed warm-up call of each: what every choice
    compares. The runs take turns in every round, so a slow spell of the machine (another process being
    preempted, a clock ramping up: on a busy 2-core VM the first ~100 ms of a process ran 15x slower) falls on all
    of them instead of on whichever was timed first."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, math.inf)
    for _ in range(REPEAT):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def choose(n_q: int, n_kv: int, dim: int, decode: bool, run: Callable[..., object]) -> dict:
    """``{"path": "native" | "torch", "why": ..., timings}`` for this shape on this machine (measured once)."""
    return decide(shape_key(n_q, n_kv, dim, decode), lambda: _timings(n_q, n_kv, dim, decode, run))


def decide(shape: str, timings: Callable[[], dict[str, float]]) -> dict:
    """The faster of the compiled and the PyTorch path for ``shape`` (``timings`` gives each one's seconds), measured
    once per machine and cached; ``LONGREACH_NATIVE`` forces a path, and without the compiled module it is torch."""
    machine = choice_key()
    known = _memo.get(machine)
    if known is None:
        known = _memo[machine] = _load(machine)
    forced = os.environ.get("LONGREACH_NATIVE")
    if forced in ("0", "1") or native.load() is None:  # not measured, and not cached: it says why
        path = "native" if forced == "1" and native.load() is not None else "torch"
        why = f"LONGREACH_NATIVE={forced}" if forced in ("0", "1") else "the compiled kernel is unavailable"
        known[shape] = {"path": path, "why": why}
        return known[shape]
    if shape not in known or not known[shape]["why"].startswith("measured"):
        times = timings()
        path = "native" if times["native"] <= times["torch"] else "torch"
        known[shape] = {"path": path, "why": f"measured: compiled {times['native'] * 1e3:.1f} ms, "
                                             f"PyTorch {times['torch'] * 1e3:.1f} ms", **times}
        _save(machine, known)
    return known[shape]


def use_native(q: torch.Tensor, n_kv: int, run: Callable[..., object]) -> bool:
    """Whether gather should run the compiled kernel for these queries (CPU fp32 inference only)."""
    if not native.usable(q):
        return False
    return choose(q.shape[1], n_kv, q.shape[-1], q.shape[2] == 1, run)["path"] == "native"


def _load(machine: str) -> dict:
    try:
        return json.loads(_store().read_text()).get(machine, {})
    except (OSError, ValueError):
        return {}


def _save(machine: str, known: dict) -> None:
    path = _store()
    try:
        everything = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        everything = {}
    everything[machine] = {shape: made for shape, made in known.items() if made["why"].startswith("measured")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(everything, indent=1))
    tmp.replace(path)


def chosen() -> dict[str, dict]:
    """Every choice made for this machine so far (what ``bench attention`` prints)."""
    machine = choice_key()
    return dict(_memo.get(machine) or _load(machine))
