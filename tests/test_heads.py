"""Head profiles (scores, JSON round trip, bad profiles) and the head policies duo / lserve / razor / headkv /
ablate."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model
from oracles import snapkv_keep

import longreach
from longreach import InputError
from longreach.cache.compressed import CompressedLayer, Part, cache_bytes
from longreach.compat import cache_kwargs, output_cache
from longreach.heads import SCORES, HeadProfile, profile_heads
from longreach.heads.profile import Probe, ProfileAccumulator, build_probe
from longreach.heads.show import heatmaps, summary
from longreach.selection import Selection

WORDS = [f"w{i}x" for i in range(300)]


class CharTokenizer:
    """One id per character (ids 1..127): enough structure for probes on a 128-token random model."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 127 + 1 for c in text]}


def random_profile(layers=2, heads=4, kv=2, seed=0) -> HeadProfile:
    rng = random.Random(seed)
    return HeadProfile("", layers, heads, kv, {s: [[rng.random() for _ in range(heads)] for _ in range(layers)]
                                               for s in SCORES})


def model_and_profile(arch: str, tmp_path):
    """A tiny model of ``arch`` and a random head profile of its shape, saved under ``tmp_path``."""
    model = tiny_model(arch)
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    return model, str(random_profile(*shape).save(tmp_path / "p.json"))


@pytest.fixture
def profile_path(tmp_path):
    return str(random_profile().save(tmp_path / "p.json"))


def test_profile_on_a_tiny_model_has_every_score_in_range_and_round_trips(tmp_path):
    model = tiny_model("llama")
    prof = profile_heads(model, CharTokenizer(), lambda seed: " ".join(random.Random(seed).choices(WORDS, k=400)),
                         WORDS, lengths=(300,), depths=(0.3, 0.8))
    assert (prof.layers, prof.heads, prof.kv_heads) == (2, 4, 2)
    for name in SCORES:
        t = prof.tensor(name)
        assert t.shape == (2, 4) and bool(((t >= 0) & (t <= 1 + 1e-9)).all()), name
    assert prof.probe["lengths"] == [300]
    again = HeadProfile.load(prof.save(tmp_path / "p.json"))
    assert again == prof
    assert "heads with retrieval" in "\n".join(summary(again))
    assert {p.name for p in heatmaps(again, tmp_path / "maps")} == {f"{s}.png" for s in SCORES}


def test_retrieval_score_counts_heads_whose_top_key_is_the_copied_token():
    """Head 0 of KV group 0 attends exactly to the needle token being copied; the others attend to key 0."""
    t, d = 40, 8
    probe = Probe(list(range(t)), needle=[10, 11, 12], answer=[37, 38, 39])
    k = torch.zeros(1, 1, t, d)
    q = torch.zeros(1, 2, t, d)
    for j, (n, a) in enumerate(zip(probe.needle, probe.answer, strict=True)):
        k[0, 0, n, j] = 1.0
        q[0, 0, a - 1, j] = 50.0  # the query before answer token j looks for needle token j
    k[0, 0, 0, 7] = 1.0
    q[0, 1, :, 7] = 50.0
    acc = ProfileAccumulator(layers=1, heads=2, sinks=4, window=8, alpha=10.0)
    acc.probe = probe
    acc(0, q, k, k, 1.0, None, None)
    scores = acc.scores()
    assert scores["retrieval"][0] == [1.0, 0.0]
    assert scores["sink"][0][1] > 0.99 and scores["sink"][0][0] < 0.5


def test_probe_places_the_same_tokens_in_needle_and_answer():
    tok = CharTokenizer()
    p = build_probe(tok, " ".join(WORDS), WORDS, 400, 0.5, seed=3)
    assert len(p.ids) == 400
    assert [p.ids[i] for i in p.needle] == [p.ids[i] for i in p.answer]
    with pytest.raises(InputError, match="too short"):
        build_probe(tok, " ".join(WORDS), WORDS, 60, 0.5, seed=3)


