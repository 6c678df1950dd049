"""HOMER (hierarchical context merging) against independent oracles: the dense model where the prompt fits one
chunk, eager attention probabilities for the token reduction, dense runs of each leaf chunk for the cache rows
every layer keeps, the whole merge tree done by hand from the model's own layers, and the memory plan worked out
by hand."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model

import longreach
from longreach.cache.growing import growing_cache
from longreach.compat import output_cache
from longreach.errors import InputError, SpecError, UnsupportedModelError
from longreach.kernels.gather import CHUNK_BYTES
from longreach.models import tiny_family
from longreach.plan import plan_memory
from longreach.procedure import Homer

# 200 tokens, chunks of 64 with an 8-token prefix and suffix: 48 context tokens per chunk -> 4 leaves of 46, two
# merge levels; 4 layers, warmup 1: leaves run layers 0-1, level 1 layer 2, the root layer 3
MULTI = Homer(chunk=64, prefix=8, suffix=8, warmup=1)
N = 200


def family_model(arch: str, **overrides):
    """The test suite's tiny Llama / Qwen2 / Mistral, or the conformance matrix's tiny model of another family
    homer drives (Qwen3 with its per-head query norm, the MoE families). Every norm's weight is drawn at random
    (they start at 1): a unit RMSNorm weight would hide a norm applied in the wrong place or the wrong norm."""
    model = tiny_model(arch, **overrides) if arch in ("llama", "qwen2", "mistral") else tiny_family(arch, **overrides)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):
                weight.copy_(torch.empty_like(weight).uniform_(0.5, 2.0, generator=gen))
    return model


def prefill(model, ids, method=MULTI):
    cache = growing_cache(model.config)
    return method.prefill(model, ids, cache), cache


def greedy_dense(model, ids, steps):
    """Greedy tokens by full forwards (no cache): the plain model's continuation."""
    out = ids
    for _ in range(steps):
        nxt = model(input_ids=out).logits[:, -1:].argmax(-1)
        out = torch.cat([out, nxt], dim=1)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "mixtral", "qwen3", "qwen3-moe"])
def test_one_chunk_is_the_dense_model(arch):
    """A prompt that fits one chunk is never merged or pruned: next-token logits and the greedy continuation equal
    the plain model's (fp32)."""
    model = family_model(arch)
    ids = torch.randint(1, 128, (1, 48))
    with torch.no_grad():
        dense = model(input_ids=ids).logits[0, -1]
        done, cache = prefill(model, ids, Homer(chunk=64, prefix=4, suffix=4))
        assert done.length == 48 and cache.get_seq_length() == 48
        assert done.positions.tolist() == list(range(48))
        assert (done.logits[0, -1] - dense).abs().max().item() <= 1e-4
        run = longreach.homer_generate(model, None, ids, 8, chunk=64, prefix=4, suffix=4)
        assert run.tokens == greedy_dense(model, ids, 8)


