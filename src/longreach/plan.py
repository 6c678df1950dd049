"""Will this run fit? Expected memory of a long prompt before any forward runs.

An estimate from the model's shapes and the spec, not a measurement: weights (counted from the loaded
parameters), the KV cache after the prompt (global layers hold every token unless a press shrinks
them; sliding-window layers hold their window), and the peak working set of one prefill forward of
``chunk`` tokens (hidden states, MLP intermediates, the attention kernel's working set, the causal mask
of a chunk after a prefix, the extra re-rotated q/k of a position method). A procedure (homer) builds the cache
itself: its own plan gives the KV peak of its prefill and the final cache. ``longreach plan`` prints it
and refuses runs that would not fit in the memory available now.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .compat import trained_length
from .errors import InputError
from .kernels.gather import CHUNK_BYTES
from .position import RemapPositions
from .position.rotary import text_config
from .procedure import Procedure
from .spec import Spec
from .stages import stack_policies

MiB = 2**20
GiB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    length: int
    chunk: int
    weights: int
    kv_cache: int
    activations: int
    available: int | None
    notes: tuple[str, ...]
    runtime: int = 0  # this process's resident memory before the run (interpreter, torch, tokenizer)
    kv_kept: int | None = None  # the cache once a press has run, when it differs from the peak (``kv_cache``)
    kept_by: str = "the press"  # what shrank it (a procedure such as homer builds it smaller)

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.kv_cache + self.activations

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def rows(self) -> list[tuple[str, str]]:
        avail = "unknown" if self.available is None else f"{self.available / GiB:.2f} GiB"
        return [("prompt tokens", str(self.length)), ("prefill chunk", str(self.chunk)),
                ("runtime (resident now)", f"{self.runtime / GiB:.2f} GiB"),
                ("weights", f"{self.weights / GiB:.2f} GiB"),
                *([("KV cache at its peak (prefill)", f"{self.kv_cache / GiB:.2f} GiB"),
                   (f"KV cache after {self.kept_by}", f"{self.kv_kept / GiB:.2f} GiB")] if self.kv_kept is not None else
                  [("KV cache after prompt", f"{self.kv_cache / GiB:.2f} GiB")]),
                ("peak activations (one forward)", f"{self.activations / GiB:.2f} GiB"),
                ("expected peak", f"{self.total / GiB:.2f} GiB"), ("available now", avail)]


def proc_kib(path: str, field: str) -> int | None:
    """The ``field:`` value (KiB) of a Linux /proc key-value file; None where there is no such file or line.

    The one reader of /proc memory figures: the plan's available and resident memory and the eval's and
    benchmarks' peak RSS all come from here.
    """
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None elsewhere."""
    kib = proc_kib("/proc/meminfo", "MemAvailable")
    return None if kib is None else kib * 1024


def resident_bytes() -> int:
    """VmRSS of this process (Linux; 0 elsewhere): what is already paid before the run."""
    kib = proc_kib("/proc/self/status", "VmRSS")
    return 0 if kib is None else kib * 1024


