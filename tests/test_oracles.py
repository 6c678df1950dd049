"""Tests that can fail: longreach's selectors and presses against oracles written from the papers (tests/oracles.py),
never against longreach's own helpers.

1. A full budget: every budgeted method's own ``choose`` (``select`` would short-circuit to ``Selection.dense``
   before any scoring) must pick every causal key, and attention over it must equal plain causal attention.
2. Partial budgets: Quest, MoBA, SnapKV, H2O, TOVA and StreamingLLM keep exactly what the paper's rule keeps.

Where longreach departs from a paper on purpose (aggregation over a query block or a GQA group; SnapKV's pooling
reaching into the observation window, documented in cache/presses.py ``window_votes``), the oracle follows the
paper's per-token rule and aggregates or pools the way longreach documents, and a test shows where the two differ.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model
from oracles import (
    block_topk_oracle,
    causal_mask,
    causal_probs,
    dense_attention,
    moba_score,
    quest_bound,
    snapkv_keep,
    top_keep_oracle,
)

import longreach
from longreach.cache.press import Observation
from longreach.compat import cache_kwargs, output_cache
from longreach.kernels import attend
from longreach.methods import BudgetedMethod, SelectContext, method_class, method_names
from longreach.stages import SoftmaxExtras

SCALE = 0.25  # 1 / sqrt(16)
D = 16


def budgeted() -> list[str]:
    return [n for n in method_names() if issubclass(method_class(n), BudgetedMethod)]


def has_choose(name: str) -> bool:
    return method_class(name).choose is not BudgetedMethod.choose


CHOOSERS = [n for n in budgeted() if has_choose(n)]
# Budgeted methods with no choose() of their own: each gets its own full-budget test below.
#   recycled: decode only; a refresh step attends densely, the steps between reuse its top blocks.
#   twilight: prunes the blocks its base selector proposes (by attention mass up to p).
WITHOUT_CHOOSE = {"recycled", "twilight"}
# Adaptive by design: they keep fewer blocks than the budget allows unless their own threshold lets everything in.
#   anchor keeps stripes within theta of the anchor score; flexprefill keeps blocks until mass gamma.
ADAPTIVE = {"anchor": {"theta": float("inf")}, "flexprefill": {"gamma": 1.0}}
SHAPES = [(64, 64), (75, 75), (1, 64), (1, 75), (1, 130), (37, 130)]  # prefill, decode, chunked; 16 ∤ 75, 130


def qkv(t_q: int, t_k: int, batch: int = 2):
    """GQA inputs: 4 query heads over 2 KV heads."""
    return torch.randn(batch, 4, t_q, D), torch.randn(batch, 2, t_k, D), torch.randn(batch, 2, t_k, D)


def test_every_budgeted_method_is_covered_by_a_full_budget_test():
    assert set(budgeted()) - set(CHOOSERS) == WITHOUT_CHOOSE, "a new budgeted method needs a full-budget test"
    assert len(CHOOSERS) >= 10 and {"quest", "moba", "hip", "vslash"} <= set(CHOOSERS)


# ---- 1. a full budget through each method's own scoring --------------------------------------------------------


@pytest.mark.parametrize("group", ["kv", "q"])
@pytest.mark.parametrize(("t_q", "t_k"), SHAPES)
@pytest.mark.parametrize("name", CHOOSERS)
def test_choose_with_a_full_budget_keeps_every_causal_key(name, t_q, t_k, group):
    method = method_class(name)(budget=t_k, block=16, sinks=4, window=16, group=group, **ADAPTIVE.get(name, {}))
    q, k, v = qkv(t_q, t_k)
    quota = method.make_quota(t_q, t_k, q.device)
    assert quota.dense, "select() would return Selection.dense here without scoring: choose() is what runs below"
    sel = method.choose(q, k, quota, SelectContext(scale=SCALE))
    assert not sel.full and sel.indices.shape[-1] > 0, "the blocks come from the method's scoring"
    heads = 2 if group == "kv" else 4
    mask = sel.to_mask()
    assert mask.shape == (2, heads, t_q, t_k)
    assert torch.equal(mask, causal_mask(t_q, t_k).expand(2, heads, -1, -1))
    out = attend(q, k, v, sel, SCALE, "reference")
    assert torch.allclose(out, dense_attention(q, k, v, SCALE), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "params"), [("anchor", {"theta": 0.0}), ("flexprefill", {"gamma": 0.5})])
def test_adaptive_methods_keep_a_causal_subset_below_their_threshold_even_at_a_full_budget(name, params):
    """The explicit result for the adaptive methods at their ordinary thresholds: fewer keys than the budget allows,
    never an acausal one, sinks and window always in."""
    t = 200
    method = method_class(name)(budget=t, block=16, sinks=4, window=16, **params)
    q, k, _ = qkv(t, t)
    sel = method.choose(q, k, method.make_quota(t, t, q.device), SelectContext(scale=SCALE))
    mask, causal = sel.to_mask(), causal_mask(t, t)
    j, p = torch.arange(t)[None, :], torch.arange(t)[:, None]
    always = causal & ((j < 4) | (j > p - 16))
    assert not bool((mask & ~causal).any())
    assert bool(mask[:, :, always].all())
    assert mask.sum() < causal.sum() * mask.shape[0] * mask.shape[1]


@pytest.mark.parametrize(("t_q", "t_k"), SHAPES)
@pytest.mark.parametrize("base", ["quest", "hip"])
def test_twilight_at_p_1_keeps_every_block_a_full_budget_proposes(base, t_q, t_k):
    """Twilight has no choose(): at a full budget its base's select() is dense and Twilight returns it untouched.
    To run Twilight's own pruning, the base proposes what its choose() picks at a full budget (every candidate block);
    with p=1 every proposed block must survive (each holds attention mass), with p=0.5 fewer do."""
    q, k, v = qkv(t_q, t_k)
    ctx = SelectContext(scale=SCALE)
    plain = method_class("twilight")(budget=t_k, block=16, sinks=4, window=16, base=base, p=1.0)
    assert plain.select(q, k, ctx).full

    def pruned(p: float):
        tw = method_class("twilight")(budget=t_k, block=16, sinks=4, window=16, base=base, p=p)
        real = tw.base_method

        class Proposer:
            block_stats = real.block_stats

            def select(self, q, k, ctx):
                return real.choose(q, k, real.make_quota(q.shape[2], k.shape[2], q.device), ctx)

        tw.__dict__["base_method"] = Proposer()  # the cached_property's slot
        return tw.select(q, k, ctx)

    sel = pruned(1.0)
    assert not sel.full
    assert torch.equal(sel.to_mask(), causal_mask(t_q, t_k).expand(2, sel.heads, -1, -1))
    assert torch.allclose(attend(q, k, v, sel, SCALE, "reference"), dense_attention(q, k, v, SCALE), atol=1e-5)
    half = pruned(0.5).to_mask()
    assert half.sum() < sel.to_mask().sum() and not bool((half & ~sel.to_mask()).any())


@pytest.mark.parametrize("t_k", [64, 75, 130])
@pytest.mark.parametrize("group", ["kv", "q"])
def test_recycled_reuses_every_block_of_a_full_budget(monkeypatch, t_k, group):
    """Recycled has no choose(): prefill and each refresh step attend densely (by design) while it ranks blocks by
    the exact attention mass; the steps between reuse those blocks. The block quota is marked not-dense so the ranking
    runs at a full budget; the reused blocks must then be every causal key."""
    cls = method_class("recycled")
    method = cls(budget=t_k + 1, block=16, sinks=4, window=16, group=group, every=4)
    monkeypatch.setattr(cls, "quota", lambda self, q, k: dataclasses.replace(
        self.make_quota(q.shape[2], k.shape[2], q.device), dense=False))
    ctx = SelectContext(scale=SCALE)
    q, k, v = qkv(1, t_k)
    assert method.select(*qkv(t_k, t_k)[:2], ctx).full, "prefill is dense"
    assert method.select(q, k, ctx).full, "a refresh step is dense"
    sel = method.select(q, k, ctx)
    assert not sel.full
    assert torch.equal(sel.to_mask(), causal_mask(1, t_k).expand(2, sel.heads, -1, -1))
    assert torch.allclose(attend(q, k, v, sel, SCALE, "reference"), dense_attention(q, k, v, SCALE), atol=1e-5)


# ---- 2. partial budgets: block top-k selectors ------------------------------------------------------------------

PARTIAL = [(96, 96), (75, 75), (1, 96), (1, 131), (37, 131), (1, 200)]


def chosen_sets(sel) -> list[list[list[set[int]]]]:
    idx = sel.indices
    return [[[{int(x) for x in idx[b, h, qb] if x >= 0} for qb in range(idx.shape[2])]
             for h in range(idx.shape[1])] for b in range(idx.shape[0])]


def run_block_topk(name: str, t_q: int, t_k: int, group: str, budget: int = 64, block: int = 8, **params):
    method = method_class(name)(budget=budget, block=block, sinks=4, window=8, group=group, **params)
    q, k, _ = qkv(t_q, t_k)
    assert not method.make_quota(t_q, t_k, q.device).dense, "a partial budget: blocks are chosen"
    return method.select(q, k, SelectContext(scale=SCALE)), q, k


@pytest.mark.parametrize("group", ["kv", "q"])
@pytest.mark.parametrize(("t_q", "t_k"), PARTIAL)
def test_quest_picks_the_blocks_with_the_highest_min_max_bound(t_q, t_k, group):
    """Quest (arXiv:2406.10774): a block's bound for q is sum_d max(q_d max_d, q_d min_d) over its keys' per-channel
    min/max; with ``share=false`` longreach scores a query block by its best query's raw bound and (group=kv) a KV
    head by its best query head."""
    sel, q, k = run_block_topk("quest", t_q, t_k, group, share=False)
    want = block_topk_oracle(q, k, block=8, sinks=4, window=8, budget=64, group=group, per_token=quest_bound,
                             over_queries="max", over_heads="max")
    assert chosen_sets(sel) == want


@pytest.mark.parametrize("group", ["kv", "q"])
@pytest.mark.parametrize(("t_q", "t_k"), PARTIAL)
def test_quest_by_default_ranks_blocks_by_the_largest_share_any_query_gives_them(t_q, t_k, group):
    """The default (``share``): each query's scaled bounds become log-shares over its block's candidate blocks, and
    a key block scores the largest share any query (and, with group=kv, any query head) gives it."""
    sel, q, k = run_block_topk("quest", t_q, t_k, group)
    want = block_topk_oracle(q, k, block=8, sinks=4, window=8, budget=64, group=group, per_token=quest_bound,
                             over_queries="max", over_heads="max", share_scale=SCALE)
    assert chosen_sets(sel) == want


@pytest.mark.parametrize(("t_q", "t_k"), [(96, 96), (37, 131)])
def test_quest_shares_scored_one_query_block_at_a_time_match_the_oracle(t_q, t_k, monkeypatch):
    """Long prefills score query blocks in chunks, each against the key blocks up to its last candidate; a
    share's denominator must still hold every candidate of its query block."""
    import longreach.methods.blocktopk as blocktopk

    monkeypatch.setattr(blocktopk, "chunk_rows", lambda _bytes: 1)
    sel, q, k = run_block_topk("quest", t_q, t_k, "kv")
    want = block_topk_oracle(q, k, block=8, sinks=4, window=8, budget=64, group="kv", per_token=quest_bound,
                             over_queries="max", over_heads="max", share_scale=SCALE)
    assert chosen_sets(sel) == want