def test_bad_profiles_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        HeadProfile.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="invalid JSON"):
        HeadProfile.load(tmp_path / "bad.json")
    data = json.loads(random_profile().save(tmp_path / "ok.json").read_text())
    data["scores"]["retrieval"] = [[0.0] * 3] * 2
    (tmp_path / "shape.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="not 2 layers x 4 heads"):
        HeadProfile.load(tmp_path / "shape.json")
    wrong = random_profile(layers=3).save(tmp_path / "wrong.json")
    with pytest.raises(InputError, match=r"3 layers x 4 heads .* this model has 2 x 4"):
        longreach.apply(tiny_model("llama"), f"duo:profile={wrong}")
    named = HeadProfile("smollm2-135m", 2, 4, 2, random_profile().scores).save(tmp_path / "named.json")
    model = tiny_model("llama")
    model.longreach_id = "gemma3-270m"
    with pytest.raises(InputError, match="made for 'smollm2-135m', not 'gemma3-270m'"):
        longreach.apply(model, f"razor:profile={named}")
    with pytest.raises(InputError, match="does not exist"):
        longreach.parse_spec("duo:profile=/nonexistent/p.json")  # at parse time, before any model work


def test_duo_split_attention_equals_its_selection_and_frees_streaming_heads(profile_path):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 150))
    nxt = torch.randint(1, 128, (1, 3))
    spec = f"duo:profile={profile_path},ratio=0.5,sinks=4,window=16"
    duo = longreach.parse_spec(spec).selector
    with torch.no_grad():
        with longreach.apply(model, spec):
            out = model(ids, use_cache=True)
            cache = output_cache(out)
            steps = [model(nxt[:, i:i + 1], **cache_kwargs(model, cache)).logits for i in range(3)]
        with longreach.apply(model, selection_of(duo)):
            ref = model(ids, use_cache=True)
            ref_steps = [model(nxt[:, i:i + 1], **cache_kwargs(model, output_cache(ref))).logits for i in range(3)]
        full = cache_bytes(output_cache(ref))
    assert (out.logits - ref.logits).abs().max() < 1e-4
    for a, b in zip(steps, ref_steps, strict=True):
        assert (a - b).abs().max() < 1e-4
    for i, layer in enumerate(cache.layers):
        split = duo.head_split(i, 2)
        if split is None:
            continue
        assert isinstance(layer, CompressedLayer) and layer.short is not None
        assert layer.short.keys.shape[2] == 4 + 16 and layer.keys.shape[2] == 153
    assert cache_bytes(cache) < full
    assert cache.get_seq_length() == 153


def selection_of(policy):
    """Duo's one-Selection view run through the normal path (no head split, nothing freed)."""

    @dataclass(frozen=True)
    class Ref(longreach.SelectionMethod):
        name = "ref"

        def select(self, q, k, ctx):
            return policy.select(q, k, ctx)

    return Ref()


def test_razor_keeps_retrieval_heads_whole_and_compensates_the_rest(profile_path):
    model = tiny_model("qwen2")
    ids = torch.randint(1, 128, (1, 120))
    with torch.no_grad():
        dense_bytes = cache_bytes(output_cache(model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                                 return_dict_in_generate=True)))
    with torch.no_grad(), longreach.apply(model, f"razor:profile={profile_path},ratio=0.5,window=16") as h:
        out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             return_dict_in_generate=True)
    cache = output_cache(out)
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer) and layer.short is not None:
            assert layer.keys.shape[2] == 124 and layer.short.keys.shape[2] == 4 + 16
            assert layer.short.comp_count == 124 - 20
    assert h.density("prefill") == pytest.approx(1.0)
    assert cache_bytes(cache) < dense_bytes


def test_compensation_token_is_the_running_mean_of_dropped_keys():
    keys = torch.randn(1, 2, 30, 4)
    part = Part(torch.tensor([0, 1]), keys.clone(), keys.clone())
    part.trim(sinks=2, window=5, compensate=True)
    assert torch.allclose(part.comp_keys[:, :, 0], keys[:, :, 2:25].mean(2))
    more = torch.randn(1, 2, 3, 4)
    part.keys = torch.cat([part.keys, more], 2)
    part.values = torch.cat([part.values, more], 2)
    part.trim(sinks=2, window=5, compensate=True)
    dropped = torch.cat([keys[:, :, 2:28]], 2)
    assert part.comp_count == 26
    assert torch.allclose(part.comp_keys[:, :, 0], dropped.mean(2), atol=1e-6)
    k, _, lead = part.view()
    assert lead == 3 and k.shape[2] == 2 + 1 + 5


def record_prefill(model, ids):
    """Dense prefill through longreach: per layer the post-RoPE queries and keys (what headkv votes with)."""
    seen = {}
    with torch.no_grad(), longreach.apply(model, "dense") as h:
        h.observer = lambda i, q, k, *rest: seen.setdefault(i, (q, k))
        model(ids, use_cache=True)
    return seen