@pytest.mark.parametrize(("arch", "final"), [("llama", 1), ("llama", 3), ("qwen2", 1), ("qwen3", 1), ("mixtral", 1)])
def test_reduction_keeps_the_top_k_by_final_token_attention(arch, final):
    """Leaf 0's reduction keeps exactly the context tokens with the highest attention from the chunk's final
    token(s) (max over heads, mean over the final rows), from the eager model's own attention probabilities."""
    model = family_model(arch, num_hidden_layers=4)
    model.set_attn_implementation("eager")
    ids = torch.randint(1, 128, (1, N))
    method = Homer(chunk=64, prefix=8, suffix=8, warmup=1, final=final)
    plan = method.schedule(model, N)
    with torch.no_grad():
        done, _ = prefill(model, ids, method)
        first = next(r for r in done.trace if (r.level, r.index) == (0, 0))
        lo, hi = plan.bounds(0)
        rows = torch.cat([torch.arange(8), torch.arange(lo, hi), torch.arange(N - 8, N)])
        out = model(input_ids=ids[:, rows], position_ids=torch.tensor([plan.positions(0)]), output_attentions=True)
    assert first.layer == plan.span(0)[1] - 1 == 1
    probs = out.attentions[first.layer][0, :, -final:, :]  # (Hq, final, T)
    significance = probs.mean(dim=1).amax(dim=0)
    torch.testing.assert_close(first.scores, significance, atol=1e-6, rtol=1e-5)
    context = significance[8:8 + hi - lo]
    budget = plan.budget(0, 0)
    ranked = context.sort(descending=True).values
    assert ranked[budget - 1] - ranked[budget] > 1e-6, "a tie at the cut would make the oracle ambiguous"
    expected = rows[8 + context.topk(budget).indices].sort().values
    assert first.kept.tolist() == expected.tolist()
    assert len(first.kept) == budget == 24


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3-moe"])
def test_attention_logits_of_any_rows_give_the_eager_probabilities(arch):
    """The logits the calibration ranks by, for rows anywhere in a chunk, softmax to the eager model's own
    attention probabilities of those rows (a wrong scale, rotation, row, mask or, on Qwen3, a missing query norm
    would change them)."""
    from longreach.procedure.decoder import Decoder

    model = family_model(arch, num_hidden_layers=3)
    model.set_attn_implementation("eager")
    ids = torch.randint(1, 128, (1, 40))
    rows = torch.tensor([0, 7, 20, 39])
    decoder, positions = Decoder(model), torch.arange(40)
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=True)
        cache = output_cache(out)
        for i in range(3):
            hidden_in = out.hidden_states[i]
            logits = decoder.attention_logits(i, hidden_in, cache.layers[i].keys, decoder.rope(hidden_in, positions),
                                              rows)
            torch.testing.assert_close(logits.softmax(-1), out.attentions[i][0][:, rows], atol=1e-6, rtol=1e-5)
            assert torch.isinf(logits[:, 1, 8:]).all() and torch.isfinite(logits[:, 1, :8]).all()


def test_distance_bias_removes_a_pure_distance_trend_and_leaves_the_needle():
    """Hand-built logits: every row attends a key by its distance alone (a recency trend, constant within a
    calibration bin), and the final row also attends one far key (the needle) 0.5 more. Uncalibrated, the top
    keys are the nearest; calibrated, the needle is on top and every other key scores 0."""
    from longreach.procedure.homer import distance_bias, distance_bin, sample_rows

    t = 300
    positions = torch.arange(t)
    trend = lambda d: 5.0 - distance_bin(d).double()  # noqa: E731 -- decreasing with the bin
    rows = sample_rows(t)
    assert rows[-1] == t - 1 and len(rows) == 256
    d = positions[rows][:, None] - positions[None, :]
    sampled = trend(d.clamp(min=0)).masked_fill(d < 0, float("-inf"))
    final = trend(t - 1 - positions)
    final[10] += 0.5  # the needle
    # the final row is one of the sampled rows, with the needle in it: its bin's mean moves by 0.5 / (pairs)
    sampled[-1, 10] += 0.5
    bias = distance_bias(sampled, rows, positions, torch.zeros(t, dtype=torch.long), t - 1)
    calibrated = final - bias
    assert final.topk(3).indices.tolist() == [299, 298, 297]
    assert calibrated.argmax().item() == 10
    same_bin = distance_bin(torch.tensor(t - 1 - 10))
    pairs = int((distance_bin(d.clamp(min=0))[d >= 0] == same_bin).sum())
    assert calibrated[10].item() == pytest.approx(0.5 - 0.5 / pairs)
    others = torch.ones(t, dtype=torch.bool)
    others[10] = False
    in_needle_bin = distance_bin(t - 1 - positions) == same_bin
    assert calibrated[others & ~in_needle_bin].abs().max().item() < 1e-9
    assert calibrated[others & in_needle_bin].abs().max().item() == pytest.approx(0.5 / pairs)


def test_distance_bins_by_hand():
    """floor(4 log2(d + 1)), worked out by hand: one bin per distance up to 6, then about four per octave."""
    from longreach.procedure.homer import distance_bin

    d = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 22, 23, 1000])
    assert distance_bin(d).tolist() == [0, 4, 6, 8, 9, 10, 11, 12, 12, 16, 16, 18, 18, 39]