def test_quest_shares_use_the_models_softmax_softcap_and_sink_logits():
    """Gemma 2's softcap and GPT-OSS's learned sinks are part of the model's softmax, so they are part of a query's
    share (tests/oracles.py applies them to the oracle's logits). The check is not vacuous: on some shapes they
    change which blocks are chosen."""
    extras = SoftmaxExtras(softcap=2.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]))
    changed = 0
    for t_q, t_k in PARTIAL:
        for group in ("kv", "q"):
            method = method_class("quest")(budget=64, block=8, sinks=4, window=8, group=group)
            q, k, _ = qkv(t_q, t_k)
            got = chosen_sets(method.select(q, k, SelectContext(scale=SCALE, extras=extras)))
            want = block_topk_oracle(q, k, block=8, sinks=4, window=8, budget=64, group=group, per_token=quest_bound,
                                     over_queries="max", over_heads="max", share_scale=SCALE, softcap=2.0,
                                     sink_logits=extras.sinks)
            assert got == want, (t_q, t_k, group)
            changed += got != chosen_sets(method.select(q, k, SelectContext(scale=SCALE)))
    assert changed > 0


def test_quest_shares_keep_the_block_one_query_needs_when_another_query_has_larger_norms():
    """The case the share rule is for: in one query block, query A has small norms and attends one far block; query
    B has 10x larger norms and spreads over the others. By raw bounds B outbids A on every block and A's block is
    dropped; by shares A's block wins. The expected blocks are written by hand from the construction."""
    torch.manual_seed(0)
    dim, block = 16, 8
    keys = torch.randn(1, 1, 64, dim) * 0.1  # 8 key blocks of 8; the queries are the last 8 positions
    needle = torch.zeros(dim)
    needle[0] = 1.0
    keys[0, 0, 16:24] = needle * 3.0  # block 2: the one query A needs
    q = torch.zeros(1, 1, 8, dim)
    q[0, 0, 7] = needle * 4.0  # A: the block's last query, small norm, aligned with block 2 only
    q[0, 0, 0, 1:] = 10.0  # B: large norm on the other channels, no interest in block 2's direction
    method = method_class("quest")(budget=4 + 8 + 8, block=block, sinks=4, window=8, group="q")
    raw = method_class("quest")(budget=4 + 8 + 8, block=block, sinks=4, window=8, group="q", share=False)
    ctx = SelectContext(scale=SCALE)
    assert chosen_sets(method.select(q, keys, ctx))[0][0][0] == {2}
    assert 2 not in chosen_sets(raw.select(q, keys, ctx))[0][0][0]


