"""Logit softcapping and learned sink logits in every softmax a method computes itself (issue 23).

Oracles are independent: explicit float64 logits with the cap and a concatenated sink column, transformers' own
eager GPT-OSS attention (which returns the keys' probabilities with the sink column dropped), and hand-made
cases whose answer is known.
"""

from __future__ import annotations

import random

import pytest
import torch

import longreach
from longreach.cache.press import Observation
from longreach.cache.presses import SnapKV
from longreach.conformance import random_profile
from longreach.heads import profile_heads
from longreach.heads.policies import HeadKV
from longreach.heads.profile import LEARNED_SINK, build_probe
from longreach.heads.show import summary
from longreach.methods.base import SelectContext
from longreach.methods.flexprefill import FlexPrefill
from longreach.methods.scoring import causal_probs, last_query_probs
from longreach.methods.twilight import Twilight
from longreach.models import tiny_family
from longreach.stages import SoftmaxExtras

WORDS = [f"w{i}x" for i in range(300)]


class CharTokenizer:
    """One id per character (ids 1..127)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 127 + 1 for c in text]}


def oracle_probs(q, k, scale, softcap, sinks, rows):
    """(B, Hq, R, Tk) float64: per query head, logits -> cap -> causal mask -> [logits, sink] softmax -> drop."""
    n_q, n_kv = q.shape[1], k.shape[1]
    t_q, t_k = q.shape[2], k.shape[2]
    out = torch.zeros(q.shape[0], n_q, len(rows), t_k, dtype=torch.float64)
    for h in range(n_q):
        kv = h // (n_q // n_kv)  # GQA: consecutive query heads share a KV head
        logits = q[:, h, rows].double() @ k[:, kv].double().transpose(-1, -2) * scale  # (B, R, Tk)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        pos = torch.tensor(rows) + (t_k - t_q)
        logits = logits.masked_fill(torch.arange(t_k)[None, :] > pos[:, None], float("-inf"))
        if sinks is not None:
            col = torch.full((*logits.shape[:-1], 1), float(sinks[h]), dtype=torch.float64)
            logits = torch.cat([logits, col], dim=-1)
        probs = logits.softmax(-1)
        out[:, h] = probs[..., :-1] if sinks is not None else probs
    return out


def test_causal_probs_with_softcap_and_sinks_equals_the_float64_hand_computation():
    torch.manual_seed(1)
    q, k = torch.randn(2, 6, 9, 8) * 3, torch.randn(2, 2, 13, 8) * 3  # 3 query heads per KV head
    sinks = torch.tensor([4.0, -1.0, 0.5, 2.0, -3.0, 1.5])  # different within each group
    rows = [0, 3, 8]
    got = causal_probs(q, k, 0.3, torch.tensor(rows), extras=SoftmaxExtras(2.5, sinks))  # (B, Hkv, G, R, Tk)
    want = oracle_probs(q, k, 0.3, 2.5, sinks, rows)
    assert got.shape == (2, 2, 3, 3, 13)
    torch.testing.assert_close(got.flatten(1, 2).double(), want, atol=1e-6, rtol=1e-5)
    # a head's sink takes its share of every row: the keys' total is 1 - sigmoid(sink - logsumexp(keys))
    total = got.flatten(1, 2).sum(-1)
    assert bool((total < 1).all())
    torch.testing.assert_close(total.double(), want.sum(-1), atol=1e-6, rtol=1e-5)
    # one query head's sink does not leak into the others of its group
    moved = sinks.clone()
    moved[0] = 40.0
    again = causal_probs(q, k, 0.3, torch.tensor(rows), extras=SoftmaxExtras(2.5, moved)).flatten(1, 2)
    assert float(again[:, 0].sum(-1).max()) < 1e-10
    torch.testing.assert_close(again[:, 1:], got.flatten(1, 2)[:, 1:])


def test_without_extras_causal_probs_is_the_plain_softmax_and_a_minus_inf_sink_changes_nothing():
    torch.manual_seed(2)
    q, k = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8)
    plain = causal_probs(q, k, 0.35)
    assert torch.equal(causal_probs(q, k, 0.35, extras=SoftmaxExtras()), plain)
    assert torch.equal(causal_probs(q, k, 0.35, extras=SoftmaxExtras(None, None)), plain)
    no_sink = causal_probs(q, k, 0.35, extras=SoftmaxExtras(None, torch.full((4,), float("-inf"))))
    torch.testing.assert_close(no_sink, plain, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(plain.flatten(1, 2).double(), oracle_probs(q, k, 0.35, None, None, list(range(7))))
    # a padded key and a key-less row: zeros, never NaN, with sinks too
    mask = torch.ones(1, 7, dtype=torch.bool)
    mask[0, 0] = False
    padded = last_query_probs(q, k, 7, 0.35, mask, SoftmaxExtras(1.0, torch.zeros(4)))
    assert bool(torch.isfinite(padded).all()) and float(padded[0, :, 0].abs().max()) == 0.0


def test_snapkv_votes_with_the_sink_included_attention():
    """Two query heads share a KV head. Head 0 points at key 5, head 1 (more sharply) at key 9, but head 1's
    learned sink takes almost all of its attention: with the sink head 1's vote nearly vanishes and key 5 is
    kept; a plain softmax would keep key 9."""
    n, w, d = 16, 4, 4
    k = torch.zeros(1, 1, n, d)
    k[0, 0, 5, 0] = 1.0
    k[0, 0, 9, 1] = 1.0
    q = torch.zeros(1, 2, w, d)
    q[0, 0, :, 0] = 3.0  # head 0: logit 3 on key 5, 0 elsewhere
    q[0, 1, :, 1] = 6.0  # head 1: logit 6 on key 9
    press = SnapKV(budget=5, sinks=0, window=w, pool=1)  # the window plus exactly one key of the prefix
    sinks = torch.tensor([-30.0, 12.0])

    def expected(sink_logits):
        """Hand computation: per head, per query, softmax over the causal keys and the sink; votes averaged."""
        votes = torch.zeros(n, dtype=torch.float64)
        for h in range(2):
            for i in range(w):
                pos = n - w + i
                logits = (q[0, h, i].double() @ k[0, 0, : pos + 1].double().T).tolist()
                den = sum(torch.tensor(logits).exp()) + (torch.tensor(float(sink_logits[h])).exp()
                                                         if sink_logits is not None else 0)
                votes[: pos + 1] += torch.tensor(logits).exp() / den / 2
        prefix = votes[: n - w]
        return sorted([int(prefix.argmax()), *range(n - w, n)])

    with_sink = press.keep_indices(Observation(0, 1, n, q, k, k, 1.0, extras=SoftmaxExtras(None, sinks)), 5)
    plain = press.keep_indices(Observation(0, 1, n, q, k, k, 1.0), 5)
    assert with_sink[0, 0].tolist() == expected(sinks) == [5, 12, 13, 14, 15]
    assert plain[0, 0].tolist() == expected(None) == [9, 12, 13, 14, 15]


def _blocks_kept(sel) -> torch.Tensor:
    return (sel.indices >= 0).sum(-1)


def test_twilight_and_flexprefill_stay_partial_with_a_large_sink():
    """With a sink taking nearly all attention the keys' mass sums far below p / gamma; thresholds are a fraction
    of the keys' own mass, so a partial set is still chosen (never every block offered)."""
    torch.manual_seed(3)
    u = torch.nn.functional.normalize(torch.randn(16), dim=0)
    q, k = torch.randn(1, 4, 256, 16) + 3 * u, torch.randn(1, 2, 256, 16)
    k[:, :, 96:112] += 3 * u  # two key blocks every query leans to: a few blocks reach p / gamma
    k[:, :, 160:176] += 3 * u
    huge = SoftmaxExtras(None, torch.full((4,), 25.0))  # the keys keep ~1e-8 of each row
    twilight = Twilight(density=0.6, block=16)  # default p=0.95; the budgets only cap
    offered = _blocks_kept(twilight.base_method.select(q, k, SelectContext(0)))
    flex = FlexPrefill(density=0.9, block=16)  # default gamma=0.9 (the density caps what gamma asks)
    quota = flex.quota(q, k)
    capped = torch.minimum(quota.n_take, quota.candidate.sum(-1)).expand(1, 2, -1)
    for method, most in ((twilight, offered), (flex, capped)):
        kept = _blocks_kept(method.select(q, k, SelectContext(0, extras=huge)))[..., :-1]  # the last block fills
        most = most[..., :-1]  # its budget by design (flexprefill's exact_last)
        assert bool((kept <= most).all()), method.name
        assert 0 < int(kept.sum()) < int(most.sum()), f"{method.name}: kept {kept.tolist()} of {most.tolist()}"


