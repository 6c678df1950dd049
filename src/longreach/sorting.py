"""Attention sorting (Peysakhovich & Lerer 2023, arXiv:2310.01427): re-order a prompt's documents by the attention
the answer's first query pays them, most attended last, so the document the model already leans on sits next to
the question, where recency bias helps instead of hurting.

A generation *procedure*, not an attention method, so it is not a spec: each round is one dense prefill of the
whole prompt; the last position's attention (the query that would write the first answer token) is summed over
each document's tokens and averaged over every query head of every layer; the documents are then sorted
ascending by it (ties keep their order). The sorted prompt is answered under any spec with ``apply`` +
``generate``, so sorting composes with every method (docs/attention-sorting.md).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .analysis.capture import check_all_layers
from .documents import Documents
from .errors import InputError
from .generation import prefill_chunks
from .hf import apply
from .methods.scoring import causal_probs


@dataclass(frozen=True)
class SortedDocuments:
    """What ``sort_documents`` returns: the final order, the attention each round measured, and what it cost."""

    original: Documents
    order: tuple[int, ...]  # order[j]: the original index of the document now j-th
    attention: tuple[tuple[float, ...], ...]  # per round, each document's attention, indexed by ORIGINAL document,
    #                                           measured on the order that round started from
    seconds: float  # wall time of all sorting passes (each a prefill of the whole prompt)
    tokens: tuple[int, ...]  # prompt tokens of each pass

    @property
    def rounds(self) -> int:
        return len(self.attention)

    @property
    def documents(self) -> Documents:
        return self.original.reordered(self.order)

    @property
    def prompt(self) -> str:
        """The sorted prompt, ready to tokenize and ``generate`` from (the original one after 0 rounds)."""
        return self.documents.prompt

    def position(self, index: int) -> int:
        """Where original document ``index`` ended up (0 = first)."""
        return self.order.index(index)

    def record(self) -> dict:
        """What a sorting found, as JSON (the documents themselves are the prompt's: ``from_record`` takes them)."""
        return {"order": list(self.order), "attention": [list(a) for a in self.attention], "seconds": self.seconds,
                "tokens": list(self.tokens)}

    @classmethod
    def from_record(cls, original: Documents, record: dict) -> SortedDocuments:
        order = tuple(int(i) for i in record["order"])
        if sorted(order) != list(range(len(original.documents))):
            raise ValueError(f"a sorting of {len(order)} documents does not fit a prompt of "
                             f"{len(original.documents)}")
        return cls(original, order, tuple(tuple(float(x) for x in a) for a in record["attention"]),
                   float(record["seconds"]), tuple(int(t) for t in record["tokens"]))


def token_spans(tokenizer, docs: Documents, add_special_tokens: bool = True) -> tuple[Tensor, list[tuple[int, int]]]:
    """``(input_ids (1, T), [(lo, hi) per document])``: each document's tokens in the tokenized prompt.

    A token belongs to the document holding its first character, else its last (a token that starts in the
    separator, e.g. ' word'); separator, prefix and question tokens belong to none. Needs a fast tokenizer's
    character offsets.
    """
    try:
        enc = tokenizer(docs.prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:
        raise InputError("attention sorting maps documents to tokens by character offsets, which this tokenizer "
                         "does not give; load the model's fast tokenizer") from None
    spans = docs.char_spans()
    starts = [lo for lo, _ in spans]

    def owner(char: int) -> int:
        i = bisect.bisect_right(starts, char) - 1
        return i if i >= 0 and spans[i][0] <= char < spans[i][1] else -1

    tokens: list[list[int]] = [[] for _ in spans]
    for t, (lo, hi) in enumerate(enc["offset_mapping"]):
        if hi <= lo:  # special tokens (BOS) have no characters
            continue
        d = owner(lo)
        d = d if d >= 0 else owner(hi - 1)
        if d >= 0:
            tokens[d].append(t)
    out = []
    for d, idx in enumerate(tokens):
        if not idx:
            raise InputError(f"document {d} got no token of its own (its text merged into a neighbour's tokens); "
                             "put a separator between documents")
        out.append((idx[0], idx[-1] + 1))
    return torch.tensor([enc["input_ids"]]), out


@torch.no_grad()
def document_attention(model: nn.Module, input_ids: Tensor, spans: Sequence[tuple[int, int]], *,
                       chunk: int | None = None, kernel: str = "auto") -> Tensor:
    """Attention each token span receives from the last position, (n_spans,) fp32: that query's softmax row
    summed over the span's keys, averaged over every query head of every layer (a sliding-window layer
    contributes what its window sees). One dense prefill of ``input_ids`` (1, T); only the last query's row is
    computed, from the q/k the observer sees, with the model's own softmax (softcap, sinks)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError(f"document_attention takes one sequence, input_ids (1, T); got {tuple(input_ids.shape)}")
    n_tokens, n_spans = input_ids.shape[1], len(spans)
    owner = torch.full((n_tokens,), n_spans, dtype=torch.long)  # n_spans: a token of no span
    for i, (lo, hi) in enumerate(spans):
        if not 0 <= lo < hi <= n_tokens:
            raise InputError(f"span {i} ({lo}, {hi}) is not a non-empty range inside the {n_tokens} tokens")
        if (owner[lo:hi] != n_spans).any():
            raise InputError(f"span {i} ({lo}, {hi}) overlaps an earlier span: each token counts for one document")
        owner[lo:hi] = i
    per_layer: dict[int, Tensor] = {}
    step = chunk or n_tokens
    end = [min(step, n_tokens)]  # one past the last position of the forward running now
    with apply(model, "dense", kernel=kernel, track_density=False) as handle:
        def observe(layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int | None,
                    key_mask: Tensor | None) -> None:
            if end[0] < n_tokens:  # an earlier chunk of a chunked prefill: the last query comes later
                return
            last = torch.tensor([q.shape[2] - 1], device=q.device)
            probs = causal_probs(q, k, scale, last, key_mask, window, handle.softmax_extras(layer))
            row = probs[0].mean(dim=(0, 1, 2)).cpu()  # (B, Hkv, G, 1, Tk) -> (Tk,): mean over query heads
            # the keys are the last Tk positions (a sliding layer's cache keeps only its window)
            mass = torch.zeros(n_spans + 1).index_add_(0, owner[n_tokens - row.shape[0]:], row)
            per_layer[layer] = mass[:n_spans]

        handle.observer = observe
        mask = torch.ones_like(input_ids, device=model.device)
        for _, hi, _, _ in prefill_chunks(model, input_ids.to(model.device), chunk, None, mask, logits_to_keep=1):
            end[0] = min(hi + step, n_tokens)
    check_all_layers(model, set(per_layer))
    return torch.stack([per_layer[i] for i in sorted(per_layer)]).mean(dim=0)


def sort_documents(model: nn.Module, tokenizer, documents: Sequence[str], prefix: str = "", question: str = "", *,
                   separator: str = "\n\n", rounds: int = 1, add_special_tokens: bool = True,
                   chunk: int | None = None, kernel: str = "auto") -> SortedDocuments:
    """Attention sorting: ``rounds`` times, measure each document's attention (:func:`document_attention`) on
    the current order and sort the documents ascending by it, the most attended last.

    Call it on a model with no longreach method applied (each pass applies ``dense`` itself); then answer
    ``result.prompt`` under any spec. Costs ``rounds`` prefills of the whole prompt; ``rounds=0`` returns the
    prompt untouched without running the model. ``add_special_tokens=False`` for a chat-templated prompt.

    >>> result = longreach.sort_documents(model, tok, docs, prefix, question, rounds=2)
    >>> with longreach.apply(model, "snapkv:density=0.25"):
    ...     out = longreach.generate(model, tok(result.prompt, return_tensors="pt"), 32)
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise InputError(f"rounds must be an integer >= 0, got {rounds!r}")
    original = Documents(tuple(documents), prefix, question, separator)
    n = len(original.documents)
    order, history, tokens = list(range(n)), [], []
    start = time.perf_counter()
    for _ in range(rounds):
        ids, spans = token_spans(tokenizer, original.reordered(order), add_special_tokens)
        mass = document_attention(model, ids, spans, chunk=chunk, kernel=kernel).tolist()  # by current position
        by_original = [0.0] * n
        for pos, index in enumerate(order):
            by_original[index] = mass[pos]
        history.append(tuple(by_original))
        tokens.append(ids.shape[1])
        order = [order[p] for p in sorted(range(n), key=mass.__getitem__)]  # stable: ties keep their order
    return SortedDocuments(original, tuple(order), tuple(history), time.perf_counter() - start, tuple(tokens))