def reset_peak_resident() -> None:
    """Linux lets a process reset its high-water mark, so a peak is per measurement (else: per process)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_resident_bytes() -> int:
    """VmHWM of this process since :func:`reset_peak_resident`; elsewhere getrusage's lifetime maximum."""
    kib = proc_kib("/proc/self/status", "VmHWM")
    if kib is None:
        import resource  # Unix only, and only needed off Linux

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters, each tensor once (``parameters()`` yields a tied LM head once): what the
    weights hold in memory and what a decode step reads."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def plan_memory(model: nn.Module, spec: Spec, length: int, chunk: int | None = None,
                available: int | None = None, runtime: int = 0) -> MemoryPlan:
    """``runtime``: bytes already resident besides the weights (the CLI passes this process's VmRSS,
    which over-counts weights pages already touched: the plan errs on the safe side)."""
    if length < 1:
        raise InputError(f"--length must be >= 1 token, got {length}")
    if chunk is not None and chunk < 1:
        raise InputError(f"--chunk must be >= 1 token, got {chunk}")
    cfg = text_config(model)
    step = min(chunk or length, length)
    param = next(model.parameters())
    width = param.element_size()
    weights = weight_bytes(model)
    n_layers = cfg.num_hidden_layers
    n_q = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * n_layers
    notes: list[str] = []

    per_token = 2 * n_kv * head_dim * width  # K and V, one layer
    position = next(iter(spec.of_kind("position")), None)
    runs = spec.runs  # buckets-runs: one cache and forward per run, as a batch
    per_token *= runs
    procedure = next(iter(spec.of_kind("procedure")), None)
    if isinstance(procedure, Procedure):
        return _procedure_plan(procedure, model, cfg, length, per_token, weights, available, runtime)
    # presses and head policies (razor, headkv, duo, lserve) say what they keep per layer
    policy = stack_policies([p for m in spec.methods if (p := m.cache_policy(None)) is not None])
    store = getattr(policy, "stored_bytes", None)  # kvquant: codes, scales and an exact residual
    kv = 0
    for i, kind in enumerate(layer_types):
        if kind == "sliding_attention" and window:
            kv += round(min(length, window - 1) * per_token)  # transformers' sliding layers keep window - 1
            continue
        if policy is None:
            kv += length * per_token
            continue
        # a cache policy acts on all but the prompt's last token, which then joins what it kept (at full width)
        held = round(policy.kept_tokens(i, n_layers, length - 1, n_kv)) if length > 1 else 0
        kv += (store(held, n_kv, head_dim, param.dtype) if store is not None else held * per_token) + per_token
    if policy is not None and chunk is None:
        notes.append(f"{policy.name} shrinks the cache after the prefill: the full {length}-token cache exists "
                     "during it; --chunk lets it compress chunk by chunk")
        kv_peak = max(kv, length * per_token * n_layers)
    else:
        kv_peak = kv
    if store is not None:  # a quantized layer attends a dequantized full-width copy of itself, one layer at a time
        kv_peak = max(kv_peak, kv + length * per_token)

    acts = forward_bytes(cfg, step, width) * runs
    attn = CHUNK_BYTES
    if step < length:
        attn += step * length * 4 * runs  # the additive causal mask of a chunk after a prefix
    if runs > 1:
        notes.append(f"{position.name} runs the prompt {runs} times as a batch (one run per RoPE base): {runs}x "
                     "the KV cache and activations of one run")
    if isinstance(position, RemapPositions):
        attn += (step * n_q + length * n_kv) * head_dim * width  # re-rotated far q/k
    activations = acts + attn

    trained = trained_length(model) or 0
    if (note := reach_note(length, trained, spec)) is not None:
        notes.append(note)
    if position is not None and hasattr(position, "group_for") and trained:
        notes.append(f"selfextend groups far positions by {position.group_for(length, trained)} at this length")
    if position is not None and hasattr(position, "shift_for") and trained:
        notes.append(f"string shifts relative positions >= {position.shift_for(length, trained)}")
    avail = available if available is not None else available_bytes()
    return MemoryPlan(length, step, weights, kv_peak, activations, avail, tuple(notes), runtime,
                      kv if kv != kv_peak else None, kept_by=policy.name if store is not None else "the press")


def reach_note(length: int, trained: int | None, spec: Spec) -> str | None:
    """What to say when ``length`` tokens is past the positions ``spec`` keeps inside a model's ``trained`` ones
    (None: it is not, or the trained length is unknown). Such a prompt still runs: the user is told, not refused."""
    reach = spec.reach(trained) if trained else None
    if reach is None or length <= reach:
        return None
    factor = f"{math.ceil(10 * length / trained) / 10:g}"  # type: ignore[operator]  # trained is set when reach is
    if reach == trained:
        return (f"{length} tokens is past the trained {trained} and no method in the spec extends positions: expect "
                f"the model to fail there; add one, e.g. selfextend or yarn:factor={factor}")
    return (f"{length} tokens is past the {reach} that {spec} keeps inside the trained {trained} positions; "
            f"raise its factor (yarn:factor={factor}) or group, or use selfextend (its group adapts to the length)")


def forward_bytes(cfg: object, step: int, width: int) -> int:
    """One layer forward of ``step`` tokens, beside the attention kernel: hidden states, MLP intermediates, q/k/v,
    and one row of logits."""
    hidden = cfg.hidden_size  # type: ignore[attr-defined]
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    n_q = cfg.num_attention_heads  # type: ignore[attr-defined]
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_q
    acts = step * (4 * hidden + 3 * inter) * width  # residual, normed input, attention out + MLP gate/up/act
    acts += step * (n_q + 2 * n_kv) * head_dim * width  # q, k, v of the layer
    return acts + cfg.vocab_size * 4  # type: ignore[attr-defined]  # one row of logits (logits_to_keep=1)


def _procedure_plan(procedure: Procedure, model: nn.Module, cfg: object, length: int, per_token: int,
                    weights: int, available: int | None, runtime: int) -> MemoryPlan:
    """A procedure (homer) that builds the cache itself: its prefill's KV peak, its final cache, one forward of
    its longest chunk, plus the hidden states of the finished subtrees waiting for a sibling (and the attention
    rows per head it ranks tokens by, float32: the final token's, and with homer's calibration the sampled rows')."""
    got = procedure.plan(model, length)
    width = next(model.parameters()).element_size()
    step = got.forward_max
    waiting = got.waiting_rows * cfg.hidden_size * width  # type: ignore[attr-defined]
    ranking = cfg.num_attention_heads * got.ranking_rows * step * 4  # type: ignore[attr-defined]
    activations = forward_bytes(cfg, step, width) + CHUNK_BYTES + waiting + ranking
    avail = available if available is not None else available_bytes()
    return MemoryPlan(length, step, weights, got.kv_peak * per_token, activations, avail, got.notes, runtime,
                      got.kv_final * per_token, kept_by=f"{procedure.name} (what decoding reads)")