def test_calibration_in_a_merged_chunk_counts_only_pairs_within_one_leaf(monkeypatch):
    """At a merge level the chunk holds two leaves' kept tokens at overlapping positions. The bias is recomputed
    pair by pair from the arguments the run passed, with each row's leaf worked out here from its prompt index
    (prefix and suffix rows shared), and the reduction's scores are the final row's logits minus it."""
    import longreach.procedure.homer as homer

    calls = []
    real = homer.distance_bias

    def spy(logits, rows, positions, leaves, final_position):
        calls.append((logits, rows, positions, leaves, final_position))
        return real(logits, rows, positions, leaves, final_position)

    monkeypatch.setattr(homer, "distance_bias", spy)
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(1, 128, (1, N))
    method = replace(MULTI, calibrate=1)
    plan = method.schedule(model, N)
    with torch.no_grad():
        done, _ = prefill(model, ids, method)
    merged = [k for k, r in enumerate(done.trace) if r.level == 1]
    assert len(calls) == len(done.trace) == 6 and merged
    k = merged[0]
    logits, rows, positions, leaves, final_position = calls[k]
    r = done.trace[k]
    kept = {(x.level, x.index): x.kept.tolist() for x in done.trace}
    tokens = (list(range(8)) + kept[(0, 2 * r.index)] + kept[(0, 2 * r.index + 1)] + list(range(N - 8, N)))
    bounds = [plan.bounds(leaf) for leaf in range(plan.leaves)]
    want_leaves = [-1 if t < 8 or t >= N - 8 else next(i for i, (lo, hi) in enumerate(bounds) if lo <= t < hi)
                   for t in tokens]
    assert leaves.tolist() == want_leaves and len(set(want_leaves) - {-1}) == 2
    assert (positions - positions[0]).tolist() == plan_positions(plan, tokens)  # up to the shift all share
    bias, skipped = bias_by_pairs(logits, rows, positions, int(final_position), lambda row, key: (
        want_leaves[row] == want_leaves[key] or -1 in (want_leaves[row], want_leaves[key])))
    assert skipped > 0, "no cross-leaf pair: the test would not see the rule"
    torch.testing.assert_close(r.scores, logits[-1] - bias, atol=1e-4, rtol=1e-4)


def bias_by_pairs(logits, rows, positions, final_position: int, counted=lambda row, key: True):
    """The calibration's bias recomputed pair by pair: for each key, the mean logit over the sampled (row, key)
    pairs that ``counted`` admits, at a distance >= 0, whose distance falls in the bin of the key's distance from
    ``final_position``. Returns (bias per key, float32; how many causal pairs were left out)."""
    from longreach.procedure.homer import distance_bin

    sums, counts, skipped = {}, {}, 0
    for a, row in enumerate(rows.tolist()):
        for key in range(row + 1):
            dist = int(positions[row] - positions[key])
            if not counted(row, key) or dist < 0:
                skipped += 1
                continue
            b = int(distance_bin(torch.tensor(dist)))
            sums[b] = sums.get(b, 0.0) + float(logits[a, key])
            counts[b] = counts.get(b, 0) + 1
    bins = distance_bin(final_position - positions).tolist()
    return torch.tensor([sums[b] / counts[b] for b in bins], dtype=torch.float32), skipped


def plan_positions(plan, tokens) -> list[int]:
    """Leaf-layout positions of prompt indices: prefix 0.., each leaf's context from the prefix on, the suffix
    after the longest leaf context (docs/homer.md, Positions)."""
    out = []
    longest = max(hi - lo for lo, hi in (plan.bounds(i) for i in range(plan.leaves)))
    for t in tokens:
        if t < 8:
            out.append(t)
        elif t >= N - 8:
            out.append(8 + longest + t - (N - 8))
        else:
            lo = next(lo for lo, hi in (plan.bounds(i) for i in range(plan.leaves)) if lo <= t < hi)
            out.append(8 + t - lo)
    return out


