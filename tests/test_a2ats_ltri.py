"""A²ATS (product-quantized key retrieval) and Ltri-LLM (spans from local-attention triangles): the exactness
contract, budgets, and that each one's scoring finds what it claims to (codes rank keys like q.k; spans start
where the triangles do; a planted span is retrieved)."""

from __future__ import annotations

import itertools

import pytest
import torch

from longreach import SpecError, kernels, parse_spec
from longreach.kernels import reference
from longreach.methods import SelectContext, pq, spans
from longreach.selection import Selection


def _qkv(b=1, hq=6, hkv=2, tq=100, tk=100, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, tq, d, generator=g), torch.randn(b, hkv, tk, d, generator=g),
            torch.randn(b, hkv, tk, d, generator=g))


def _clustered_keys(n=2048, d=32, clusters=24, seed=0):
    """Keys with structure: cluster centres of varied scale plus small noise, (1, 1, n, d)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g) * torch.rand(clusters, 1, generator=g).add(0.5)
    which = torch.randint(0, clusters, (n,), generator=g)
    return (centres[which] + 0.15 * torch.randn(n, d, generator=g)).view(1, 1, n, d)


def _ranks(x):
    return x.argsort().argsort().double()


def _spearman(a, b):
    ra, rb = _ranks(a) - (len(a) - 1) / 2, _ranks(b) - (len(b) - 1) / 2
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ---- the exactness contract -------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["a2ats:density=1.0", "a2ats:budget=100000,prefill=codes",
                                  "a2ats:density=1.0,prefill=codes,group=q,key_block=4", "ltri:density=1.0",
                                  "ltri:budget=100000,group=q", "ltri:density=1.0,boundaries=fixed"])
@pytest.mark.parametrize("shape", [(1, 4, 4, 90, 90), (2, 6, 2, 77, 77), (1, 6, 2, 1, 129), (1, 6, 3, 20, 150)])
@pytest.mark.parametrize("kernel", ["gather", "reference"])
def test_full_budget_is_exactly_dense_in_prefill_and_decode(spec, shape, kernel):
    b, hq, hkv, tq, tk = shape
    q, k, v = _qkv(b, hq, hkv, tq, tk)
    method = parse_spec(spec).selector
    state: dict = {}
    if tq == 1:  # decode after a prefill, so the state (codes, spans) is the one a decode step really reads
        method.select(*_qkv(b, hq, hkv, tk - 1, tk - 1)[:1], k[:, :, :-1], SelectContext(state=state))
    sel = method.select(q, k, SelectContext(state=state))
    out = kernels.attend(q, k, v, sel, 0.25, kernel)
    ref = reference.attend(q, k, v, Selection.dense(b, tq, tk), 0.25)
    assert (out - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["a2ats", "ltri"])
@pytest.mark.parametrize("t_q", [1, 37, 130])
def test_scoring_at_a_full_budget_keeps_every_causal_key(name, t_q):
    """choose() itself (select() would return Selection.dense before scoring) picks every causal key."""
    q, k, v = _qkv(1, 6, 2, t_q, 130)
    method = parse_spec(f"{name}:budget=130,block=16,sinks=4,window=16").selector
    quota = method.make_quota(t_q, 130, q.device)
    sel = method.choose(q, k, quota, SelectContext(scale=0.25))
    assert not sel.full
    ref = reference.attend(q, k, v, Selection.dense(1, t_q, 130), 0.25)
    assert (kernels.attend(q, k, v, sel, 0.25, "gather") - ref).abs().max().item() <= 1e-5


# ---- budgets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["a2ats:budget={b}", "a2ats:budget={b},group=q", "a2ats:budget={b},prefill=codes",
                                  "a2ats:budget={b},key_block=8", "ltri:budget={b}", "ltri:budget={b},group=q",
                                  "ltri:budget={b},boundaries=fixed,key_block=8"])
@pytest.mark.parametrize("t_q", [1, 120])
@pytest.mark.parametrize("budget", [40, 90])
def test_selection_is_causal_keeps_sinks_and_window_and_respects_the_budget(spec, t_q, budget):
    t_k = 300
    q, k, v = _qkv(1, 6, 2, t_q, t_k, seed=budget)
    sel = parse_spec(spec.format(b=budget) + ",block=16,sinks=4,window=16").selector.select(q, k, SelectContext())
    mask = sel.to_mask()
    pos = (t_k - t_q) + torch.arange(t_q)
    j = torch.arange(t_k)
    assert not (mask & (j[None, :] > pos[:, None])).any()
    must = (j[None, :] <= pos[:, None]) & ((j[None, :] < 4) | (j[None, :] > pos[:, None] - 16))
    assert mask[:, :, must].all(), "sinks or local window missing"
    dense_prefill = spec.startswith("a2ats") and "prefill=codes" not in spec and t_q > 1
    if dense_prefill:
        assert sel.full
    else:
        assert (mask.sum(-1) <= budget).all() and sel.density() < 0.9
    assert (kernels.attend(q, k, v, sel, 0.3, "gather") - reference.attend(q, k, v, sel, 0.3)).abs().max() <= 1e-5


def test_a2ats_decode_retrieves_single_tokens_up_to_the_budget():
    q, k, _ = _qkv(1, 4, 2, 1, 500)
    sel = parse_spec("a2ats:budget=100,sinks=4,window=16").selector.select(q, k, SelectContext())
    assert sel.block_k == 1 and sel.indices.shape[-1] == 80
    assert torch.equal(sel.to_mask().sum(-1), torch.full((1, 2, 1), 100))


# ---- A²ATS: the codes ---------------------------------------------------------------------------


def test_pq_round_trip_error_shrinks_with_more_centroids():
    keys = torch.randn(1, 2, 512, 32, generator=torch.Generator().manual_seed(1))
    errors = []
    for c in (4, 16, 64):
        book = pq.fit(keys, 8, c, iters=8)
        codes = pq.encode(book, keys)
        assert codes.shape == (1, 2, 512, 8) and codes.dtype == torch.uint8
        errors.append(float((pq.reconstruct(book, codes) - keys).square().mean()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.5 * errors[0]


def test_pq_handles_a_head_dim_the_subspaces_do_not_divide():
    keys = _clustered_keys(300, 24)
    book = pq.fit(keys, 5, 16, iters=5)  # 24 channels -> 5 sub-spaces of 5 (one zero-padded channel)
    codes = pq.encode(book, keys)
    q = torch.randn(1, 1, 3, 24)
    exact = q @ pq.reconstruct(book, codes).transpose(-1, -2)
    assert torch.allclose(pq.lookup(pq.tables(book, q), codes, book.size), exact, atol=1e-4)


def test_code_scores_rank_keys_like_exact_scores_and_recall_the_top_keys():
    keys = _clustered_keys(2048, 32)
    g = torch.Generator().manual_seed(2)
    book = pq.fit(keys, 8, 64, iters=10)
    codes = pq.encode(book, keys)
    recalls, corrs = [], []
    for _ in range(8):
        q = torch.randn(1, 1, 1, 32, generator=g)
        exact = (q @ keys.transpose(-1, -2)).flatten()
        approx = pq.lookup(pq.tables(book, q), codes, book.size).flatten()
        corrs.append(_spearman(approx, exact))
        top = set(exact.topk(64).indices.tolist())
        recalls.append(len(top & set(approx.topk(64).indices.tolist())) / 64)
    assert min(corrs) > 0.95, corrs
    assert sum(recalls) / len(recalls) > 0.6 > 64 / 2048 * 5, recalls  # random selection recalls 64/2048


def test_lookup_tables_equal_query_times_reconstructed_keys():
    """The decode path (table lookups) and the prefill path (q . reconstructed keys) score the same."""
    q, k, _ = _qkv(1, 6, 2, 1, 400, d=32)
    method = parse_spec("a2ats:budget=100,subspaces=8,centroids=32").selector
    codes = method.index(q, k, SelectContext())
    lut = method.token_scores(q, codes, 400)  # (B, Hkv, G, 1, Tk)
    rebuilt = q.view(1, 2, 3, 1, 32) @ pq.reconstruct(codes.codebook, codes.codes[:, :, :400])[:, :, None] \
        .transpose(-1, -2)
    assert torch.allclose(lut, rebuilt, atol=1e-4)


def test_query_aware_codebook_scores_the_observed_queries_more_accurately():
    """Queries whose energy sits in a few channels: weighting the k-means by their mean q^2 lowers the error
    of q.k (what retrieval ranks by) compared with plain product quantization at the same code size."""
    g = torch.Generator().manual_seed(3)
    t, d = 1024, 32
    k = torch.randn(1, 1, t, d, generator=g)
    scale = torch.ones(d)
    scale[:4] = 8.0  # channels 0-3 carry most of every query
    q = torch.randn(1, 2, 128, d, generator=g) * scale
    errs = {}
    for aware in (True, False):
        method = parse_spec(f"a2ats:subspaces=4,centroids=16,query_aware={str(aware).lower()}").selector
        codes = method.index(q, k, SelectContext())
        approx = q @ pq.reconstruct(codes.codebook, codes.codes[:, :, :t]).transpose(-1, -2)
        errs[aware] = float((approx - q @ k.transpose(-1, -2)).square().mean())
    assert errs[True] < 0.7 * errs[False], errs


def test_a2ats_decode_extends_the_codes_and_refits_for_a_new_cache():
    q, k, _ = _qkv(1, 4, 2, 300, 300)
    method = parse_spec("a2ats:budget=64,sinks=4,window=16").selector
    state: dict = {}
    method.select(q, k, SelectContext(state=state))  # prefill: dense, codebook fitted
    book = state["a2ats"].codebook
    assert state["a2ats"].n == 300
    extra = torch.randn(1, 2, 5, 16)
    for step in range(1, 6):
        kk = torch.cat([k, extra[:, :, :step]], dim=2)
        method.select(q[:, :, -1:], kk, SelectContext(state=state))
        assert state["a2ats"].codebook is book and state["a2ats"].n == 300 + step
    assert torch.equal(state["a2ats"].codes[:, :, :305], pq.encode(book, kk))
    method.select(q[:, :, -1:], torch.randn(1, 2, 310, 16), SelectContext(state=state))  # another sequence
    assert state["a2ats"].codebook is not book


def test_a2ats_finds_the_keys_a_decode_query_points_at():
    q, k, _ = _qkv(1, 2, 2, 1, 800, d=32, seed=4)
    planted = torch.tensor([37, 212, 213, 500, 640])
    k[:, :, planted] = q[:, :, -1:] * 2
    sel = parse_spec("a2ats:budget=40,sinks=4,window=16").selector.select(q, k, SelectContext())
    chosen = set(sel.indices.flatten().tolist())
    assert set(planted.tolist()) <= chosen


# ---- Ltri: spans ------------------------------------------------------------------------------


def _segmented(lengths, d=32, hq=2, hkv=1, seed=5):
    """Queries and keys of each segment share a direction: every query attends within its own segment, so the
    attention map is a chain of triangles starting at the segment starts."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        u = torch.randn(d, generator=g)
        rows.append(u.expand(n, d) * 1.5 + 0.3 * torch.randn(n, d, generator=g))
    x = torch.cat(rows).view(1, 1, -1, d)
    starts = torch.tensor(lengths).cumsum(0)[:-1].tolist()
    return x.expand(1, hq, -1, -1).contiguous(), x.expand(1, hkv, -1, -1).contiguous(), [0, *starts]


