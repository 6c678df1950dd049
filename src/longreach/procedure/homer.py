"""HOMER: hierarchical context merging (Song et al., ICLR 2024), training-free.

The prompt is split into chunks that fit the trained window, each carrying the shared prefix (instruction) and
suffix (question). Every chunk runs the lower layers alone; then, level by level up the layers, neighbouring
chunks are merged (concatenated, the shared prefix and suffix averaged), each first pruned to half a chunk by
token reduction, so a merged chunk is never longer than one chunk. Reduction keeps the context tokens that the
chunk's final token attends to most (max over heads, at the last layer the chunk runs before it merges);
propagative refinement drops the pruned tokens from the chunk's lower-layer caches too, so in the end every layer
caches the same ``final_length <= chunk`` tokens: a normal KV cache that the model decodes from.

The plan (chunks, layer spans, budgets, positions, memory) is ``schedule.HomerSchedule``; this module runs it.
Calibration (``calibrate=1``): the final token's attention favours recent and initial tokens whatever they say, so
a needle far from the chunk's end can lose to filler near it. The authors subtract from the final token's logits a
per-layer bias by relative distance, measured beforehand on calibration text; here the bias is measured on the
chunk itself: the mean logit, over a few hundred of the chunk's rows, of the keys at each distance (in
quarter-octave bins), so what is left is how much more the final token attends a key than rows in general attend
keys that far away. Other simplifications (docs/homer.md): an even context split, and positions shifted so that
decoding continues at the cache length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..compat import trained_length
from ..errors import InputError, SpecError
from ..methods.base import check_int, param
from ..methods.registry import register
from .base import Prefilled, Procedure, ProcedurePlan
from .decoder import Decoder
from .schedule import HomerSchedule

WARMUP_FRACTION = 3 / 8  # the paper's Llama-2 setting: 12 of 32 layers run on the chunks alone
BINS_PER_OCTAVE = 4  # distance bins of the calibration: [0], [1], ... finer near the token, a quarter octave far
SAMPLE_ROWS = 256  # rows whose logits measure the bias (evenly spaced, the last always in)


def distance_bin(distance: Tensor) -> Tensor:
    """Calibration bin of each distance >= 0: floor(4 log2(d + 1)). Distances 0-6 have a bin each (0, 4, 6, 8, 9,
    10, 11); from 7 on, about four bins an octave."""
    return (torch.log2(distance.double() + 1) * BINS_PER_OCTAVE).floor().long()


def sample_rows(t: int, device: torch.device | None = None) -> Tensor:
    """At most ``SAMPLE_ROWS`` evenly spaced rows of ``t``, the last included (its distances are the ones ranked)."""
    return torch.linspace(0, t - 1, min(t, SAMPLE_ROWS), device=device).round().long().unique()


def distance_bias(logits: Tensor, rows: Tensor, positions: Tensor, leaves: Tensor, final_position: int) -> Tensor:
    """Per key, the mean of ``logits`` (R, T: the sampled rows' logits over the keys, max over heads; -inf where a
    row cannot see a key) over the (row, key) pairs whose position distance falls in the same bin as the key's
    distance from ``final_position``. Only pairs within one leaf chunk count (``leaves``: each row's leaf, -1 for
    the shared prefix and suffix, which go with any leaf): in a merged chunk the leaves share one position range,
    so a distance between two leaves' tokens measures nothing. Every bin the final row needs is filled when the
    final row, a suffix row, is among ``rows``."""
    d = positions[rows][:, None] - positions[None, :]
    mine, theirs = leaves[rows][:, None], leaves[None, :]
    seen = torch.isfinite(logits) & (d >= 0) & ((mine == theirs) | (mine < 0) | (theirs < 0))
    bins = distance_bin(d[seen])
    wanted = distance_bin(final_position - positions)
    n = int(max(bins.max(), wanted.max())) + 1
    sums = torch.bincount(bins, weights=logits[seen].double(), minlength=n)
    counts = torch.bincount(bins, minlength=n)
    return (sums / counts.clamp(min=1))[wanted].to(logits.dtype)


@dataclass(frozen=True, eq=False)
class Reduction:
    """One token reduction: which context tokens a node kept, ranked at which layer."""

    level: int  # 0 = leaves
    index: int  # node index within its level
    layer: int  # the layer whose attention ranked the tokens
    kept: Tensor  # prompt indices of the context tokens kept, in order
    scores: Tensor  # significance of every row of the node at that layer (T,)


@dataclass
class _Node:
    """A chunk on its way up: its rows (causal order), and per layer it has run, their keys and values."""

    hidden: Tensor  # (1, T, hidden): output of the last layer run
    positions: Tensor  # (T,) position ids
    tokens: Tensor  # (T,) prompt index of each row (a shared prefix/suffix row: that token's index)
    keys: list[Tensor]  # per layer, (1, Hkv, T, D), rotated at ``positions``
    values: list[Tensor]


@register
@dataclass(frozen=True)
class Homer(Procedure):
    name: ClassVar[str] = "homer"
    summary: ClassVar[str] = ("hierarchical context merging: chunks run the lower layers alone and merge pairwise "
                              "up the layers after token reduction; the cache holds one chunk (HOMER)")
    paper: ClassVar[str] = ("Hierarchical Context Merging: Better Long Context Understanding for Pre-trained LLMs "
                            "(ICLR 2024, arXiv:2404.10308)")

    chunk: int | None = param(None, "longest chunk in tokens, prefix and suffix included, and the most tokens the "
                                    "final cache holds (default: half the trained window, as in the paper)")
    prefix: int = param(64, "first prompt tokens every chunk shares (the instruction); never pruned")
    suffix: int = param(64, "last prompt tokens every chunk shares (the question); never pruned, and its final "
                            "token ranks the others")
    warmup: int | None = param(None, "layers every chunk runs alone before merging starts (default 3/8 of the "
                                     "layers: the paper's 12 of 32)")
    final: int = param(1, "final tokens of a chunk whose attention ranks its tokens (the paper: 1)")
    calibrate: int = param(0, "1: rank by the final token's attention logits minus the chunk's mean logit at the "
                              "same distance (the paper's calibration, measured on the chunk itself); 0: by its "
                              "attention probabilities as they are")

    def __post_init__(self) -> None:
        if self.chunk is not None:
            check_int(self, "chunk", self.chunk, minimum=4)
        check_int(self, "prefix", self.prefix, minimum=0)
        check_int(self, "suffix", self.suffix, minimum=0)
        if self.warmup is not None:
            check_int(self, "warmup", self.warmup, minimum=0)
        check_int(self, "final", self.final, minimum=1)
        if self.calibrate not in (0, 1):
            raise SpecError(f"homer: calibrate is 0 (off) or 1 (on), got {self.calibrate}")
        if self.final > max(self.suffix, 1):
            raise SpecError(f"homer: final={self.final} ranks by more tokens than the suffix={self.suffix} holds; "
                            "the ranking tokens are the question's last ones")
        if self.chunk is not None and self.prefix + self.suffix + 2 > self.chunk:
            raise SpecError(f"homer: prefix={self.prefix} + suffix={self.suffix} leave no room for context in "
                            f"chunk={self.chunk}; use a larger chunk or shorter prefix/suffix")

    # -- what the schedule needs from the model ---------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        Decoder.of(model, "homer")

    def reach(self, trained: int) -> int | None:
        # every node, merged or not, holds at most `chunk` positions, whatever the prompt's length
        return None if self.chunk is None or self.chunk <= trained else trained

    def chunk_for(self, model: nn.Module) -> int:
        if self.chunk is not None:
            return self.chunk
        trained = trained_length(model)
        if trained is None:
            raise InputError(f"homer: {type(model).__name__}'s config names no trained length to halve for the "
                             "chunk size; give one, e.g. homer:chunk=2048")
        return trained // 2

    def schedule(self, model: nn.Module, tokens: int) -> HomerSchedule:
        layers = model.config.num_hidden_layers
        warmup = self.warmup if self.warmup is not None else round(WARMUP_FRACTION * layers)
        return HomerSchedule(tokens, self.prefix, self.suffix, self.chunk_for(model), layers, warmup)

    def replaces(self, model: nn.Module, tokens: int) -> bool:
        return tokens > self.chunk_for(model)

    def plan(self, model: nn.Module, tokens: int) -> ProcedurePlan:
        s = self.schedule(model, tokens)
        mem = s.memory()
        if s.single:
            note = f"homer: {tokens} tokens fit one chunk of {s.chunk}: the model's own prefill, nothing merged"
        else:
            lo, hi = s.span(0)
            note = (f"homer: {s.leaves} chunks of <= {s.leaf_length} tokens run layers {lo}-{hi - 1} alone, then "
                    f"{s.height} merge levels of {s.span(1)[1] - s.span(1)[0]} layers; the final cache holds "
                    f"{s.final_length} tokens at positions {s.shift}..{s.final_length - 1} (chunk {s.chunk})")
        rows = self.final + (len(sample_rows(mem.forward_max)) if self.calibrate and not s.single else 0)
        return ProcedurePlan(mem.kv_peak, mem.kv_final, mem.waiting_rows, mem.forward_max, (note,), rows)

    # -- the run ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, model: nn.Module, input_ids: Tensor, cache: object) -> Prefilled:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise InputError(f"homer reads one prompt at a time: input_ids of shape (1, n), got "
                             f"{tuple(input_ids.shape)}")
        run = _Run(Decoder.of(model, "homer"), self.schedule(model, input_ids.shape[1]), input_ids[0], self.final,
                   bool(self.calibrate))
        root = run.walk(run.plan.height, 0)
        for i in range(run.decoder.n_layers):
            cache.update(root.keys[i], root.values[i], i)  # type: ignore[attr-defined]
            root.keys[i] = root.values[i] = None  # type: ignore[call-overload]
        return Prefilled(run.decoder.logits(root.hidden), root.tokens.numel(), root.tokens, root.positions,
                         tuple(run.reductions))


class _Run:
    """One prompt's depth-first walk of the merge tree (left subtree, right subtree, merge: the order the paper
    proposes, so at most one finished subtree per level waits for its sibling)."""

    def __init__(self, decoder: Decoder, plan: HomerSchedule, ids: Tensor, final: int, calibrate: bool) -> None:
        self.decoder, self.plan, self.ids, self.final, self.calibrate = decoder, plan, ids, final, calibrate
        self.reductions: list[Reduction] = []

    def walk(self, level: int, index: int) -> _Node:
        if level == 0:
            node = self.leaf(index)
        else:
            left = self.walk(level - 1, 2 * index)
            node = self.merge(left, self.walk(level - 1, 2 * index + 1))
        return self.run(node, level, index)

    def leaf(self, index: int) -> _Node:
        p, device = self.plan, self.ids.device
        lo, hi = p.bounds(index)
        n = self.ids.shape[0]
        rows = torch.cat([torch.arange(p.head, device=device), torch.arange(lo, hi, device=device),
                          torch.arange(n - p.tail, n, device=device)])
        positions = torch.tensor(p.positions(index), device=device)
        return _Node(self.decoder.embed(self.ids[rows]), positions, rows, [], [])

    def merge(self, left: _Node, right: _Node) -> _Node:
        """[averaged prefix, left context, right context, averaged suffix], in every tensor and every layer; each
        child's per-layer tensors are dropped as soon as they are joined."""
        p = self.plan

        def join(a: Tensor, b: Tensor, dim: int, average: bool) -> Tensor:
            ta, tb = a.shape[dim], b.shape[dim]
            parts = [a.narrow(dim, p.head, ta - p.head - p.tail), b.narrow(dim, p.head, tb - p.head - p.tail)]
            head, tail = a.narrow(dim, 0, p.head), a.narrow(dim, ta - p.tail, p.tail)
            if average:  # the shared prefix/suffix rows saw different contexts below: the paper averages them
                head = (head + b.narrow(dim, 0, p.head)) / 2
                tail = (tail + b.narrow(dim, tb - p.tail, p.tail)) / 2
            return torch.cat([head, *parts, tail], dim=dim)

        keys, values = [], []
        for i in range(len(left.keys)):
            keys.append(join(left.keys[i], right.keys[i], 2, True))
            values.append(join(left.values[i], right.values[i], 2, True))
            left.keys[i] = right.keys[i] = left.values[i] = right.values[i] = None  # type: ignore[call-overload]
        return _Node(join(left.hidden, right.hidden, 1, True), join(left.positions, right.positions, 0, False),
                     join(left.tokens, right.tokens, 0, False), keys, values)

    def run(self, node: _Node, level: int, index: int) -> _Node:
        """The node's layers, then its token reduction at the end of the last one."""
        start, stop = self.plan.span(level)
        rope = self.decoder.rope(node.hidden, node.positions)
        budget = self.plan.budget(level, index)
        context = node.hidden.shape[1] - self.plan.head - self.plan.tail
        scores = None
        for i in range(start, stop):
            hidden_in = node.hidden
            node.hidden, k, v = self.decoder.layer(i, hidden_in, node.positions, rope)
            node.keys.append(k)
            node.values.append(v)
            if i == stop - 1 and context > budget:
                scores = self.significance(i, hidden_in, k, rope, node)
        if scores is None:
            return node
        return self.reduce(node, scores, budget, level, index, stop - 1)

    def significance(self, i: int, hidden_in: Tensor, keys: Tensor, rope: tuple[Tensor, Tensor], node: _Node
                     ) -> Tensor:
        """(T,) how much the final token(s) attend each row at layer ``i``: the mean over the final rows, max over
        heads, of the probabilities, or with ``calibrate`` of the logits minus their distance bias (measured from
        the last row's position, also for ``final > 1``)."""
        if not self.calibrate:
            return self.decoder.attention_from_last(i, hidden_in, keys, rope, self.final).mean(dim=1).amax(dim=0)
        t = keys.shape[2]
        final = torch.arange(t - self.final, t, device=keys.device)
        logits = self.decoder.attention_logits(i, hidden_in, keys, rope, final).mean(dim=1).amax(dim=0)
        rows = sample_rows(t, keys.device)
        sampled = self.decoder.attention_logits(i, hidden_in, keys, rope, rows).amax(dim=0)  # (R, T)
        bias = distance_bias(sampled, rows, node.positions, self.leaves(node.tokens), int(node.positions[-1]))
        return logits - bias

    def leaves(self, tokens: Tensor) -> Tensor:
        """The leaf chunk each row's prompt index came from; -1 for the shared prefix and suffix."""
        p, n = self.plan, self.ids.shape[0]
        starts = torch.tensor([p.bounds(leaf)[0] for leaf in range(p.leaves)], device=tokens.device)
        leaf = torch.searchsorted(starts, tokens, right=True) - 1
        return leaf.masked_fill((tokens < p.head) | (tokens >= n - p.tail), -1)

    def reduce(self, node: _Node, scores: Tensor, budget: int, level: int, index: int, layer: int) -> _Node:
        """Keep the prefix, the suffix and the ``budget`` context rows with the highest scores (in order), in the
        hidden states and in every layer's cache (propagative refinement)."""
        head, t = self.plan.head, node.hidden.shape[1]
        ctx = scores[head:t - self.plan.tail]
        best = ctx.topk(budget).indices.sort().values + head
        keep = torch.cat([torch.arange(head, device=best.device), best,
                          torch.arange(t - self.plan.tail, t, device=best.device)])
        self.reductions.append(Reduction(level, index, layer, node.tokens[best], scores))
        for i in range(len(node.keys)):
            node.keys[i] = node.keys[i].index_select(2, keep)
            node.values[i] = node.values[i].index_select(2, keep)
        return _Node(node.hidden.index_select(1, keep), node.positions[keep], node.tokens[keep], node.keys,
                     node.values)
