"""The query blocks of the last queries of attention-estimating selectors (vslash, flexprefill, anchor) keep what
those queries need.

A key block that only the question attends to (the needle it asks for) weighs 1/last_q in a pattern averaged over
the last queries, or in anchor's mean query of the block; the selectors also rank every query block the last
queries fall in by those queries' exact attention (anchor: each query against its own anchor), two blocks when the
prompt ends just past a block boundary.
"""

from __future__ import annotations

import math

import pytest
import torch

from longreach import parse_spec
from longreach.methods import SelectContext

NEEDLE_BLOCK = 2  # keys 128..191
SCALE = 0.125
ESTIMATORS = ["vslash", "flexprefill", "anchor"]


def _spec(method: str, density: float) -> str:
    """anchor's stripes are 16 keys by default: 64 here, so every method's key blocks are the same (NEEDLE_BLOCK
    and the two-block budget below count 64-key blocks)."""
    return f"{method}:density={density}" + (",key_block=64" if method == "anchor" else "")


def _needle_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """512 random keys (d=64) in blocks of 64. The last block's queries attend mostly 5 keys back (inside the
    window) and some 100 keys back (a diagonal crossing key blocks 5 and 6); only the final query matches the
    needle, 8 keys in block 2."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, 512, 64, generator=g)
    q = torch.randn(1, 2, 512, 64, generator=g) * 0.3
    for i in range(448, 511):
        q[0, :, i] = k[0, 0, i - 100] + 1.2 * k[0, 0, i - 5]
    u = torch.randn(64, generator=g)
    u = u / u.norm()
    k[0, 0, 130:138] = 8 * u
    q[0, :, -1] = 8 * u
    return q, k


def _last_block_keys(spec: str, q: torch.Tensor, k: torch.Tensor) -> set[int]:
    sel = parse_spec(spec).selector.select(q, k, SelectContext(scale=SCALE))
    return {int(b) for b in sel.indices[0, :, -1].flatten() if b >= 0}


@pytest.mark.parametrize("method", ESTIMATORS)
def test_the_block_only_the_final_query_needs_is_kept_for_the_last_block(method):
    q, k = _needle_inputs()
    # the oracle: the final query's exact attention puts most of its mass on the needle's keys
    probs = (q[0, 0, -1] @ k[0, 0].T * SCALE).softmax(-1)
    assert probs[130:138].sum() > 0.5
    # and none of the other queries of the last block puts as much in any candidate block
    others = (q[0, 0, 448:511] @ k[0, 0].T * SCALE).softmax(-1)[:, :384].reshape(63, 6, 64).sum(-1)
    assert others.max() < probs[128:192].sum()
    spec = _spec(method, 0.45)  # 230 keys: sinks 4 + window 64 + two chosen blocks of 64
    assert NEEDLE_BLOCK in _last_block_keys(spec, q, k)
    # estimated from the average of the last 64 queries (anchor: their mean query), the needle's block loses: the
    # test can fail
    assert NEEDLE_BLOCK not in _last_block_keys(spec + ",exact_last=false", q, k)


@pytest.mark.parametrize("exact_last", [True, False])
def test_flexprefill_chooses_the_same_blocks_when_its_estimate_runs_a_few_kv_heads_at_a_time(monkeypatch, exact_last):
    """Long prompts take the last queries' probabilities a few KV heads per pass (the memory cap, PASS_BYTES); the
    choice must be the one a single pass over all heads makes (SmolLM2 at 8k took two passes, and the second read
    the first pass's result in place of the queries)."""
    from longreach.methods import flexprefill

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 6, 512, 64, generator=g), torch.randn(1, 3, 512, 64, generator=g)
    spec = f"flexprefill:density=0.3,exact_last={str(exact_last).lower()}"
    one_pass = parse_spec(spec).selector.select(q, k, SelectContext(scale=SCALE))
    monkeypatch.setattr(flexprefill, "PASS_BYTES", 4 * 2 * 64 * 512)  # one KV head's probabilities per pass
    per_head = parse_spec(spec).selector.select(q, k, SelectContext(scale=SCALE))
    assert torch.equal(one_pass.indices, per_head.indices)