def test_ltri_span_boundaries_fall_on_the_triangles():
    lengths = [48, 80, 32, 64, 96, 48, 64]
    q, k, starts = _segmented(lengths)
    strength, count, _ = spans.band_evidence(q, k, 0, 64, 16, 32**-0.5)
    span_of = spans.boundaries(strength, count, min_span=2, max_span=16)[0, 0]
    found = [0] + [16 * a for a in range(1, span_of.numel()) if span_of[a] != span_of[a - 1]]
    assert found == starts


def test_ltri_evidence_streams_in_exactly_as_one_prefill():
    """A prefill in two chunks and then decode steps leave the same evidence as one call over everything, and
    selecting twice at the same step counts nothing twice."""
    q, k, _ = _qkv(1, 4, 2, 260, 260, d=16)
    method = parse_spec("ltri:budget=64,block=16").selector
    whole: dict = {}
    method.select(q, k, SelectContext(state=whole))
    steps: dict = {}
    for t0, t1 in [(0, 150), (150, 250)] + [(t, t + 1) for t in range(250, 260)]:
        method.select(q[:, :, t0:t1], k[:, :, :t1], SelectContext(state=steps))
    method.select(q[:, :, -1:], k, SelectContext(state=steps))  # the same decode step again
    a, b = whole["ltri"], steps["ltri"]
    assert torch.equal(a.count, b.count)
    for name in ("strength", "mass", "wsum", "msum"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-4), name