def test_headkv_keeps_whole_heads_and_what_the_last_queries_vote_for_in_the_others(profile_path):
    """The prompt but its held-back last token splits the heads: whole heads keep every key, the others what the
    SnapKV oracle's votes keep; the last token then attends that cache as the first decode step would."""
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 120))
    nxt = torch.randint(1, 128, (1, 1))
    spec = f"headkv:profile={profile_path},ratio=0.5,density=0.75,sinks=4,window=8,pool=3"
    policy = longreach.parse_spec(spec).of_kind("press")[0]
    seen = record_prefill(model, ids[:, :119])
    with torch.no_grad(), longreach.apply(model, spec):
        cache = output_cache(model(ids, use_cache=True))
        kept = {}
        for i, layer in enumerate(cache.layers):
            q, k = seen[i]
            split = policy.head_split(i, 2)
            if split is None:
                assert not isinstance(layer, CompressedLayer) or layer.short is None
                kept[i] = torch.arange(119)[None, None].expand(1, 2, -1)
                continue
            assert policy.short_capacity(119) == 59  # (0.75 - 0.5) / (1 - 0.5) of the tokens
            assert torch.equal(layer.keys[:, :, :-1], k[:, split.long]), "whole heads keep every key"
            group = q.shape[1] // k.shape[1]
            voters = q[:, (split.short[:, None] * group + torch.arange(group)).flatten(), -8:]  # their last 8 queries
            want = snapkv_keep(voters, k[:, split.short], 16 ** -0.5, 59, sinks=4, pool=3)
            short = layer.short.keys[:, :, :-1]
            assert torch.equal(short, k[:, split.short].gather(2, want[..., None].expand(-1, -1, -1, 16)))
            rows = torch.full((1, 2, 119), -1)
            rows[:, split.long] = torch.arange(119)
            rows[:, split.short, :59] = want
            kept[i] = rows
        # whole heads 120 tokens + voted heads 59 + the held-back token: 0.75 of 2 heads x 120 tokens
        assert cache_bytes(cache) == 0.75 * 2 * 2 * 2 * 120 * 16 * 4  # layers x K,V x kv heads x tokens x dim x fp32
        ours = model(nxt, **cache_kwargs(model, cache), use_cache=True).logits
        assert [layer.short.keys.shape[2] for layer in cache.layers if layer.short is not None] == [61] * len(
            [s for s in (policy.head_split(i, 2) for i in range(2)) if s is not None]), "decoding appends"

    @dataclass(frozen=True)
    class Kept(longreach.SelectionMethod):
        name = "kept"

        def select(self, q, k, ctx):
            if q.shape[2] > 1:
                return Selection.dense(q.shape[0], q.shape[2], k.shape[2])
            idx = kept[ctx.layer_idx].sort(-1, descending=True).values[:, :, None]  # -1 (none) last
            return Selection(idx, 1, k.shape[2], 1, 1, sinks=0, window=1)  # window 1: the new token itself

    with torch.no_grad(), longreach.apply(model, Kept()):
        ref_cache = output_cache(model(ids[:, :119], use_cache=True))
        ref_cache = output_cache(model(ids[:, 119:], **cache_kwargs(model, ref_cache), use_cache=True))
        kept = {i: torch.cat([rows, torch.full_like(rows[..., :1], 119)], -1) for i, rows in kept.items()}
        ref = model(nxt, **cache_kwargs(model, ref_cache)).logits
    assert (ours - ref).abs().max() < 1e-4, "decode after headkv = dense restricted to the kept keys"