def _question_before_the_boundary(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """513 keys: the prompt ends one token past a block boundary, so the last query block holds one query and the
    question's last words (queries 509..511, which alone match the needle in block 2) sit in the block before it."""
    q, k = _needle_inputs(seed)
    k = torch.cat([k, torch.randn(1, 1, 1, 64, generator=torch.Generator().manual_seed(seed + 1))], dim=2)
    q = torch.cat([q, q[:, :, -1:] * 0], dim=2)  # the final query matches nothing in particular
    q[0, :, 509:512] = 8 * k[0, 0, 130] / k[0, 0, 130].norm()
    return q, k


@pytest.mark.parametrize("method", ESTIMATORS)
def test_the_question_before_a_block_boundary_keeps_its_needle(method):
    q, k = _question_before_the_boundary()
    # the oracle: the question's queries put most of their mass on the needle's keys, which the final query does not
    probs = (q[0, 0, 509:512] @ k[0, 0].T * SCALE).softmax(-1)
    assert (probs[:, 130:138].sum(-1) > 0.5).all()
    spec = _spec(method, 0.45)
    sel = parse_spec(spec).selector.select(q, k, SelectContext(scale=SCALE))
    assert NEEDLE_BLOCK in {int(b) for b in sel.indices[0, :, -2].flatten() if b >= 0}  # the question's block
    # by the estimate alone, as that block was ranked before (only the one-query last block was exact), the
    # needle's block is lost: the test can fail
    old = parse_spec(spec + ",exact_last=false").selector.select(q, k, SelectContext(scale=SCALE))
    assert NEEDLE_BLOCK not in {int(b) for b in old.indices[0, :, -2].flatten() if b >= 0}


def test_last_blocks_exact_scores_each_query_block_by_its_own_queries_maximum():
    from longreach.methods.scoring import last_blocks_exact

    g = torch.Generator().manual_seed(4)
    probs = torch.rand(1, 2, 64, 130, generator=g)  # the last 64 of 130 queries: 62 in block 1, 2 in block 2
    got = last_blocks_exact(probs, t_q=130, block_q=64, block_k=32)
    per_key_block = torch.stack([probs[..., i:i + 32].sum(-1) for i in range(0, 130, 32)], dim=-1)  # (1, 2, 64, 5)
    assert got.shape == (1, 2, 2, 5)
    assert torch.allclose(got[:, :, 0], per_key_block[:, :, :62].amax(2))
    assert torch.allclose(got[:, :, 1], per_key_block[:, :, 62:].amax(2))
    one = last_blocks_exact(probs[:, :, -2:], t_q=130, block_q=64, block_k=32)  # only the last block's 2 queries
    assert one.shape == (1, 2, 1, 5) and torch.allclose(one[:, :, 0], got[:, :, 1])
    step = last_blocks_exact(probs[:, :, -1:], t_q=1, block_q=64, block_k=32)  # a prompt of one token
    assert step.shape == (1, 2, 1, 5) and torch.allclose(step[:, :, 0], per_key_block[:, :, -1])
    even = last_blocks_exact(probs, t_q=128, block_q=64, block_k=32)  # an exact multiple: one block
    assert even.shape == (1, 2, 1, 5) and torch.allclose(even[:, :, 0], per_key_block.amax(2))
    wide = last_blocks_exact(probs, t_q=130, block_q=16, block_k=32)  # 64 queries over 5 blocks of 16: 14+16+16+16+2
    bounds = [0, 14, 30, 46, 62, 64]
    assert wide.shape == (1, 2, 5, 5)
    for b in range(5):
        assert torch.allclose(wide[:, :, b], per_key_block[:, :, bounds[b]:bounds[b + 1]].amax(2))


@pytest.mark.parametrize("method", ESTIMATORS)
@pytest.mark.parametrize("inputs, blocks", [(_needle_inputs, 1), (_question_before_the_boundary, 2)])
def test_exact_last_changes_only_the_blocks_of_the_last_queries_and_stays_in_budget(method, inputs, blocks):
    """512 queries: the last 64 fill one block; 513: they fall in two."""
    q, k = inputs(1)
    new, old = (parse_spec(s).selector.select(q, k, SelectContext(scale=SCALE))
                for s in (_spec(method, 0.45), _spec(method, 0.45) + ",exact_last=false"))
    assert torch.equal(new.indices[:, :, :-blocks], old.indices[:, :, :-blocks])
    assert int((new.indices[:, :, -blocks:] >= 0).sum(-1).max()) <= 2  # the two blocks the budget allows


def _anchor_gaps_by_hand(q, k, scale, block, stripe, sinks, window, key_mask, softcap, sink_logits):
    """For each query head and each of the last ``block`` queries, one at a time: its scaled (softcapped) logits
    over the keys it may see, its anchor (the best of the sinks', its own window's and the learned sink's
    logits), each stripe's best logit minus that anchor; then the maximum over the rows of each query block."""
    batch, heads, t_q, _ = q.shape
    n_kv, t_k = k.shape[1], k.shape[2]
    n_stripes = -(-t_k // stripe)
    rows = range(t_q - min(block, t_q), t_q)
    per_block = {}
    for r in rows:
        p = t_k - t_q + r
        got = torch.full((batch, heads, n_stripes), float("-inf"))
        for b in range(batch):
            for h in range(heads):
                kv = h // (heads // n_kv)
                logits = [float(q[b, h, r] @ k[b, kv, j]) * scale for j in range(p + 1)]
                logits = [softcap * math.tanh(x / softcap) for x in logits]
                seen = [j for j in range(p + 1) if key_mask[b, j]]
                anchor = max([logits[j] for j in seen if j < sinks or j > p - window] + [float(sink_logits[h])])
                for j in seen:
                    got[b, h, j // stripe] = max(float(got[b, h, j // stripe]), logits[j] - anchor)
        qb = r // block
        per_block[qb] = got if qb not in per_block else torch.maximum(per_block[qb], got)
    return torch.stack([per_block[b] for b in sorted(per_block)], dim=2)  # (B, Hq, m, nKB)


@pytest.mark.parametrize(("t_q", "t_k"), [(37, 130), (75, 75), (20, 83)])  # a chunk; 16 ∤ 75: two blocks
def test_anchor_compares_each_last_query_with_its_own_anchor(t_q, t_k):
    """The exact rows of anchor's last blocks against a by-hand oracle: a prefill chunk after cached keys, GQA
    (4 query heads over 2 KV heads), padding, softcap and learned sinks."""
    from longreach.methods import method_class
    from longreach.stages import SoftmaxExtras

    g = torch.Generator().manual_seed(t_q)
    q, k = torch.randn(2, 4, t_q, 16, generator=g), torch.randn(2, 2, t_k, 16, generator=g)
    key_mask = torch.ones(2, t_k, dtype=torch.bool)
    key_mask[1, :5] = False  # the second sequence is left-padded
    sink_logits = torch.tensor([0.5, -1.0, 2.0, 0.0])
    ctx = SelectContext(scale=0.3, key_mask=key_mask, extras=SoftmaxExtras(softcap=3.0, sinks=sink_logits))
    method = method_class("anchor")(budget=40, block=16, sinks=4, window=16, key_block=8)
    got = method.last_gaps(q, k.float(), -(-t_k // 8), ctx)
    want = _anchor_gaps_by_hand(q, k, 0.3, 16, 8, 4, method.local_window, key_mask, 3.0, sink_logits)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4)