def test_ltri_keeps_the_evidence_of_calls_that_attend_everything():
    """A prompt shorter than the budget is attended whole (no choice to make), and decode then crosses the
    budget: the evidence of the prompt's queries must still be there, as after one call over everything."""
    q, k, _ = _qkv(1, 4, 2, 300, 300, d=16)
    method = parse_spec("ltri:budget=256,block=16").selector
    whole: dict = {}
    method.select(q, k, SelectContext(state=whole))
    steps: dict = {}
    assert method.select(q[:, :, :200], k[:, :, :200], SelectContext(state=steps)).full
    for t in range(200, 300):
        method.select(q[:, :, t:t + 1], k[:, :, :t + 1], SelectContext(state=steps))
    assert torch.equal(whole["ltri"].count, steps["ltri"].count)
    assert torch.allclose(whole["ltri"].strength, steps["ltri"].strength, atol=1e-4)


def test_indexed_keys_survive_a_change_of_stored_precision_but_not_another_sequence():
    """kvquant re-stores the keys as int4 codes after the prompt: a2ats and ltri must keep their index (the same
    keys, a few percent off), and still start over for other keys."""
    from longreach.cache.quant import quantize
    from longreach.methods.scoring import same_keys

    k = torch.randn(1, 2, 64, 16) + 0.5
    stored = quantize(k, bits=4, group=32, axis=-2).dequantize()  # per channel over token groups, as kvquant
    assert not torch.equal(stored, k)
    assert same_keys(k[:, :, 0], k[:, :, -1], 64, stored)
    assert not same_keys(k[:, :, 0], k[:, :, -1], 64, torch.randn(1, 2, 64, 16) + 0.5)
    assert not same_keys(k[:, :, 0], k[:, :, -1], 64, stored[:, :, :40])  # a press shrank the cache