def test_headkv_chunked_prefill_holds_the_budget_after_every_chunk(profile_path):
    model = tiny_model("qwen2")
    ids = torch.randint(1, 128, (1, 150))
    spec = f"headkv:profile={profile_path},ratio=0.5,density=0.75,window=8"
    policy = longreach.parse_spec(spec).of_kind("press")[0]
    first_layer_keys = record_prefill(model, ids)[0][1]  # layer 0's keys do not depend on attention
    with torch.no_grad(), longreach.apply(model, spec):
        cache = output_cache(model(ids[:, :100], use_cache=True))
        lengths = [layer.short.keys.shape[2] for layer in cache.layers if layer.short is not None]
        cache = output_cache(model(ids[:, 100:], **cache_kwargs(model, cache), use_cache=True))
    assert lengths and set(lengths) == {policy.short_capacity(100)} == {50}
    assert cache.get_seq_length() == 150
    for i, layer in enumerate(cache.layers):
        if layer.short is None:
            continue
        assert layer.keys.shape[2] == 150 and layer.short.keys.shape[2] == policy.short_capacity(150) == 75
        if i == 0:
            full = first_layer_keys[:, layer.short.heads]
            same = (layer.short.keys[:, :, :, None] == full[:, :, None]).all(-1)
            assert bool(same.any(-1).all())
            pos = same.float().argmax(-1)
            assert bool((pos.diff(dim=-1) > 0).all()), "kept keys stay in order"
            assert bool((pos[..., :4] == torch.arange(4)).all()), "sinks are kept"
            assert bool((pos[..., -8:] == torch.arange(142, 150)).all()), "the last window is kept"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_headkv_at_full_budget_is_dense(arch, tmp_path):
    model, path = model_and_profile(arch, tmp_path)
    ids = torch.randint(1, 128, (1, 90))

    def run(spec):
        with torch.no_grad(), longreach.apply(model, spec):
            return model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)

    dense, full = run("dense"), run(f"headkv:profile={path},ratio=0.5,density=1.0,window=8")
    assert torch.equal(full.sequences, dense.sequences)
    for a, b in zip(full.logits, dense.logits, strict=True):
        assert (a - b).abs().max() < 1e-4


def test_headkv_refuses_a_budget_the_whole_heads_already_spend(profile_path):
    with pytest.raises(longreach.SpecError, match="lower ratio or raise density"):
        longreach.parse_spec(f"headkv:profile={profile_path},ratio=0.5,density=0.25")


def test_lserve_selects_blocks_for_retrieval_heads(profile_path):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 256))
    with torch.no_grad():
        with longreach.apply(model, f"lserve:profile={profile_path},ratio=0.5,window=16,density=1.0,block=16"):
            full = model(ids).logits
        with longreach.apply(model, f"duo:profile={profile_path},ratio=0.5,window=16"):
            duo = model(ids).logits
        with longreach.apply(model, f"lserve:profile={profile_path},ratio=0.5,window=16,density=0.2,block=16") as h:
            sparse = model(ids).logits
    assert (full - duo).abs().max() < 1e-4, "lserve at full budget is duo"
    assert h.density("prefill") < 0.5 and (sparse - duo).abs().max() > 1e-4