@pytest.mark.parametrize("group", ["kv", "q"])
@pytest.mark.parametrize(("t_q", "t_k"), PARTIAL)
def test_moba_picks_the_blocks_whose_mean_key_best_matches_the_queries(t_q, t_k, group):
    """MoBA (arXiv:2502.13189): a block's gate score is q . mean(keys of the block); longreach scores a query block by
    the mean of its queries' scores and (group=kv) the mean over the query heads of a KV head."""
    sel, q, k = run_block_topk("moba", t_q, t_k, group)
    want = block_topk_oracle(q, k, block=8, sinks=4, window=8, budget=64, group=group, per_token=moba_score,
                             over_queries="mean", over_heads="mean")
    assert chosen_sets(sel) == want


# ---- 2. partial budgets: presses on raw tensors -----------------------------------------------------------------


def press(spec: str):
    return longreach.parse_spec(spec).of_kind("press")[0]


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
@pytest.mark.parametrize(("pool", "sinks"), [(1, 0), (3, 4), (7, 4), (7, 0), (5, 2)])
def test_snapkv_keeps_what_the_observation_window_votes_for(name, pool, sinks):
    """SnapKV (arXiv:2404.14469): the last `window` queries' causal softmax over the keys, summed over those queries,
    averaged over each KV head's query heads, average-pooled over `pool` neighbours; the best keys plus the window."""
    n, w, capacity = 120, 8, 40
    q, k = torch.randn(1, 4, w, D), torch.randn(1, 2, n, D)
    p = press(f"{name}:budget={capacity},window={w},pool={pool},sinks={sinks}")
    got = p.keep_indices(Observation(0, 1, n, q, k, k, SCALE), capacity)
    assert torch.equal(got, snapkv_keep(q, k, SCALE, capacity, sinks=sinks, pool=pool))