def test_calibrated_reduction_keeps_the_top_k_by_logit_minus_the_distance_mean():
    """Leaf 0 with calibrate=1: the scores are the final token's logits (max over heads) minus the mean logit of
    the sampled rows at the same distance bin, recomputed here pair by pair, and the kept tokens their top k."""
    from longreach.procedure.decoder import Decoder
    from longreach.procedure.homer import sample_rows

    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(1, 128, (1, N))
    method = Homer(chunk=64, prefix=8, suffix=8, warmup=1, calibrate=1)
    plan = method.schedule(model, N)
    decoder = Decoder(model)
    lo, hi = plan.bounds(0)
    rows = torch.cat([torch.arange(8), torch.arange(lo, hi), torch.arange(N - 8, N)])
    positions = torch.tensor(plan.positions(0))
    with torch.no_grad():
        done, _ = prefill(model, ids, method)
        out = model(input_ids=ids[:, rows], position_ids=positions[None], output_hidden_states=True, use_cache=True)
        layer = plan.span(0)[1] - 1
        hidden_in = out.hidden_states[layer]
        keys, rope = output_cache(out).layers[layer].keys, decoder.rope(hidden_in, positions)
        t = len(rows)
        sampled = sample_rows(t)
        logits = decoder.attention_logits(layer, hidden_in, keys, rope, sampled).amax(dim=0)
        final = decoder.attention_logits(layer, hidden_in, keys, rope, torch.tensor([t - 1]))[:, 0].amax(dim=0)
    bias, skipped = bias_by_pairs(logits, sampled, positions, int(positions[-1]))
    assert skipped == 0  # one leaf: every causal pair is at a distance >= 0
    want = final - bias
    first = next(r for r in done.trace if (r.level, r.index) == (0, 0))
    torch.testing.assert_close(first.scores, want, atol=1e-4, rtol=1e-4)
    context = want[8:8 + hi - lo]
    budget = plan.budget(0, 0)
    assert first.kept.tolist() == rows[8 + context.topk(budget).indices].sort().values.tolist()
    assert first.kept.tolist() != next(r for r in prefill(model, ids)[0].trace if (r.level, r.index) == (0, 0)
                                       ).kept.tolist(), "calibration changed nothing: the test would not see it"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_merged_cache_positions_and_rows_in_every_layer(arch):
    """Positions stay inside the chunk (so inside the trained window); the cache has the planned length in every
    layer; and each layer's rows are the same kept tokens (propagative refinement): in the layers the leaves run,
    every cached row equals that token's row in a dense run of its leaf chunk (the shared suffix rows: the mean
    over leaves, as merging averages them)."""
    model = family_model(arch, num_hidden_layers=4)
    ids = torch.randint(1, 128, (1, N))
    plan = MULTI.schedule(model, N)
    with torch.no_grad():
        done, cache = prefill(model, ids)
        leaves = []
        for leaf in range(plan.leaves):
            lo, hi = plan.bounds(leaf)
            rows = torch.cat([torch.arange(8), torch.arange(lo, hi), torch.arange(N - 8, N)])
            out = model(input_ids=ids[:, rows], position_ids=torch.tensor([plan.positions(leaf)]), use_cache=True)
            leaves.append((rows, output_cache(out)))
    assert plan.leaves == 4 and plan.height == 2
    assert done.length == plan.final_length == 64 == MULTI.chunk
    assert int(done.positions.min()) >= 0 and int(done.positions.max()) == plan.final_length - 1
    assert int(done.positions.max()) < model.config.max_position_embeddings
    lengths = {layer.keys.shape[2] for layer in cache.layers}
    assert lengths == {plan.final_length} and len(cache.layers) == 4
    tokens = done.tokens.tolist()
    assert tokens[:8] == list(range(8)) and tokens[-8:] == list(range(N - 8, N))
    assert tokens[8:-8] == sorted(tokens[8:-8]) and len(set(tokens[8:-8])) == 48
    for layer in range(plan.span(0)[1]):  # the layers the leaves run
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]
        for r, token in enumerate(tokens):
            if r >= plan.final_length - 8:  # a suffix row: the mean over the leaves of the same suffix row
                back = plan.final_length - r
                want_k = torch.stack([c.layers[layer].keys[0, :, len(rows) - back] for rows, c in leaves]).mean(0)
                want_v = torch.stack([c.layers[layer].values[0, :, len(rows) - back] for rows, c in leaves]).mean(0)
            else:  # prefix and context rows: the row of the (first) leaf holding the token
                rows, c = next((rows, c) for rows, c in leaves if token in rows.tolist())
                j = rows.tolist().index(token)
                want_k, want_v = c.layers[layer].keys[0, :, j, :], c.layers[layer].values[0, :, j, :]
            torch.testing.assert_close(keys[:, r, :], want_k, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(values[:, r, :], want_v, atol=1e-5, rtol=1e-4)


def _eager_layer(model, i, hidden, positions):
    """Decoder layer ``i`` of the model itself on rows ``hidden`` (1, T, H) at ``positions`` (T,), causal, eager:
    (hidden out, keys, values, attention probabilities (Hq, T, T)), the keys and values read back from a
    transformers cache the layer wrote, the probabilities from the attention module's own return value."""
    from transformers import DynamicCache

    t = hidden.shape[1]
    mask = torch.full((t, t), torch.finfo(hidden.dtype).min).triu(1)[None, None]
    cache, probs = DynamicCache(config=model.config), []
    layer = model.model.layers[i]
    hook = layer.self_attn.register_forward_hook(lambda module, args, out: probs.append(out[1]))
    try:
        out = layer(hidden, attention_mask=mask, position_ids=positions[None], cache=cache, use_cache=True,
                    position_embeddings=model.model.rotary_emb(hidden, position_ids=positions[None]))
    finally:
        hook.remove()
    out = out[0] if isinstance(out, tuple) else out
    return out, cache.layers[i].keys, cache.layers[i].values, probs[0][0]


def _homer_by_hand(model, ids, method, trace):
    """HOMER as the paper describes it, from the model's own forwards: dense runs of each leaf chunk for its
    layers, the model's decoder layers on each merged chunk, the merge rule (prefix and suffix averaged, contexts
    concatenated) and the reduction rule (top ``budget`` context rows by the final token's attention, max over
    heads) written out here; each node's kept tokens must be the ones this oracle ranks highest. Returns the root:
    hidden, positions, prompt index per row, and per layer the cached keys and values."""
    plan = method.schedule(model, ids.shape[1])
    head, tail = plan.head, plan.tail
    kept_by = {(r.level, r.index): r.kept.tolist() for r in trace}

    def node(level, index):
        start, stop = plan.span(level)
        if level == 0:
            lo, hi = plan.bounds(index)
            tokens = torch.cat([torch.arange(head), torch.arange(lo, hi), torch.arange(ids.shape[1] - tail,
                                                                                          ids.shape[1])])
            positions = torch.tensor(plan.positions(index))
            out = model(input_ids=ids[:, tokens], position_ids=positions[None], use_cache=True,
                        output_hidden_states=True, output_attentions=True)
            hidden, cache = out.hidden_states[stop], output_cache(out)
            kv = [(cache.layers[i].keys, cache.layers[i].values) for i in range(stop)]
            probs = out.attentions[stop - 1][0]
        else:
            left, right = node(level - 1, 2 * index), node(level - 1, 2 * index + 1)

            def join(a, b, dim, average):
                ta, tb = a.shape[dim], b.shape[dim]
                ends = [(a.narrow(dim, 0, head), b.narrow(dim, 0, head)),
                        (a.narrow(dim, ta - tail, tail), b.narrow(dim, tb - tail, tail))]
                (pa, pb), (sa, sb) = ends
                prefix, suffix = ((pa + pb) / 2, (sa + sb) / 2) if average else (pa, sa)
                return torch.cat([prefix, a.narrow(dim, head, ta - head - tail), b.narrow(dim, head, tb - head - tail),
                                  suffix], dim=dim)

            hidden = join(left["hidden"], right["hidden"], 1, True)
            positions, tokens = join(left["positions"], right["positions"], 0, False), join(left["tokens"],
                                                                                           right["tokens"], 0, False)
            kv = [(join(lk, rk, 2, True), join(lv, rv, 2, True)) for (lk, lv), (rk, rv) in zip(left["kv"], right["kv"],
                                                                                             strict=True)]
            for i in range(start, stop):
                hidden, k, v, probs = _eager_layer(model, i, hidden, positions)
                kv.append((k, v))
        t = hidden.shape[1]
        if (level, index) in kept_by:
            significance = probs[:, -1].amax(dim=0)[head:t - tail]  # the final row, max over heads
            budget = plan.budget(level, index)
            ranked = significance.sort(descending=True).values
            assert ranked[budget - 1] - ranked[budget] > 1e-6, "a tie at the cut would make the oracle ambiguous"
            best = significance.topk(budget).indices.sort().values + head
            assert kept_by[level, index] == tokens[best].tolist(), f"node {(level, index)} kept other tokens"
            keep = torch.cat([torch.arange(head), best, torch.arange(t - tail, t)])
            hidden, positions, tokens = hidden[:, keep], positions[keep], tokens[keep]
            kv = [(k[:, :, keep], v[:, :, keep]) for k, v in kv]
        return {"hidden": hidden, "positions": positions, "tokens": tokens, "kv": kv}

    return node(plan.height, 0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_whole_tree_against_a_by_hand_homer_from_the_models_own_layers(arch):
    """Every level, not only the leaves: each node's kept tokens, and the final cache of every layer (the merged
    levels' layers included), its positions, tokens and next-token logits equal HOMER done by hand from the model's
    own forwards and decoder layers (eager attention, so the reductions rank by the model's own probabilities)."""
    model = family_model(arch, num_hidden_layers=4)
    model.set_attn_implementation("eager")
    ids = torch.randint(1, 128, (1, N))
    with torch.no_grad():
        done, cache = prefill(model, ids)
        levels = {r.level for r in done.trace}
        # leaves and level 1 reduce; the root's two 24-token contexts fit the final 48 unpruned
        assert levels == {0, 1}, "the merged level must reduce, or its reduction goes unchecked"
        root = _homer_by_hand(model, ids, MULTI, done.trace)
        logits = model.lm_head(model.model.norm(root["hidden"][:, -1:]))
    assert done.tokens.tolist() == root["tokens"].tolist() and done.positions.tolist() == root["positions"].tolist()
    assert len(cache.layers) == len(root["kv"]) == 4
    for layer, (keys, values) in zip(cache.layers, root["kv"], strict=True):
        torch.testing.assert_close(layer.keys, keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.values, values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(done.logits[0, -1], logits[0, -1], atol=1e-4, rtol=1e-4)


def test_plan_matches_the_hand_computed_memory():
    """plan_memory for homer on a tiny config, worked out by hand from the schedule (fp32, 2 KV heads of 16 dims:
    256 bytes per token and layer)."""
    model = tiny_model("llama", num_hidden_layers=4)
    got = plan_memory(model, longreach.parse_spec(str(MULTI)), N, available=1 << 40)
    per_token = 2 * 2 * 16 * 4
    # depth-first walk (token-layers): leaves are 8 + 46 + 8 = 62 rows over layers 0-1 (62 x 2 = 124 while one
    # runs) and keep 24 context tokens (40 rows: 80); a level-1 node merges two of them into 8 + 48 + 8 = 64 rows
    # over layers 0-2 (192) and keeps 24 again (40 x 3 = 120). The worst moment is the last leaf running while
    # the first level-1 node (120) and its sibling's first leaf (80) wait: 120 + 80 + 124 = 324.
    assert got.kv_cache == 324 * per_token
    assert got.kv_kept == 64 * 4 * per_token  # the final cache: one chunk in each of the 4 layers
    assert got.chunk == 64  # the longest forward: a merged chunk
    # one forward of 64 rows (hidden 64, MLP 128, 4 q + 2 k + 2 v heads of 16), a row of logits, the kernel's
    # working set, the 40 + 40 waiting rows' hidden states and the final token's attention row per head
    forward = 64 * (4 * 64 + 3 * 128) * 4 + 64 * (4 + 2 * 2) * 16 * 4 + 128 * 4
    assert got.activations == forward + CHUNK_BYTES + (40 + 40) * 64 * 4 + 4 * 64 * 4
    done, _ = prefill(model, torch.randint(1, 128, (1, N)))
    assert done.length * 4 * per_token == got.kv_kept
    # calibrated: the logits of every row of the longest chunk (64 <= 256 sampled rows) per head, besides the final's
    calibrated = plan_memory(model, longreach.parse_spec(str(replace(MULTI, calibrate=1))), N, available=1 << 40)
    assert calibrated.activations - got.activations == 4 * 64 * 64 * 4


def test_generate_under_apply_runs_homer_and_refuses_the_dense_prefill():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = {"input_ids": torch.randint(1, 128, (1, N)), "attention_mask": torch.ones(1, N, dtype=torch.long)}
    seen = []  # the positions every forward's rotary embedding is given
    hook = model.model.rotary_emb.register_forward_hook(
        lambda mod, args, kwargs, out: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"])[0].tolist()),
        with_kwargs=True)
    with torch.no_grad():
        done, _ = prefill(model, ids["input_ids"])
        seen.clear()
        with longreach.apply(model, MULTI):
            run = longreach.generate(model, ids, 4)
            with pytest.raises(InputError, match="replaces the prefill"):
                model.generate(**ids, max_new_tokens=2)
            model(input_ids=ids["input_ids"][:, :32])  # a prompt inside one chunk is the model's own prefill
    assert run.tokens[0] == int(done.logits[0, -1].argmax())
    hook.remove()
    assert run.cache.get_seq_length() == 64 + 3  # the merged chunk, then the decoded tokens
    # each decode step continues from the merged chunk's length (64), not from the prompt's (200)
    assert done.length == 64 and [p for p in seen if len(p) == 1][-3:] == [[64], [65], [66]]
    assert run.prompt_kv_bytes == 64 * 4 * 2 * 2 * 16 * 4


def test_homer_with_yarn_is_homer_on_the_model_transformers_builds_with_yarn():
    """``homer+yarn``: every forward of the merge tree and of decode uses YaRN's rotary tables. Oracle: plain HOMER
    on a twin that transformers builds from YaRN's rope parameters written out by hand (its own YaRN code), with
    the same weights. Both entry points (the spec under ``apply``, and ``homer_generate(position=...)``) give the
    twin's prefill logits, greedy tokens and final cache (decoded tokens' keys included); YaRN must move the logits
    and the cached keys, or the check proves nothing."""
    trained = 64
    model = family_model("llama", num_hidden_layers=4, max_position_embeddings=trained)
    config = copy.deepcopy(model.config)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": model.config.rope_parameters["rope_theta"],
                              "factor": 2.0, "original_max_position_embeddings": trained, "beta_fast": 32.0,
                              "beta_slow": 1.0}
    twin = type(model)(config).eval()
    twin.load_state_dict(model.state_dict())
    ids = torch.randint(1, 128, (1, N))
    params = {"chunk": 64, "prefix": 8, "suffix": 8, "warmup": 1}
    with torch.no_grad():
        want, _ = prefill(twin, ids)
        plain, _ = prefill(model, ids)
        oracle = longreach.homer_generate(twin, None, ids, 6, **params)
        plain_run = longreach.homer_generate(model, None, ids, 6, **params)
        with longreach.apply(model, "yarn:factor=2"):
            got, _ = prefill(model, ids)
        with longreach.apply(model, f"{MULTI}+yarn:factor=2"):
            run = longreach.generate(model, ids, 6)
        stacked = longreach.homer_generate(model, None, ids, 6, position="yarn:factor=2", **params)
    assert (want.logits[0, -1] - plain.logits[0, -1]).abs().max().item() > 1e-3, "YaRN left the logits as they were"
    torch.testing.assert_close(got.logits[0, -1], want.logits[0, -1], atol=1e-4, rtol=1e-4)
    assert got.tokens.tolist() == want.tokens.tolist()
    assert run.tokens == stacked.tokens == oracle.tokens
    last = oracle.cache.layers[-1].keys
    assert (plain_run.cache.layers[-1].keys - last).abs().max().item() > 1e-3, "YaRN left the cached keys as they were"
    for got_run in (run, stacked):
        assert got_run.cache.get_seq_length() == oracle.cache.get_seq_length() == 64 + 5
        for mine, theirs in zip(got_run.cache.layers, oracle.cache.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-4)
    assert model.config.rope_parameters["rope_type"] == "default"  # the model's own config is untouched


def test_specs_and_refusals():
    spec = longreach.parse_spec("homer:chunk=4k,prefix=32")
    assert str(spec) == "homer:chunk=4096,prefix=32" and spec.methods[0].kind == "procedure"
    assert str(longreach.parse_spec("homer+yarn:factor=4")) == "yarn:factor=4.0+homer"  # positions go first
    with pytest.raises(SpecError, match="combine it only with a position method"):
        longreach.parse_spec("homer+quest:density=0.1")
    with pytest.raises(SpecError, match="no room"):
        Homer(chunk=16, prefix=8, suffix=8)
    with pytest.raises(SpecError, match="calibrate is 0"):
        Homer(calibrate=2)
    with pytest.raises(SpecError, match="use a rope scaling"):  # refused when parsed: before any sweep runs
        longreach.parse_spec("selfextend+homer")
    with pytest.raises(UnsupportedModelError,
                       match=r"supported: llama, mistral, mixtral, qwen2, qwen3, qwen3_moe .* use a position method"):
        longreach.apply(tiny_model("gemma3"), "homer")
    model = tiny_model("llama")  # 2 layers, warmup 1: one layer to merge in, not enough for two merge levels
    with pytest.raises(InputError, match="merge levels"):
        prefill(model, torch.randint(1, 128, (1, N)))
    from longreach.eval.runner import make_sweep

    with pytest.raises(InputError, match="perplexity"):
        make_sweep("m", "ppl", "dense;homer", "4k")