def test_ablate_zeroes_exactly_the_chosen_heads(profile_path):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 50))
    with torch.no_grad():
        dense = model(ids).logits
        with longreach.apply(model, f"ablate:profile={profile_path},top=0"):
            none = model(ids).logits
        with longreach.apply(model, f"ablate:profile={profile_path},top=0.25") as h:
            zeroed = model(ids).logits
            chosen = h.spec.selector.zeroed
    assert (none - dense).abs().max() < 1e-4
    assert (zeroed - dense).abs().max() > 1e-3
    prof = HeadProfile.load(profile_path)
    top2 = prof.tensor("retrieval").flatten().argsort(descending=True)[:2].tolist()
    assert sorted((layer, head) for layer, hs in chosen.items() for head in hs) == sorted(
        (i // 4, i % 4) for i in top2)
    with pytest.raises(longreach.SpecError, match="by must be"):
        longreach.parse_spec(f"ablate:profile={profile_path},by=worst")


def test_random_ablation_draws_only_non_retrieval_heads(tmp_path):
    prof = random_profile(layers=4, heads=4, seed=3)
    scores = prof.tensor("retrieval")
    path = prof.save(tmp_path / "p.json")
    below = {(i // 4, i % 4) for i in range(16) if scores.flatten()[i] < 0.5}
    for seed in range(20):
        spec = longreach.parse_spec(f"ablate:profile={path},top=0.25,by=random,exclude=0.5,seed={seed}").selector
        picked = {(layer, head) for layer, hs in spec.zeroed.items() for head in hs}
        assert len(picked) == 4 and picked <= below
    anywhere = set()
    for seed in range(20):
        spec = longreach.parse_spec(f"ablate:profile={path},top=0.25,by=random,exclude=0,seed={seed}").selector
        anywhere |= {(layer, head) for layer, hs in spec.zeroed.items() for head in hs}
    assert anywhere - below, "exclude=0 draws from every head"
    with pytest.raises(longreach.SpecError, match="heads score below exclude"):
        longreach.parse_spec(f"ablate:profile={path},top=1.0,by=random,exclude=0.5")


def test_act_damps_only_detected_hidden_sinks_in_calibrated_heads(profile_path):
    from longreach.heads.policies import ACT
    from longreach.methods.base import SelectContext

    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    q[..., 0], k[..., 0] = q[..., 0].abs() + 2, 0.0
    k[0, :, 10, 0] = 4.0  # key 10 draws most of every later query's attention: a hidden sink
    act = ACT(profile=profile_path, heads=1.0, damp=0.25, alpha=3.0, observe=16)
    dense = longreach.attend(q, k, v, Selection.dense(1, 30, 30), 8 ** -0.5, "reference")
    ctx = SelectContext(layer_idx=0, scale=8 ** -0.5)
    out = act.postprocess(dense, q, k, v, ctx)
    # by hand: weight of key 10 times 0.25, renormalised
    logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 8 ** -0.5
    logits = logits.masked_fill(torch.ones(30, 30).triu(1).bool(), -torch.inf)
    probs = logits.softmax(-1)
    probs[..., 10] *= 0.25
    probs = probs / probs.sum(-1, keepdim=True)
    ref = (probs @ v.repeat_interleave(2, 1)).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    assert (out - dense).abs().max() > 1e-3
    same = ACT(profile=profile_path, heads=1.0, damp=1.0).postprocess(dense, q, k, v, ctx)
    assert torch.equal(same, dense)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
def test_every_policy_generates_on_every_family(arch, tmp_path):
    model, path = model_and_profile(arch, tmp_path)
    ids = torch.randint(1, 128, (1, 100))
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                               return_dict_in_generate=True)
        for spec in ["duo:ratio=0.5,window=16", "lserve:ratio=0.5,window=16,block=16", "razor:ratio=0.5,window=16",
                     "headkv:ratio=0.5,density=0.75,window=8", "act:heads=0.5", "ablate:top=0.25", "duo:ratio=1.0"]:
            name, _, rest = spec.partition(":")
            with longreach.apply(model, f"{name}:profile={path},{rest}"):
                out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                     return_dict_in_generate=True)
            assert out.sequences.shape == (1, 106)
            assert output_cache(out).get_seq_length() == 105
            if name in ("duo", "lserve", "razor", "headkv") and "1.0" not in rest:
                assert cache_bytes(output_cache(out)) < cache_bytes(output_cache(dense)), spec
        with longreach.apply(model, f"duo:profile={path},ratio=1.0"):
            full = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(full, dense.sequences), "duo with every head a retrieval head is dense"


def test_a_head_policy_and_a_press_are_not_stacked(profile_path):
    with pytest.raises(longreach.SpecError, match="cannot stack presses and head policies"):
        longreach.apply(tiny_model("llama"), f"duo:profile={profile_path}+snapkv:density=0.5")


@pytest.mark.parametrize("spec", ["razor:profile={p},ratio=0.5,window=16", "duo:profile={p},ratio=0.5,window=16",
                                  "headkv:profile={p},ratio=0.5,density=0.75"])
def test_plan_counts_what_head_policies_keep(spec, profile_path):
    """`longreach plan` reads the policy's own per-layer count: the bytes the cache really holds after a prompt."""
    from longreach.plan import plan_memory

    model = tiny_model("llama")
    spec = spec.format(p=profile_path)
    ids = torch.randint(1, 128, (1, 200))
    with torch.no_grad(), longreach.apply(model, spec):
        held = cache_bytes(output_cache(model(ids, use_cache=True)))
    planned = plan_memory(model, longreach.parse_spec(spec), 200, available=2**40)
    dense = plan_memory(model, longreach.parse_spec("dense"), 200, available=2**40)
    assert planned.kv_kept is not None and planned.kv_kept < dense.kv_cache
    assert abs(planned.kv_kept - held) <= 0.05 * held  # within the held-back token and a compensation token


def test_beam_edits_move_the_short_heads_and_their_compensation_token_with_the_long_ones(profile_path):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (2, 100))
    with torch.no_grad(), longreach.apply(model, f"razor:profile={profile_path},ratio=0.5,window=8"):
        cache = output_cache(model(ids, use_cache=True))
        layer = next(layer for layer in cache.layers if isinstance(layer, CompressedLayer) and layer.short is not None)
        before = [t.clone() for t in (layer.keys, layer.short.keys, layer.short.comp_keys)]
        layer.reorder_cache(torch.tensor([1, 0]))
        after = (layer.keys, layer.short.keys, layer.short.comp_keys)
        for old, new in zip(before, after, strict=True):
            assert torch.equal(new, old.flip(0)), "every part follows the beams"
        layer.batch_repeat_interleave(2)
        assert layer.short.keys.shape[0] == layer.short.comp_keys.shape[0] == layer.keys.shape[0] == 4