def snapkv_edge_case():
    """Window queries and keys share one direction (they attend to each other), the prefix keys just before the window
    point away (no query attends to them): pooling that reaches into the window lifts those keys."""
    n, w = 120, 8
    q, k = torch.randn(1, 4, w, D), torch.randn(1, 2, n, D)
    u = torch.nn.functional.normalize(torch.randn(D), dim=0) * 6
    q[:] += u
    k[:, :, n - w :] += u
    k[:, :, n - w - 8 : n - w] -= u
    return q, k


def test_the_edge_case_separates_the_reference_pooling_from_pooling_over_every_key():
    """Where longreach's documented SnapKV pooling departs from the reference code, on the oracles alone: prefix
    keys 109..111 get no attention, so the reference pooling (prefix votes only) drops them; pooling that reaches
    into the window (over every key, as longreach does) keeps them. The press follows the second rule."""
    q, k = snapkv_edge_case()
    edge = {109, 110, 111}
    reference = snapkv_keep(q, k, SCALE, 40, sinks=4, pool=7, scope="prefix", count_pad=True)
    everywhere = snapkv_keep(q, k, SCALE, 40, sinks=4, pool=7, scope="all")
    for h in range(2):
        assert not edge & set(reference[0, h].tolist()) and edge <= set(everywhere[0, h].tolist())


