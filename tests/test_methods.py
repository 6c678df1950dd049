"""Selection invariants of every selecting method: causal, sinks + local window kept, budget respected,
full budget exactly dense (prefill and decode, MHA and GQA)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from longreach import kernels, parse_spec
from longreach.kernels import reference
from longreach.methods import SelectContext
from longreach.methods.summaries import BlockSummaries, block_stats
from longreach.selection import Selection

SELECTORS = ["quest", "moba", "hip", "twilight", "flexprefill", "vslash", "squeezed", "loki", "hyper", "longheads",
             "anchor", "ltri"]
ADAPTIVE = {"twilight", "flexprefill", "anchor"}  # the budget is a cap; the input decides how much is used
FULL_SPECS = ["dense", "quest:budget=100000", "moba:density=1.0", "streaming:window=100000",
              "quest:density=1.0,group=q", "streaming:density=1.0,sinks=0", "recycled:density=1.0",
              *(f"{n}:density=1.0" for n in SELECTORS[2:]), "hip:budget=100000,group=q", "vslash:budget=100000",
              "a2ats:density=1.0", "a2ats:budget=100000,prefill=codes,group=q", "ltri:budget=100000,boundaries=fixed"]


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
    d10 = parse_spec(f"{name}:density=0.1,block=32,sinks=4").selector.select(q, k, SelectContext()).density()
    d50 = parse_spec(f"{name}:density=0.5,block=32,sinks=4").selector.select(q, k, SelectContext()).density()
    if name in ADAPTIVE:
        assert 0 < d10 < 0.15 and d10 <= d50 <= 0.55
    else:
        assert 0.03 < d10 < 0.15 < 0.3 < d50 <= 0.55


@pytest.mark.parametrize("name", SELECTORS)
@pytest.mark.parametrize("tq", [200, 1])
def test_finer_key_blocks_keep_the_contract(name, tq):
    """key_block below block: stripes of 8 keys under 32-query blocks, prefill and decode, GQA."""
    q, k, v = _inputs(1, 6, 3, tq, 200)
    spec = f"{name}:budget=72,block=32,key_block=8,window=32,sinks=4"
    sel = parse_spec(spec).selector.select(q, k, SelectContext())
    assert sel.block_k == 8 and sel.block_q == 32
    mask = sel.to_mask()
    assert (mask.sum(-1) <= 72).all()
    assert (kernels.attend(q, k, v, sel, 0.3, "gather") - reference.attend(q, k, v, sel, 0.3)).abs().max() <= 1e-5


def test_quest_finds_the_block_a_query_points_at():
    """A key block aligned with the query must win over random blocks: the selector is not random.

    HiP is left out: its tree search scores a range by one key at its centre, which here is random
    (test_hip_matches_exhaustive_search covers the case its representatives are informative)."""
    torch.manual_seed(1)
    q, k, _ = _inputs(1, 2, 2, 1, 640, d=32)
    k[:, :, 320:336] = q[:, :, -1:].expand(-1, -1, 16, -1) * 3  # block 20 (block=16)
    for name in [n for n in SELECTORS if n != "hip"]:
        spec = f"{name}:budget=52,block=16,sinks=4,window=16" + (",key_block=16" if name in ("hip", "anchor") else "")
        sel = parse_spec(spec).selector.select(q, k, SelectContext())
        assert (sel.indices == 20).any(-1).all(), name


@settings(max_examples=40, deadline=None)
@given(
    tk=st.integers(2, 200), tq_frac=st.floats(0.0, 1.0), block=st.sampled_from([4, 8, 16]),
    sinks=st.integers(0, 6), window=st.integers(1, 40), extra=st.integers(0, 120), name=st.sampled_from(SELECTORS),
)
@example(tk=16, tq_frac=0.125, block=4, sinks=0, window=1, extra=4, name="loki")  # 2 queries, fewer than a block
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



@pytest.mark.parametrize(("rows_shape", "keys_shape"), [
    ((2, 3, 4, 1, 16), (2, 3, 50, 16)),  # one decode query per head, keys shared by the group
    ((1, 2, 3, 5, 7, 16), (1, 2, 40, 16)),  # query blocks x rows, keys shared by every row
    ((2, 2, 3, 5, 7, 16), (2, 2, 5, 30, 16)),  # each query block has its own candidate keys (S = nb)
    ((1, 3, 2, 4, 6, 1, 16), (1, 3, 4, 6, 9, 16)),  # each probe its own keys (S = nb, P), one row
    ((1, 4, 1, 3, 5, 16), (1, 4, 3, 8, 16)),  # group=q: one head per group
])
def test_grouped_scores_equal_the_broadcast_product(rows_shape, keys_shape):
    """One GEMM per (KV head, *S) over the group's rows: the same numbers as broadcasting the keys over the heads
    (the definition), in the same layout."""
    from longreach.methods.scoring import grouped_scores

    rows, keys = torch.randn(rows_shape), torch.randn(keys_shape)
    n_s = len(keys_shape) - 4
    bcast = keys.unsqueeze(2)  # (B, H, 1, *S, N, D)
    for _ in range(len(rows_shape) - len(keys_shape) - 1):  # row dims between S and the keys: broadcast too
        bcast = bcast.unsqueeze(-3)
    want = rows @ bcast.transpose(-1, -2)
    got = grouped_scores(rows, keys)
    assert got.shape == want.shape == (*rows_shape[:-1], keys_shape[-2])
    assert torch.allclose(got, want, atol=1e-5)
    assert got.is_contiguous() or n_s == 0

def test_streaming_window_and_budget_agree():
    q, k, _ = _inputs(1, 2, 2, 64, 64)
    a = parse_spec("streaming:sinks=4,window=20").selector.select(q, k, SelectContext())
    b = parse_spec("streaming:sinks=4,budget=24").selector.select(q, k, SelectContext())
    assert torch.equal(a.to_mask(), b.to_mask())


def _oracle_blocks(q, k, block, n_take, candidate):
    """Brute force: each query block's key blocks ranked by their best exact q.k (max over queries and keys)."""
    s = q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)  # (B, Hq, Tq, Tk)
    t_q, t_k = s.shape[-2:]
    pos = (t_k - t_q) + torch.arange(t_q)
    s = s.masked_fill(torch.arange(t_k)[None, :] > pos[:, None], float("-inf"))
    blk = s.view(*s.shape[:2], t_q // block, block, t_k // block, block).amax(dim=(3, 5))
    blk = blk.masked_fill(~candidate, float("-inf"))
    return blk.topk(n_take, dim=-1).indices.sort(-1).values


def test_loki_at_full_rank_chooses_the_exact_top_blocks():
    torch.manual_seed(3)
    q, k, _ = _inputs(1, 4, 4, 128, 256, d=8)
    method = parse_spec("loki:budget=84,block=16,sinks=4,window=16,rank=8,group=q").selector
    sel = method.select(q, k, SelectContext())
    quota = method.quota(q, k)
    got = sel.indices.sort(-1).values
    late = quota.n_take == quota.n_take.max()  # query blocks with a full quota of candidates
    want = _oracle_blocks(q, k, 16, int(quota.n_take.max()), quota.candidate)
    assert torch.equal(got[:, :, late], want[:, :, late])


def test_hip_matches_exhaustive_search_when_each_block_has_one_informative_key():
    """With every key of a block equal, the centre key represents the block exactly: HiP's tree search
    must then find the true top-k blocks (the pruning never drops a winner's range if it scores highest)."""
    torch.manual_seed(4)
    block_keys = torch.randn(1, 1, 32, 8) * torch.linspace(0.2, 3, 32).view(1, 1, 32, 1)
    k = block_keys.repeat_interleave(16, dim=2)  # (1, 1, 512, 8), constant within each 16-key block
    q = torch.randn(1, 1, 1, 8)
    method = parse_spec("hip:budget=84,block=16,key_block=16,sinks=4,window=16").selector
    sel = method.select(q, k, SelectContext())
    quota = method.quota(q, k)
    scores = (q @ block_keys.transpose(-1, -2)).squeeze(2).masked_fill(~quota.candidate, float("-inf"))
    exhaustive = scores.topk(int(quota.n_take[0]), dim=-1).indices.sort(-1).values
    # the tree keeps the best half at each split, so it finds the top blocks unless a winner shares a
    # range with a stronger one; accept at least 3 of 4 in common and the single best always present
    got = set(sel.indices.flatten().tolist())
    assert int(scores.argmax()) in got
    assert len(got & set(exhaustive.flatten().tolist())) >= 3


@pytest.mark.parametrize("pattern", ["vertical", "slash"])
def test_vslash_follows_a_column_or_a_diagonal(pattern):
    torch.manual_seed(5)
    t, d = 512, 16
    q, k, _ = _inputs(1, 2, 2, t, t, d)
    q, k = q * 0.1, k * 0.1
    if pattern == "vertical":
        u = torch.randn(d)
        q += u  # every query shares a direction that key 37 points along: a column all of them attend to
        k[:, :, 37] = u * 3
    else:
        for j in range(0, t - 200):  # each query attends to the key 200 behind it
            k[:, :, j] += q[:, :, j + 200] * 6
    sel = parse_spec("vslash:budget=68,block=16,key_block=16,sinks=0,window=16").selector.select(
        q, k, SelectContext())
    idx = sel.indices[0, 0]  # (nQB, K)
    qb = torch.arange(idx.shape[0])
    if pattern == "vertical":
        assert (idx == 37 // 16).any(-1)[3:].all(), "the vertical column is not followed"
    else:
        diagonal = (qb * 16 - 200) // 16  # key block of the key 200 behind each query block's first query
        late = qb >= 14
        hit = (idx[late] == diagonal[late, None]).any(-1) | (idx[late] == diagonal[late, None] + 1).any(-1)
        assert hit.all(), "the slash is not followed"


def test_twilight_prunes_its_base_to_the_mass_it_needs():
    torch.manual_seed(6)
    q, k, _ = _inputs(1, 2, 2, 1, 640, d=32)
    k[:, :, 320:336] = q[:, :, -1:].expand(-1, -1, 16, -1) * 3  # one block holds nearly all the mass
    base = parse_spec("quest:budget=200,block=16").selector.select(q, k, SelectContext())
    peaked = parse_spec("twilight:budget=200,block=16,p=0.9").selector.select(q, k, SelectContext())
    assert (peaked.to_mask() <= base.to_mask()).all(), "twilight may only drop keys of its base"
    assert (peaked.indices >= 0).sum() < (base.indices >= 0).sum()
    assert (peaked.indices == 20).any(-1).all()
    q2, k2, _ = _inputs(1, 2, 2, 1, 640, d=32)
    flat = parse_spec("twilight:budget=200,block=16,p=0.9").selector.select(q2 * 0, k2, SelectContext())
    assert (flat.indices >= 0).sum() > (peaked.indices >= 0).sum(), "a flat head needs more blocks"


def test_flexprefill_spends_budget_by_head_need():
    torch.manual_seed(7)
    q, k, _ = _inputs(1, 2, 2, 256, 256, d=32)
    q = q[:, :, :1] + 0.05 * q  # every query points the same way
    peaked_k = k.clone()
    peaked_k[:, :, 40:48] = q[:, :, :1] * 4
    method = parse_spec("flexprefill:density=0.5,block=16,gamma=0.9").selector
    few = method.select(q, peaked_k, SelectContext()).density()
    many = method.select(q * 0, k, SelectContext()).density()  # uniform attention: gamma needs many blocks
    assert few < many



def test_flexprefill_without_a_budget_lets_gamma_choose_instead_of_running_dense():
    """Bare ``flexprefill`` has no budget cap (gamma sizes each block's choice); it used to count as a full budget
    and silently run dense. A peaked head now keeps few blocks; ``density=1`` is still exactly dense."""
    torch.manual_seed(7)
    q, k, _ = _inputs(1, 2, 2, 256, 256, d=32)
    q = q[:, :, :1] + 0.05 * q
    k[:, :, 40:48] = q[:, :, :1] * 4
    bare = parse_spec("flexprefill:block=16").selector.select(q, k, SelectContext())
    assert not bare.full and bare.density() < 0.5
    step = parse_spec("flexprefill:block=16").selector.select(q[:, :, -1:], k, SelectContext())  # decode too
    assert not step.full and step.density() < 0.5
    assert parse_spec("flexprefill:block=16,density=1").selector.select(q, k, SelectContext()).full

def test_recycled_reuses_the_key_set_between_full_steps():
    torch.manual_seed(8)
    q, k, _ = _inputs(1, 4, 2, 1, 600)
    method = parse_spec("recycled:budget=120,block=16,every=3").selector
    state: dict = {}
    prefill = method.select(*_inputs(1, 4, 2, 600, 600)[:2], SelectContext(state=state))
    assert prefill.full
    seen = []
    for step in range(7):
        kk = torch.cat([k, torch.randn(1, 2, step, 16)], dim=2)
        seen.append(method.select(q, kk, SelectContext(state=state)))
    assert [s.full for s in seen] == [True, False, False, True, False, False, True]
    assert torch.equal(seen[1].indices, seen[2].indices)
    assert (seen[1].to_mask().sum(-1) <= 120).all()


def test_squeezed_clusters_once_and_reuses_the_clusters_in_decode():
    q, k, _ = _inputs(1, 4, 2, 400, 400)
    method = parse_spec("squeezed:budget=100,block=16").selector
    state: dict = {}
    method.select(q, k, SelectContext(state=state))
    tree = state["squeezed"]
    for extra in range(1, 40):  # decode: two more blocks complete, no re-clustering
        kk = torch.cat([k, torch.randn(1, 2, extra, 16)], dim=2)
        method.select(q[:, :, -1:], kk, SelectContext(state=state))
        assert state["squeezed"] is tree


@pytest.mark.parametrize("spec", ["twilight:base=streaming", "twilight:base=twilight", "twilight:p=0",
                                  "flexprefill:gamma=2", "hyper:bits=20", "anchor:theta=-1", "loki:rank=0",
                                  "recycled:every=0", "hip:key_block=0", "squeezed:fanout=0"])
def test_bad_method_parameters_are_spec_errors(spec):
    from longreach import SpecError

    with pytest.raises(SpecError):
        parse_spec(spec)
