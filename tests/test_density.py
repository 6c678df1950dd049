"""Density accounting against the dense mask: pairs kept / causal pairs, whatever order selections arrive in."""

from __future__ import annotations

import random
import time

import pytest
import torch
from conftest import tiny_model

import longreach
from longreach.conformance import random_profile
from longreach.generation import generate
from longreach.methods.blocktopk import Quest
from longreach.runtime.density import FOLD_EVERY, DensityStats, causal_pairs
from longreach.selection import Selection

SLEEP = 0.005  # what the slowed selector adds to every call: a lower bound on the time counted


def slow_quest(monkeypatch) -> list[int]:
    """Make every Quest selector call sleep ``SLEEP``; returns the list its calls' query lengths go to."""
    calls: list[int] = []
    select = Quest.select

    def slow_select(self, q, k, ctx):
        calls.append(q.shape[2])
        time.sleep(SLEEP)
        return select(self, q, k, ctx)

    monkeypatch.setattr(Quest, "select", slow_select)
    return calls


def _random_selection(rng: random.Random, q_len: int, kv_len: int, heads: int = 3) -> Selection:
    block = rng.choice([4, 8])
    n_qb, n_kb = -(-q_len // block), -(-kv_len // block)
    k = rng.randint(1, 4)
    idx = torch.randint(-1, n_kb, (1, heads, n_qb, k), generator=torch.Generator().manual_seed(rng.randint(0, 99)))
    return Selection(idx, q_len, kv_len, block, block, sinks=rng.randint(0, 3), window=rng.randint(1, 9))


def _mask_pairs(sel: Selection) -> tuple[int, int]:
    """(kept, causal) counted on the dense mask: the oracle, no closed forms."""
    mask = sel.to_mask()  # (B, H, Tq, Tk) bool
    causal = torch.ones(sel.q_len, sel.kv_len, dtype=torch.bool).tril(sel.kv_len - sel.q_len)
    return int(mask.sum()), int(causal.sum()) * sel.batch * sel.heads


def test_density_equals_the_mask_count_for_decode_steps_and_prefills():
    rng = random.Random(0)
    stats = DensityStats()
    kept = causal = 0
    # a prefill, then decode steps of 3 layers each (shared geometry per step), then another prefill
    sels = [_random_selection(rng, 24, 24)]
    for t in range(25, 25 + 2 * FOLD_EVERY):
        step = _random_selection(rng, 1, t)
        sels += [Selection(_random_selection(rng, 1, t).indices[..., : step.indices.shape[-1]], 1, t, step.block_q,
                           step.block_k, step.sinks, step.window) for _ in range(3)]
    sels.append(_random_selection(rng, 16, 40))
    for i, sel in enumerate(sels):
        stats.add("prefill" if sel.q_len > 1 else "decode", sel)
        k, c = _mask_pairs(sel)
        kept, causal = kept + k, causal + c
        assert causal_pairs(sel) == c
        if i in (0, 5, 200):  # reading mid-way counts what is pending too
            assert stats.density() is not None
    decode = [s for s in sels if s.q_len == 1]
    want_decode = sum(_mask_pairs(s)[0] for s in decode) / sum(_mask_pairs(s)[1] for s in decode)
    assert stats.density("decode") == want_decode
    assert stats.density() == kept / causal


def test_full_and_padded_selections_are_counted_exactly():
    stats = DensityStats()
    full = Selection.dense(2, 5, 9)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    padded = Selection(torch.tensor([[[[0]]]]).expand(2, 1, 1, 1), 5, 9, 8, 8, 1, 2, mask)
    stats.add("prefill", full)
    stats.add("prefill", padded)
    k_full, c_full = _mask_pairs(full)
    k_pad = int(padded.to_mask().sum())
    c_pad = int(padded.causal_counts().sum())
    assert stats.density("prefill") == (k_full + k_pad) / (c_full + c_pad)


def test_selection_time_is_the_selector_stages_own_per_phase(monkeypatch):
    """``handle.select_s`` adds up the selector's calls, per phase: a selector that sleeps a known time in every
    call makes each phase's total at least (calls x sleep), the calls counted here; ``reset_stats`` starts again
    at zero, and a handle that does not track records None (not measured), not zero."""
    calls = slow_quest(monkeypatch)
    model = tiny_model("llama")  # 2 layers
    ids = torch.randint(1, 128, (1, 40))
    with torch.no_grad(), longreach.apply(model, "quest:density=0.5") as handle:
        run = generate(model, ids, 4)
        got = dict(handle.select_s)
        handle.reset_stats()
        assert handle.select_s == {"prefill": 0.0, "decode": 0.0}
    prompt, steps = calls.count(40), calls.count(1)
    assert (prompt, steps) == (2, 2 * (len(run.tokens) - 1)) and len(calls) == prompt + steps and len(run.tokens) == 4
    assert got["prefill"] >= SLEEP * prompt and got["decode"] >= SLEEP * steps
    assert got["prefill"] + got["decode"] <= run.prefill_s + run.decode_s  # inside the measured phases
    with torch.no_grad(), longreach.apply(model, "quest:density=0.5", track_density=False) as handle:
        generate(model, ids, 2)
        assert handle.select_s == {"prefill": None, "decode": None}  # not measured, not zero


@pytest.mark.parametrize("spec", ["quest:density=0.5+snapkv:density=0.5",  # the held-back last row: the prompt's
                                  "lserve:profile={},ratio=0.5,window=16,density=0.2,block=16"])  # a head split
def test_selection_time_in_a_prompt_is_the_prompts(spec, monkeypatch, tmp_path):
    """One forward of a prompt: every selector call is the prompt's, whether the runtime's selector stage made it or
    a head policy on its long heads (lserve's quest), the held-back last row included (attended as a decode step,
    but inside the prompt's time); nothing is counted as decode."""
    calls = slow_quest(monkeypatch)
    model = tiny_model("llama")
    spec = spec.format(random_profile(model, tmp_path))
    with torch.no_grad(), longreach.apply(model, spec) as handle:
        model(torch.randint(1, 128, (1, 256)), use_cache=True)
        got = dict(handle.select_s)
    assert calls and got["decode"] == 0.0 and got["prefill"] >= SLEEP * len(calls)
    assert 1 in calls  # both hold the last prompt row back: its one-row call is there, and counted as the prompt's


def test_with_query_heads_every_layer_weighs_alike_whatever_rows_its_selection_has():
    """A dense layer (one selection row for all heads) beside a sparse one (a row per KV head), 4 query heads: the
    density is the mean of the two layers' own mask densities, as if each query head were counted."""
    rng = random.Random(3)
    sparse = _random_selection(rng, 24, 24, heads=2)
    full = Selection.dense(1, 24, 24)
    stats = DensityStats()
    stats.add("prefill", full, 4)
    stats.add("prefill", sparse, 4)
    kept, causal = _mask_pairs(sparse)
    assert full.heads == 1 and stats.density() == pytest.approx((1 + kept / causal) / 2, abs=1e-12)
    unweighted = DensityStats()  # without query heads: rows counted as they come, the dense layer weighs half
    unweighted.add("prefill", full)
    unweighted.add("prefill", sparse)
    assert unweighted.density() == pytest.approx((1 + 2 * kept / causal) / 3, abs=1e-12)