def test_twilight_with_one_probe_per_row_is_unchanged_by_a_constant_sink():
    """Its threshold is relative to the keys' own mass: with one probe per (head, query block) averaged, a sink
    only rescales that mass, so the pruned selection is the one without it. The base is moba, whose proposals do
    not use the softmax (quest's shares hold the sink logit, so its proposals may change)."""
    torch.manual_seed(4)
    q, k = torch.randn(1, 4, 160, 16), torch.randn(1, 2, 160, 16)
    method = Twilight(density=0.6, block=16, probes=1, group="q", base="moba")
    plain = method.select(q, k, SelectContext(0))
    sunk = method.select(q, k, SelectContext(0, extras=SoftmaxExtras(None, torch.tensor([9.0, 2.0, 15.0, 0.0]))))
    assert torch.equal(sunk.indices, plain.indices)
    assert int(_blocks_kept(plain).sum()) < int(_blocks_kept(method.base_method.select(q, k, SelectContext(0))).sum())


def _sharp(model):
    """Larger query weights: attention logits of a few units, so a softcap and sinks change the output."""
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.data *= 30
    return model


def _sunk_gpt_oss(sinks=((3.0, -1.0, 6.0, 0.5), (1.0, 4.0, -2.0, 2.5))):
    torch.manual_seed(5)
    model = tiny_family("gpt-oss")
    for layer, values in zip(model.model.layers, sinks, strict=True):
        layer.self_attn.sinks.data = torch.tensor(values)
    return model