# ---- 2. partial budgets: presses through a model, decode step by decode step ------------------------------------


def h2o_rule(st: dict, probs: torch.Tensor, capacity: int, sinks: int) -> None:
    """H2O (arXiv:2306.14048): every key accumulates the attention every query paid it (summed over the query heads of
    its KV head); keep the heavy hitters and the most recent half of the free budget."""
    group = probs.shape[1] // len(st["pos"])
    for h, pos in enumerate(st["pos"]):
        st["score"][h, pos] += probs[0, h * group : (h + 1) * group].sum(dim=(0, 1))
    recent = (capacity - sinks) // 2
    evict(st, capacity, lambda h: st["score"][h, st["pos"][h]], sinks, recent)


def tova_rule(st: dict, probs: torch.Tensor, capacity: int, sinks: int) -> None:
    """TOVA (arXiv:2401.06104): the newest query's attention averaged over all heads; the same keys leave every head."""
    assert all(p == st["pos"][0] for p in st["pos"])
    last = probs[0, :, -1].mean(0)
    evict(st, capacity, lambda h: last, sinks, 0)


def streaming_rule(st: dict, probs: torch.Tensor, capacity: int, sinks: int) -> None:
    """StreamingLLM (arXiv:2309.17453): the first `sinks` tokens and the most recent ones."""
    for h, pos in enumerate(st["pos"]):
        if len(pos) > capacity:
            st["pos"][h] = pos[:sinks] + pos[len(pos) - (capacity - sinks):]


def evict(st: dict, capacity: int, scores, sinks: int, recent: int) -> None:
    for h, pos in enumerate(st["pos"]):
        if len(pos) > capacity:
            keep = top_keep_oracle(scores(h)[None, None], capacity, sinks, recent)[0, 0]
            st["pos"][h] = [pos[i] for i in keep.tolist()]


