"""The oracle gap: how far a method's selection is from dense attention, layer by layer.

``diagnose`` runs the model once densely and, at every attention layer, replays each method on that
layer's real queries and keys (``inputs="dense"``). With ``inputs="method"`` each method runs its own
forward instead and is replayed on the queries and keys its own earlier layers produced: a loss that only
shows once the layers before have lost something is then measured where it happens (on SmolLM2, quest's
raw-bound rule dropped a needle in layer 18 in its own run, not on dense's inputs; docs/template-free.md).

Per (layer, query head) it reports the share of the dense softmax mass that falls on the selected keys
(*mass recall*: 1.0 means nothing that mattered was dropped) and the relative error of the attention
output, and the recall of the *last* query alone (the one that writes the next token: a needle lost there
is lost from the answer, whatever the average says); per layer, the density actually used and how long
the selection took next to the sparse and the dense attention. Layers the model itself runs with a
sliding window (Gemma 3's local layers) are not controlled by methods and are skipped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from . import kernels
from .errors import InputError
from .hf import apply
from .methods.base import SelectContext
from .methods.scoring import causal_probs
from .plotting import require_pyplot
from .selection import Selection
from .spec import parse_spec

T = TypeVar("T")
ROW_BYTES = 64 * 2**20  # dense probabilities materialised per chunk of query rows


@dataclass
class LayerReport:
    """One method at one layer."""

    layer: int
    method: str
    recall: list[float]  # per query head: dense softmax mass on the selected keys
    last_recall: list[float]  # per query head: the same for the last query alone (it writes the next token)
    output_error: list[float]  # per query head: ||out - dense|| / ||dense||
    density: float
    select_s: float
    attend_s: float
    dense_s: float  # longreach's dense attention at this layer, same kernel, same run


@dataclass
class Diagnosis:
    tokens: int
    methods: list[str]
    layers: list[LayerReport] = field(default_factory=list)

    def of(self, method: str) -> list[LayerReport]:
        return [r for r in self.layers if r.method == method]

    def summary(self, method: str) -> dict[str, float]:
        """Means over layers and heads, plus the worst head's recall and the time shares."""
        rows = self.of(method)
        if not rows:
            raise KeyError(method)
        recall = torch.tensor([r.recall for r in rows])
        err = torch.tensor([r.output_error for r in rows])
        return {
            "recall": recall.mean().item(),
            "min_recall": recall.min().item(),
            "last_recall": torch.tensor([r.last_recall for r in rows]).mean().item(),
            "min_last_recall": torch.tensor([r.last_recall for r in rows]).min().item(),
            "output_error": err.mean().item(),
            "density": sum(r.density for r in rows) / len(rows),
            "select_s": sum(r.select_s for r in rows),
            "attend_s": sum(r.attend_s for r in rows),
            "dense_s": sum(r.dense_s for r in rows),
        }