def test_head_profile_reports_the_learned_sink_share_beside_the_first_tokens(tmp_path):
    model = _sunk_gpt_oss()
    prose = lambda seed: " ".join(random.Random(seed).choices(WORDS, k=400))  # noqa: E731
    tok = CharTokenizer()
    prof = profile_heads(model, tok, prose, WORDS, lengths=(320,), depths=(0.5,), sinks=4)
    # the oracle: transformers' eager GPT-OSS attention returns each key's probability with the sink dropped
    probe = build_probe(tok, prose(1000 * 320), WORDS, 320, 0.5, 1000 * 320)
    with torch.no_grad():
        out = model(torch.tensor([probe.ids]), output_attentions=True, use_cache=False)
    rows = list(range(max(0, probe.answer[0] - 128), len(probe.ids)))
    for layer, attn in enumerate(out.attentions):  # (1, Hq, T, T)
        want = (1 - attn[0, :, rows].double().sum(-1)).mean(-1)
        torch.testing.assert_close(torch.tensor(prof.scores[LEARNED_SINK][layer], dtype=torch.float64), want,
                                   atol=1e-5, rtol=1e-4)
        first = attn[0, :, rows, :4].double().sum(-1).mean(-1)
        torch.testing.assert_close(torch.tensor(prof.scores["sink"][layer], dtype=torch.float64), first,
                                   atol=1e-5, rtol=1e-4)
    assert float(prof.tensor(LEARNED_SINK)[0, 2]) > 0.5  # the sink logit of 6 takes most of that head's attention
    again = type(prof).load(prof.save(tmp_path / "p.json"))
    assert again == prof
    assert "learned sink vs first tokens" in "\n".join(summary(again))
    # an older profile, without the score, still loads and shows
    old = type(prof)(prof.model, prof.layers, prof.heads, prof.kv_heads,
                     {s: v for s, v in prof.scores.items() if s != LEARNED_SINK}, prof.probe)
    assert "learned sink" not in "\n".join(summary(type(prof).load(old.save(tmp_path / "old.json"))))


@pytest.mark.parametrize("family", ["gemma2", "gpt-oss"])
def test_act_recomputes_calibrated_heads_with_the_models_softmax(family, tmp_path):
    """With nothing detected (alpha huge) ACT recomputes every calibrated head with a zero bias: that must be the
    model's own attention, softcap and sinks included."""
    model = _sharp(_sunk_gpt_oss() if family == "gpt-oss" else tiny_family("gemma2", attn_logit_softcapping=1.0))
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        want = model(ids).logits
        spec = f"act:profile={random_profile(model, tmp_path)},heads=1.0,damp=0.5,alpha=1e9"
        with longreach.apply(model, spec):
            got = model(ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_runtime_hands_each_layer_its_softcap_and_sinks(monkeypatch, tmp_path):
    """Selectors (SelectContext), presses (Observation) and head policies (headkv's voters) get the model's own
    extras, a head split's being its query heads' sinks."""
    seen: dict[str, list] = {"select": [], "press": [], "headkv": []}
    select, keep, short_keep = Twilight.select, SnapKV.keep_indices, HeadKV.short_keep
    monkeypatch.setattr(Twilight, "select", lambda self, q, k, ctx: seen["select"].append(ctx.extras)
                        or select(self, q, k, ctx))
    monkeypatch.setattr(SnapKV, "keep_indices", lambda self, obs, cap: seen["press"].append(obs.extras)
                        or keep(self, obs, cap))
    monkeypatch.setattr(HeadKV, "short_keep", lambda self, q, k, scale, n, extras: seen["headkv"].append(extras)
                        or short_keep(self, q, k, scale, n, extras))
    model = _sunk_gpt_oss()
    ids = torch.randint(3, 128, (1, 48))
    profile = random_profile(model, tmp_path)
    with torch.no_grad():
        for spec in ("twilight:density=0.5,block=16", "snapkv:density=0.5",
                     f"headkv:profile={profile},density=0.75,ratio=0.5"):
            with longreach.apply(model, spec):
                model(ids)
    full = [layer.self_attn.sinks.data for layer in model.model.layers]
    assert any(torch.equal(e.sinks, full[1]) for e in seen["select"])  # layer 1 is the full-attention layer
    assert any(torch.equal(e.sinks, full[1]) for e in seen["press"])
    assert seen["headkv"] and all(e.sinks is not None and e.sinks.shape == (2,) for e in seen["headkv"])
    gemma = tiny_family("gemma2", attn_logit_softcapping=7.0)
    got: list = []
    monkeypatch.setattr(Twilight, "select", lambda self, q, k, ctx: got.append(ctx.extras) or select(self, q, k, ctx))
    with torch.no_grad(), longreach.apply(gemma, "twilight:density=0.5,block=16"):
        gemma(ids)
    assert got and all(e.softcap == 7.0 and e.sinks is None for e in got)
