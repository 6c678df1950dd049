"""What every method is: a small frozen dataclass with a name, a kind and typed parameters.

Kinds (capability flags, so runners never branch on classes):
- ``select``: decides which keys each query sees (returns a Selection);
- ``press`` and ``position``: KV-cache compression and context extension (later issues).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..configurable import Configurable, param
from ..errors import SpecError
from ..selection import Selection
from ..stages import PLAIN, CachePolicy, SoftmaxExtras
from .summaries import block_stats


@dataclass(frozen=True)
class Method(Configurable):
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    # scores keys by attention mass with a softmax of q.k of its own that leaves out the model's logit softcap
    # and learned sinks (``SelectContext.extras``): ``apply`` refuses it on a model whose softmax holds them.
    # Every built-in method's softmax holds them; the flag is for one that does not yet.
    scores_attention: ClassVar[bool] = False
    # re-maps positions by cache index inside the attention function (selfextend, string, ...): nothing that
    # assigns positions itself (a procedure) or drops keys (a press) can follow it
    remaps_positions: ClassVar[bool] = False

    @property
    def runs(self) -> int:
        """Copies of the prompt ``longreach.generate`` runs as a batch, their logits combined (``buckets-runs``
        with several bases); 1: an ordinary forward, which everything else may share."""
        return 1

    def reach(self, trained: int) -> int | None:
        """The longest prompt, in tokens, this method keeps inside the ``trained`` length's positions; None: any
        length, because the method fits each sequence into them, or refuses it, itself. A method that leaves
        positions alone reaches ``trained``."""
        return trained

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse, at ``apply`` time, a model this method cannot act on (before any forward)."""

    def cache_policy(self, owner: object) -> CachePolicy | None:
        """What this method does to the KV cache (presses, head policies); None: it keeps every key."""
        return None


@dataclass(frozen=True)
class SelectContext:
    """What a selector may know beyond q and k: where it is and what the cache already summarised."""

    layer_idx: int = 0
    key_mask: Tensor | None = None  # (B, Tk) bool; False = padding
    summaries: object | None = None  # methods.summaries.BlockSummaries of this layer, if the method asked
    # Per-layer scratch a method may keep between calls of one sequence (clusters, a recycled key set);
    # the runtime clears it when a new sequence starts.
    state: dict = field(default_factory=dict)
    scale: float | None = None  # the model's softmax scale (default 1/sqrt(head_dim)), for mass estimates
    # the rest of the model's softmax (Gemma 2's softcap, GPT-OSS's sink logits per query head of q): a method
    # that computes attention probabilities itself passes them to ``scoring.causal_probs``
    extras: SoftmaxExtras = PLAIN

    def softmax_scale(self, q: Tensor) -> float:
        return self.scale if self.scale is not None else q.shape[-1] ** -0.5


@dataclass(frozen=True)
class SelectionMethod(Method):
    """A method that answers 'which keys does each query see?'."""

    kind: ClassVar[str] = "select"
    # Statistics of each key block the method scores with; the cache keeps them incrementally for decode.
    block_stats: ClassVar[tuple[str, ...]] = ()
    # An output hook: the method reworks some heads' attention output after the kernel (ablate, act).
    rewrites_output: ClassVar[bool] = False

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        """q (B, Hq, Tq, D), k (B, Hkv, Tk, D) with queries at the last Tq key positions."""
        raise NotImplementedError

    def postprocess(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: SelectContext) -> Tensor:
        """The output hook (``rewrites_output``): out (B, Tq, Hq, D) -> the same shape."""
        return out


@dataclass(frozen=True, eq=False)
class BlockQuota:
    """Block geometry and budget of one select call; shared by every block-scoring method."""

    t_q: int
    t_k: int
    n_qb: int
    n_kb: int
    first: Tensor  # (nQB,) key position of each query block's first query
    last: Tensor  # (nQB,) key position of each query block's last query
    candidate: Tensor  # (nQB, nKB) bool: blocks worth choosing (past the sinks, behind the window)
    n_take: Tensor  # (nQB,) most blocks each query block may choose
    dense: bool  # the budget covers every causal key of every query block
    _widths: dict = field(default_factory=dict, repr=False)

    # Plans are cached per (method, Tq, Tk) (every layer of a decode step asks for the same one), so what
    # is derived from them is computed once too: these syncs and masks cost more than scoring at decode.
    @functools.cached_property
    def k_max(self) -> int:
        return int(self.n_take.max().item()) if self.n_qb else 0

    @functools.cached_property
    def blocked(self) -> Tensor:
        """~candidate: the blocks scoring must never pick."""
        return ~self.candidate

    def width(self, b0: int, b1: int) -> int:
        """Key blocks up to the last candidate of query blocks [b0, b1) (0: none to score)."""
        if (b0, b1) not in self._widths:
            cols = self.candidate[b0:b1].any(0).nonzero()
            self._widths[b0, b1] = int(cols.max()) + 1 if cols.numel() else 0
        return self._widths[b0, b1]