def replay_press(spec: str, rule, prompt: int = 48, steps: int = 6):
    """Run a press on a tiny GQA Llama (a prompt, then one token at a time) while an oracle replays the paper's rule on
    the queries/keys each layer sees; before every decode step the layer must hold exactly the oracle's keys."""
    model = tiny_model("llama")
    p = press(spec)
    ids = torch.randint(1, 128, (1, prompt + steps))
    state: dict[int, dict] = {}
    checks = []

    def observe(i, q, k, v, scale, sliding, key_mask):
        assert sliding is None and key_mask is None
        st = state.get(i)
        if q.shape[2] > 1:  # the prompt: every key is in
            st = state[i] = {"keys": k[0].clone(), "pos": [list(range(k.shape[2]))] * k.shape[1],
                             "score": torch.zeros(k.shape[1], k.shape[2])}
        else:
            for h, pos in enumerate(st["pos"]):
                assert torch.equal(k[0, h, :-1], st["keys"][h, pos]), f"layer {i} head {h}: not the oracle's keys"
            checks.append(i)
            st["keys"] = torch.cat([st["keys"], k[0, :, -1:]], dim=1)
            st["score"] = torch.nn.functional.pad(st["score"], (0, 1))
            st["pos"] = [[*pos, st["keys"].shape[1] - 1] for pos in st["pos"]]
        rule(st, causal_probs(q, k, scale), p.capacity(i, 2, st["keys"].shape[1]), p.sinks)

    with torch.no_grad(), longreach.apply(model, spec) as handle:
        handle.observer = observe
        cache = output_cache(model(ids[:, :prompt], use_cache=True))
        for t in range(prompt, prompt + steps):
            cache = output_cache(model(ids[:, t : t + 1], **cache_kwargs(model, cache), use_cache=True))
    assert checks == [0, 1] * (steps + 1)  # the prompt's last token is held back: it attends as a decode step
    for i, layer in enumerate(cache.layers):
        for h, pos in enumerate(state[i]["pos"]):
            assert torch.equal(layer.keys[0, h], state[i]["keys"][h, pos])
    return state


def test_h2o_keeps_the_heavy_hitters_of_accumulated_attention_and_the_recent_tokens():
    state = replay_press("h2o:budget=24", h2o_rule)
    for st in state.values():
        assert all(len(pos) == 24 and pos[:4] == [0, 1, 2, 3] and pos[-10:] == list(range(44, 54))
                   for pos in st["pos"])


def test_tova_keeps_what_the_newest_query_attends_to_averaged_over_heads():
    state = replay_press("tova:budget=24", tova_rule)
    for st in state.values():
        assert len(st["pos"][0]) == 24 and st["pos"][0][:4] == [0, 1, 2, 3]


def test_streamingkv_keeps_exactly_the_sinks_and_the_most_recent_tokens():
    state = replay_press("streamingkv:budget=24", streaming_rule)
    for st in state.values():
        assert st["pos"] == [[0, 1, 2, 3, *range(34, 54)]] * 2


def test_streamingkv_after_the_prompt_keeps_exactly_the_sinks_and_the_last_tokens():
    state = replay_press("streamingkv:budget=24", streaming_rule, prompt=48, steps=1)
    model_positions = [0, 1, 2, 3, *range(29, 49)]  # the prompt's 0..3 and 28..47, then token 48 came and 28 left
    assert all(st["pos"] == [model_positions] * 2 for st in state.values())


@pytest.mark.parametrize(("t_q", "t_k"), [(50, 50), (1, 50), (7, 50), (1, 9)])
@pytest.mark.parametrize("params", [{"sinks": 4, "window": 12}, {"sinks": 0, "window": 5}, {"sinks": 2, "budget": 10}])
def test_streaming_selection_is_the_first_sinks_and_the_last_window_keys(t_q, t_k, params):
    method = method_class("streaming")(block=16, **params)
    q, k, _ = qkv(t_q, t_k)
    sel = method.select(q, k, SelectContext(scale=SCALE))
    sinks = params["sinks"]
    window = params.get("window", params.get("budget", 0) - sinks)
    want = torch.zeros(t_q, t_k, dtype=torch.bool)
    for i in range(t_q):
        p = t_k - t_q + i
        for j in range(p + 1):
            want[i, j] = j < sinks or j > p - window
    assert torch.equal(sel.to_mask()[0, 0], want)
    if t_q == 1 and t_k == 50:
        assert want[0].nonzero().flatten().tolist() == [*range(sinks), *range(50 - window, 50)]
