"""Selection invariants of every selecting method: causal, sinks + local window kept, budget respected,
full budget exactly dense (prefill and decode, MHA and GQA)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longreach import kernels, parse_spec
from longreach.cache.summaries import BlockSummaries, block_stats
from longreach.kernels import reference
from longreach.methods import SelectContext
from longreach.selection import Selection

SELECTORS = ["quest", "moba"]
FULL_SPECS = ["dense", "quest:budget=100000", "moba:density=1.0", "streaming:window=100000",
              "quest:density=1.0,group=q", "streaming:density=1.0,sinks=0"]


def _inputs(b=1, hq=6, hkv=2, tq=100, tk=100, d=16):
    return torch.randn(b, hq, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)


def _dense(q, k, v):
    return reference.attend(q, k, v, Selection.dense(q.shape[0], q.shape[2], k.shape[2]), q.shape[-1] ** -0.5)


@pytest.mark.parametrize("spec", FULL_SPECS)
@pytest.mark.parametrize("shape", [(1, 4, 4, 100, 100), (2, 6, 2, 77, 77), (1, 6, 2, 1, 129), (1, 6, 3, 20, 150)])
@pytest.mark.parametrize("kernel", ["gather", "reference"])
def test_full_budget_is_exactly_dense(spec, shape, kernel):
    b, hq, hkv, tq, tk = shape
    q, k, v = _inputs(b, hq, hkv, tq, tk)
    method = parse_spec(spec).selector
    sel = method.select(q, k, SelectContext())
    out = kernels.attend(q, k, v, sel, 0.25, kernel)
    ref = reference.attend(q, k, v, Selection.dense(b, tq, tk), 0.25)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("budget", [80, 150, 300])
@pytest.mark.parametrize("group", ["kv", "q"])
@pytest.mark.parametrize("tq", [333, 1])
def test_selection_invariants(name, budget, group, tq):
    tk = 333
    q, k, _ = _inputs(1, 6, 2, tq, tk)
    method = parse_spec(f"{name}:budget={budget},block=16,sinks=4,window=16,group={group}").selector
    sel = method.select(q, k, SelectContext())
    mask = sel.to_mask()  # (B, Hs, Tq, Tk)
    pos = (tk - tq) + torch.arange(tq)
    j = torch.arange(tk)
    assert not (mask & (j[None, :] > pos[:, None])).any(), "a query sees a future key"
    must = (j[None, :] <= pos[:, None]) & ((j[None, :] < 4) | (j[None, :] > pos[:, None] - 16))
    assert mask[:, :, must].all(), "sinks or local window missing"
    counts = mask.sum(-1)
    allowed = torch.maximum(torch.full_like(pos, budget), torch.full_like(pos, 4 + 16))
    assert (counts <= allowed).all(), "budget exceeded"
    assert torch.equal(sel.visible_counts(), counts), "layout disagrees with the dense mask"
    assert sel.heads == (2 if group == "kv" else 6)


@pytest.mark.parametrize("name", SELECTORS)
def test_density_parameter_controls_density(name):
    q, k, _ = _inputs(1, 4, 2, 1024, 1024)
    d10 = parse_spec(f"{name}:density=0.1,block=32").selector.select(q, k, SelectContext()).density()
    d50 = parse_spec(f"{name}:density=0.5,block=32").selector.select(q, k, SelectContext()).density()
    assert 0.03 < d10 < 0.15 < 0.3 < d50 <= 0.55


def test_quest_finds_the_block_a_query_points_at():
    """A key block aligned with the query must win over random blocks: the selector is not random."""
    torch.manual_seed(1)
    q, k, _ = _inputs(1, 2, 2, 1, 640, d=32)
    k[:, :, 320:336] = q[:, :, -1:].expand(-1, -1, 16, -1) * 3  # block 20 (block=16)
    for name in SELECTORS:
        sel = parse_spec(f"{name}:budget=52,block=16,sinks=4,window=16").selector.select(q, k, SelectContext())
        assert (sel.indices == 20).any(-1).all(), name


@settings(max_examples=40, deadline=None)
@given(
    tk=st.integers(2, 200), tq_frac=st.floats(0.0, 1.0), block=st.sampled_from([4, 8, 16]),
    sinks=st.integers(0, 6), window=st.integers(1, 40), extra=st.integers(0, 120), name=st.sampled_from(SELECTORS),
)
def test_property_selection_is_causal_and_within_budget(tk, tq_frac, block, sinks, window, extra, name):
    tq = max(1, int(tk * tq_frac))
    budget = sinks + window + extra
    q, k, v = _inputs(1, 4, 2, tq, tk, d=8)
    method = parse_spec(f"{name}:budget={budget},block={block},sinks={sinks},window={window}").selector
    sel = method.select(q, k, SelectContext())
    mask = sel.to_mask()
    pos = (tk - tq) + torch.arange(tq)
    assert not (mask & (torch.arange(tk)[None, :] > pos[:, None])).any()
    assert (mask.sum(-1) <= max(budget, sinks + window)).all()
    assert mask[..., torch.arange(tq), pos].all(), "a query must see itself"
    out = kernels.attend(q, k, v, sel, 0.3, "gather")
    assert (out - reference.attend(q, k, v, sel, 0.3)).abs().max().item() <= 1e-5


def test_block_summaries_are_incremental_and_match_recomputation():
    keys = torch.randn(2, 3, 203, 8)
    summ = BlockSummaries(16, ("min", "max", "mean"))
    summ.update(keys[:, :, :150], new_sequence=True)
    assert summ.blocks_done == 9
    for t in range(151, 204):  # decode: one key at a time
        got = summ.get(keys[:, :, :t])
        want = block_stats(keys[:, :, :t], 16, ("min", "max", "mean"))
        for s in want:
            assert torch.allclose(got[s], want[s])
    assert summ.blocks_done == 12 and summ.rebuilds == 0
    summ.update(torch.randn(2, 3, 40, 8))  # a different sequence is detected, not silently mixed in
    assert summ.rebuilds == 1 and summ.blocks_done == 2


def test_streaming_window_and_budget_agree():
    q, k, _ = _inputs(1, 2, 2, 64, 64)
    a = parse_spec("streaming:sinks=4,window=20").selector.select(q, k, SelectContext())
    b = parse_spec("streaming:sinks=4,budget=24").selector.select(q, k, SelectContext())
    assert torch.equal(a.to_mask(), b.to_mask())