def _per_query_head(x: Tensor, n_q: int) -> Tensor:
    """(B, Hs, ...) with Hs in {1, Hkv, Hq} -> (B, Hq, ...)."""
    return x.repeat_interleave(n_q // x.shape[1], dim=1) if x.shape[1] != n_q else x


def query_sample(t_q: int, max_queries: int | None) -> Tensor:
    """All query indices, or ``max_queries`` of them evenly spaced (the last query always included)."""
    if max_queries is None or max_queries >= t_q:
        return torch.arange(t_q)
    return torch.linspace(0, t_q - 1, max_queries).round().long().unique()


def mass_recall(q: Tensor, k: Tensor, sel: Selection | Sequence[Selection], scale: float,
                key_mask: Tensor | None = None, max_queries: int | None = None, rows: Tensor | None = None
                ) -> Tensor:
    """Per query head, the mean over queries of the dense softmax mass on the keys a selection keeps.

    Returns (Hq,) for one selection, (n, Hq) for a list (the dense probabilities are computed once
    for all of them). ``max_queries`` averages over that many evenly spaced queries instead of all
    (O(T^2) becomes O(max_queries * T)); ``rows`` names the query indices instead. Chunked over rows; the
    batch is averaged.
    """
    sels = [sel] if isinstance(sel, Selection) else list(sel)
    batch, n_q, t_q, _ = q.shape
    t_k = k.shape[2]
    picked = query_sample(t_q, max_queries) if rows is None else rows
    total = torch.zeros(len(sels), n_q, dtype=torch.float64)
    sparse = [i for i, s in enumerate(sels) if not s.full]
    if sparse:
        step = max(1, ROW_BYTES // (4 * batch * n_q * t_k))
        for c0 in range(0, len(picked), step):
            qi = picked[c0 : c0 + step]
            probs = causal_probs(q, k, scale, qi.to(q.device), key_mask).flatten(1, 2)  # (B, Hq, r, Tk)
            for i in sparse:
                kept = _per_query_head(sels[i].mask_rows(qi), n_q)  # (B, Hq, r, Tk)
                total[i] += (probs * kept).sum(-1).sum(dim=(0, 2)).double()
    recall = (total / (batch * len(picked))).float()
    for i, s in enumerate(sels):
        if s.full:
            recall[i] = 1.0
    return recall[0] if isinstance(sel, Selection) else recall


def best_of(fn: Callable[[], T], repeat: int = 1, warm_up: bool = False) -> tuple[T, float]:
    """``fn()``'s last result and its best wall time over ``repeat`` runs (after one untimed run with ``warm_up``).

    The one timer of diagnostics and benchmarks, so both count time alike: the minimum, because on a shared
    machine noise only ever adds time.
    """
    if repeat < 1:
        raise InputError(f"repeat must be >= 1, got {repeat}")
    if warm_up:
        fn()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


INPUTS = ("dense", "method")


def diagnose(model: nn.Module, input_ids: Tensor, specs: Sequence[str], *, kernel: str = "auto",
             layers: Sequence[int] | None = None,
             progress: Callable[[int], None] | None = None, max_queries: int | None = None,
             inputs: str = "dense") -> Diagnosis:
    """Replay every method in ``specs`` on each attention layer of one dense forward of ``input_ids``
    (``inputs="dense"``), or each on its own forward (``inputs="method"``: one forward per method).

    ``max_queries`` estimates mass recall from that many evenly spaced queries (all by default).
    """
    methods = [parse_spec(s) for s in specs]  # every spec is checked before the model runs
    if inputs not in INPUTS:
        raise InputError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise InputError(f"input_ids must be (batch, tokens) with at least 2 tokens, got {tuple(input_ids.shape)}")
    wanted = set(layers) if layers is not None else None
    diag = Diagnosis(int(input_ids.shape[1]), [str(m) for m in methods])
    forwards = [("dense", methods)] if inputs == "dense" else [(str(m), [m]) for m in methods]
    for run_spec, replayed in forwards:
        with torch.no_grad(), apply(model, run_spec, kernel=kernel, track_density=False) as handle:
            handle.observer = _replayer(diag, replayed, wanted, kernel, max_queries, progress)
            model(input_ids=input_ids, use_cache=False)
    order = {m: i for i, m in enumerate(diag.methods)}
    diag.layers.sort(key=lambda r: (r.layer, order[r.method]))
    return diag


def _replayer(diag: Diagnosis, methods: list, wanted: set[int] | None, kernel: str, max_queries: int | None,
              progress: Callable[[int], None] | None):
    """The observer that replays ``methods`` on each layer's queries and keys and appends their reports."""

    def observe(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, sliding: int | None,
                key_mask: Tensor | None) -> None:
        if wanted is not None and layer not in wanted:
            return
        if sliding is not None:  # the model's own sliding-window layer: no method controls it
            if progress is not None:
                progress(layer)
            return
        batch, t_q = q.shape[0], q.shape[2]
        dense_sel = Selection.dense(batch, t_q, k.shape[2], key_mask=key_mask, device=q.device)
        ref, dense_s = best_of(lambda: kernels.attend(q, k, v, dense_sel, scale, kernel))
        ref_norm = ref.float().square().sum(dim=(0, 1, 3)).sqrt().clamp(min=1e-12)  # per query head
        runs = []
        for spec in methods:
            ctx = SelectContext(layer, key_mask, None, {}, scale)
            sel, select_s = best_of(lambda spec=spec, ctx=ctx: spec.selector.select(q, k, ctx))
            out, attend_s = best_of(lambda sel=sel: kernels.attend(q, k, v, sel, scale, kernel))
            err = (out.float() - ref.float()).square().sum(dim=(0, 1, 3)).sqrt() / ref_norm
            runs.append((spec, sel, select_s, attend_s, err))
        recalls = mass_recall(q, k, [r[1] for r in runs], scale, key_mask, max_queries)
        last = mass_recall(q, k, [r[1] for r in runs], scale, key_mask, rows=torch.tensor([t_q - 1]))
        for (spec, sel, select_s, attend_s, err), recall, last_recall in zip(runs, recalls, last, strict=True):
            diag.layers.append(LayerReport(layer, str(spec), recall.tolist(), last_recall.tolist(), err.tolist(),
                                           sel.density(), select_s, attend_s, dense_s))
        if progress is not None:
            progress(layer)

    return observe


def recall_heatmaps(diag: Diagnosis, path: str | Path) -> None:
    """One panel per method: layers x query heads, colour = mass recall."""
    plt = require_pyplot("the mass recall heatmap")
    n = len(diag.methods)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, method in zip(axes.flat, diag.methods, strict=False):
        reports = diag.of(method)
        grid = torch.tensor([r.recall for r in reports])
        im = ax.imshow(grid.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{method}\nmean recall {grid.mean():.2f}", fontsize=8)
        ax.set_xlabel("query head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_yticks(range(len(reports)), [str(r.layer) for r in reports], fontsize=5)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="dense softmax mass kept")
    fig.suptitle(f"mass recall, {diag.tokens} tokens", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