@dataclass(frozen=True)
class BudgetedMethod(SelectionMethod):
    """Shared budget vocabulary: ``budget`` keys per query, or ``density`` of the causal keys.

    Sinks and the local window are always kept and count toward the budget; a budget that covers
    all causal keys of a query block makes that block exactly dense. With ``group=kv`` the query heads
    sharing a KV head choose together (the kernel then gathers each chosen block once per KV head);
    ``group=q`` lets every query head choose its own blocks.
    """

    budget: int | None = param(None, "keys each query sees (tokens, sinks and window included)")
    density: float | None = param(None, "fraction of the causal keys each query sees, in (0, 1]")
    block: int = param(64, "block size in tokens (queries and keys)")
    sinks: int = param(4, "first tokens every query sees (attention sinks)")
    window: int | None = param(None, "most recent tokens every query sees (default: one block)")
    group: str = param("kv", "kv: heads sharing a KV head choose together; q: each query head chooses")
    key_block: int | None = param(None, "key block size in tokens, finer than block for stripe-like choices "
                                  "(default: block)")

    default_budget: ClassVar[int | None] = 2048

    def __post_init__(self) -> None:
        check_int(self, "block", self.block, minimum=1)
        check_int(self, "sinks", self.sinks, minimum=0)
        if self.window is not None:
            check_int(self, "window", self.window, minimum=1)
        if self.key_block is not None:
            check_int(self, "key_block", self.key_block, minimum=1)
        check_budget(self, self.budget, self.density, self.sinks, self.local_window)
        if self.group not in ("kv", "q"):
            raise SpecError(f"{self.name}: group must be 'kv' or 'q', got {self.group!r}")

    @property
    def local_window(self) -> int:
        return self.window if self.window is not None else self.block

    @property
    def block_k(self) -> int:
        """The key block size in tokens, as Selections and kernels name it (spec: ``key_block``, else ``block``)."""
        return self.key_block if self.key_block is not None else self.block

    @property
    def capped(self) -> bool:
        """Whether a budget limits the keys (given, or the method's default); False: the method sizes its own
        choice (``default_budget = None``, flexprefill's gamma)."""
        return self.budget is not None or self.density is not None or self.default_budget is not None

    def token_budget(self, causal_keys: Tensor) -> Tensor:
        """Keys allowed per query block, given how many causal keys its last query has."""
        if self.density is not None:
            return (causal_keys.double() * self.density).floor().long()
        budget = self.budget if self.budget is not None else self.default_budget
        return causal_keys.new_full(causal_keys.shape, budget if budget is not None else 2**62)

    def quota(self, q: Tensor, k: Tensor) -> BlockQuota:
        """Which key blocks each query block may choose and how many (budget minus sinks and window)."""
        return _cached_quota(self, q.shape[2], k.shape[2], q.device)

    def make_quota(self, t_q: int, t_k: int, dev: torch.device) -> BlockQuota:
        bs, bk, window, sinks = self.block, self.block_k, self.local_window, self.sinks
        n_qb, n_kb = math.ceil(t_q / bs), math.ceil(t_k / bk)
        first = (t_k - t_q) + torch.arange(n_qb, device=dev) * bs
        last = torch.clamp(first + bs - 1, max=t_k - 1)
        budget = self.token_budget(last + 1)
        # no budget anywhere (flexprefill's default: its gamma sizes each block's choice): every candidate may be
        # taken, but a block is not dense by budget, so the method still chooses
        dense_block = budget >= last + 1 if self.capped else torch.zeros_like(last, dtype=torch.bool)
        k_lo = torch.arange(n_kb, device=dev) * bk
        k_hi = torch.clamp(k_lo + bk, max=t_k)
        # a block is worth choosing if some of its keys lie behind the window of some query, past the sinks
        candidate = (k_lo[None, :] <= (last - window)[:, None]) & (k_hi[None, :] > sinks)
        n_cand = candidate.sum(-1)
        n_take = torch.div(budget - sinks - window, bk, rounding_mode="floor").clamp(min=0)
        n_take = torch.where(dense_block, n_cand, torch.minimum(n_take, n_cand))
        return BlockQuota(t_q, t_k, n_qb, n_kb, first, last, candidate, n_take, bool(dense_block.all()))

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        quota = self.quota(q, k)
        done = self.trivial(q, k, quota, ctx)
        return done if done is not None else self.choose(q, k, quota, ctx)

    def choose(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        """Score and pick blocks once the budget is known to need it (not full, some block to choose)."""
        raise NotImplementedError

    def key_stats(self, k: Tensor, ctx: SelectContext, stats: tuple[str, ...]) -> dict[str, Tensor]:
        """Per-key-block statistics: from the cache's incremental summaries when they match, else computed."""
        summ = ctx.summaries
        if summ is not None and getattr(summ, "block", None) == self.block_k and set(stats) <= set(summ.stats):
            return summ.get(k)
        return block_stats(k, self.block_k, stats)

    def trivial(self, q: Tensor, k: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection | None:
        """The selection when nothing needs scoring: full budget (exactly dense) or no block to choose."""
        batch, dev = q.shape[0], q.device
        if quota.dense:
            return Selection.dense(batch, quota.t_q, quota.t_k, key_mask=ctx.key_mask, block=self.block, device=dev)
        if quota.k_max == 0:
            idx = torch.full((batch, self.heads(q, k), quota.n_qb, 0), -1, dtype=torch.long, device=dev)
            return self.selection(idx, quota, ctx)
        return None

    def heads(self, q: Tensor, k: Tensor) -> int:
        return k.shape[1] if self.group == "kv" else q.shape[1]

    def selection(self, indices: Tensor, quota: BlockQuota, ctx: SelectContext) -> Selection:
        return Selection(indices, quota.t_q, quota.t_k, self.block, self.block_k, self.sinks, self.local_window,
                         ctx.key_mask)

    def top_blocks(self, scores: Tensor, quota: BlockQuota, ctx: SelectContext, n_take: Tensor | None = None
                   ) -> Selection:
        """Keep each query block's best-scoring candidate blocks: scores (B, H, nQB, nKB), higher is better.

        ``n_take`` (broadcastable to (B, H, nQB)) lowers the per-block count for adaptive methods; it never
        raises it past the budget. Blocks scored -inf are never chosen.
        """
        if n_take is None:
            limit, k_max = quota.n_take, quota.k_max
        else:
            limit = torch.minimum(n_take, quota.n_take)
            k_max = int(limit.max().item()) if limit.numel() else 0
        scores = scores.masked_fill(quota.blocked, float("-inf"))
        k_max = min(k_max, quota.n_kb)
        top_val, top_idx = scores.topk(k_max, dim=-1)
        rank = torch.arange(k_max, device=scores.device)
        keep = torch.isfinite(top_val) & (rank < limit.unsqueeze(-1))
        idx = torch.where(keep, top_idx, torch.full_like(top_idx, -1))
        return self.selection(idx, quota, ctx)


@dataclass(frozen=True)
class PhaseGated(BudgetedMethod):
    """A block selector that can leave a phase, or the model's first layers, to dense attention.

    ``prefill=dense`` attends every key while reading a prompt (a call with more than one query) and selects only
    in decode, as Quest's paper runs it; ``decode=dense`` is the converse, as MInference and FlexPrefill decode.
    Both dense would be dense attention under another name, and is refused. A prompt's last token held back as
    the first decode step (under a press, see ``runtime``) counts as decode. ``sparse`` stays the default in both
    so that rows recorded before the options keep their meaning.

    ``dense_layers=N`` attends every key in the model's first N layers. Why: on SmolLM2 at 8k, the prose needles
    ``flexprefill:density=0.1`` lost in the middle of the text came back with its first layers dense, and not
    with the answer rows dense (docs/tuned.md, "Which layers lose it"); Quest's code keeps its first two layers
    dense. A dense layer costs what dense attention costs there; the rest stay sparse.
    """

    prefill: str = param("sparse", "sparse: a prompt's queries choose their blocks; dense: a prompt attends every "
                         "key and only decode selects (Quest's paper)")
    decode: str = param("sparse", "sparse: a decode step chooses its blocks; dense: decode attends every key (the "
                        "rule of MInference and FlexPrefill, and faster for them)")
    dense_layers: int = param(0, "the model's first N layers attend every key, in prefill and decode")

    def __post_init__(self) -> None:
        super().__post_init__()
        for phase in ("prefill", "decode"):
            if getattr(self, phase) not in ("sparse", "dense"):
                raise SpecError(f"{self.name}: {phase} must be 'sparse' or 'dense', got {getattr(self, phase)!r}")
        if self.prefill == self.decode == "dense":
            raise SpecError(f"{self.name}: prefill=dense and decode=dense attend every key in both phases: that is "
                            "dense attention; keep one of them sparse, or use dense")
        check_int(self, "dense_layers", self.dense_layers, minimum=0)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a ``dense_layers`` that leaves none of the layers this method acts on sparse: the method would
        be dense attention under another name."""
        layers = selectable_layers(model)
        if self.dense_layers and layers is not None and not any(i >= self.dense_layers for i in layers):
            raise SpecError(f"{self.name}: dense_layers={self.dense_layers} leaves no layer sparse: this model's "
                            f"layers with full attention are {layers}; use a smaller dense_layers, or dense")

    def select(self, q: Tensor, k: Tensor, ctx: SelectContext) -> Selection:
        phase = self.prefill if q.shape[2] > 1 else self.decode
        if ctx.layer_idx < self.dense_layers or phase == "dense":
            return Selection.dense(q.shape[0], q.shape[2], k.shape[2], key_mask=ctx.key_mask, block=self.block,
                                   device=q.device)
        return super().select(q, k, ctx)


@dataclass(frozen=True)
class PrefillPattern(PhaseGated):
    """A method that estimates a prefill pattern from the last queries' exact attention (vslash, flexprefill).

    In decode the one query is its own estimate: choosing its blocks costs a pass of q over every key, so a
    sparse decode step does dense attention's work and then attends again, and is slower than dense
    (``decode=dense``: every key, exactly, as the papers decode).
    """


def selectable_layers(model: torch.nn.Module) -> list[int] | None:
    """Indices of the layers a select method acts on: every layer but the model's own local ones (sliding-window
    or chunked layers keep their attention), from the config's ``layer_types``; None when the config does not say
    how many layers there are."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    n = getattr(text, "num_hidden_layers", None)
    if not isinstance(n, int):
        return None
    types = getattr(text, "layer_types", None) or ["full_attention"] * n
    return [i for i, t in enumerate(types) if t not in ("sliding_attention", "chunked_attention")]


@functools.lru_cache(maxsize=16)
def _cached_quota(method: BudgetedMethod, t_q: int, t_k: int, dev: torch.device) -> BlockQuota:
    """Plans depend only on the method's parameters and the shapes; consumers never modify them."""
    return method.make_quota(t_q, t_k, dev)


def check_int(method: Method, field: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{method.name}: {field} must be an integer >= {minimum}, got {value!r}")


def check_fraction(method: Method, field: str, value: object) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, float | int) or not 0 < value <= 1):
        raise SpecError(f"{method.name}: {field} must be in (0, 1], got {value!r}")


def check_budget(method: Method, budget: int | None, density: float | None, sinks: int, window: int,
                 required: bool = False) -> None:
    """The budget vocabulary selectors and presses share: ``budget`` keys or a ``density`` of them, not both
    (``required``: one of them); a budget holds at least the always-kept sinks + window."""
    if budget is not None and density is not None:
        raise SpecError(f"{method.name}: give budget= or density=, not both")
    if required and budget is None and density is None:
        raise SpecError(f"{method.name}: give budget= (keys per head) or density= (fraction kept), "
                        f"e.g. {method.name}:density=0.25")
    if budget is not None:
        check_int(method, "budget", budget, minimum=1)
        if budget < sinks + window:
            raise SpecError(f"{method.name}: budget={budget} is smaller than the always-kept sinks + window "
                            f"({sinks} + {window}); raise budget or lower sinks/window")
    check_fraction(method, "density", density)