def test_ltri_retrieves_a_planted_span_whole_and_keeps_sinks_and_window():
    q, k, _ = _qkv(1, 2, 2, 1, 640, d=32, seed=6)
    k[:, :, 320:368] += q[:, :, -1:] * 1.5  # a 48-token span (3 atoms) the decode query points at
    for boundaries in ("attention", "fixed"):
        spec = f"ltri:budget=84,block=16,sinks=4,window=16,boundaries={boundaries}"
        sel = parse_spec(spec).selector.select(q, k, SelectContext())
        idx = sel.indices[0, :, 0]  # (H, K) atoms of 16 keys
        for h in range(2):
            assert {20, 21, 22} <= set(idx[h].tolist()), (boundaries, idx[h])
        mask = sel.to_mask()[0, :, 0]
        assert mask[:, :4].all() and mask[:, -16:].all()
        assert (mask.sum(-1) <= 84).all()


def test_ltri_retrieves_the_span_in_prefill_too():
    q, k, _ = _qkv(1, 2, 2, 400, 400, d=32, seed=7)
    q[:, :, 384:] = q[:, :, -1:]  # the last query block asks one thing
    k[:, :, 96:144] += q[:, :, -1:] * 1.5
    sel = parse_spec("ltri:budget=84,block=16,sinks=4,window=16").selector.select(q, k, SelectContext())
    assert {6, 7, 8} <= set(sel.indices[0, 0, -1].tolist())


@pytest.mark.parametrize("spec", ["a2ats:prefill=sparse", "a2ats:centroids=1", "a2ats:subspaces=0",
                                  "a2ats:centroids=70000", "ltri:boundaries=nms", "ltri:min_span=200,max_span=100",
                                  "ltri:probe=0"])
def test_bad_parameters_are_spec_errors(spec):
    with pytest.raises(SpecError):
        parse_spec(spec)
