"""KV-cache presses on tiny random models: exact budgets, kept sinks/window/order/positions, and decode after
compression equal to a dense run restricted to the kept keys."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import ARCHS, tiny_model
from oracles import pool_1d, snapkv_keep, snapkv_votes, top_keep_oracle

import longreach
from longreach import LongreachError, SpecError
from longreach.cache.compressed import CompressedLayer, cache_bytes
from longreach.cache.press import Observation, attention_received, top_keep, window_probs
from longreach.compat import cache_kwargs, output_cache
from longreach.methods.base import SelectionMethod
from longreach.methods.scoring import expand_kv
from longreach.selection import Selection

PRESSES = ["snapkv:budget=40,window=8", "pyramidkv:budget=40,window=8", "h2o:budget=40", "tova:budget=40",
           "streamingkv:budget=40", "finch:budget=40,window=8,chunk=20"]
T = 120


def full_layers(model, ids) -> list[torch.Tensor]:
    """Keys of every layer after a dense prefill through longreach (the same arithmetic a press prefill does)."""
    with torch.no_grad(), longreach.apply(model, "dense"):
        cache = output_cache(model(ids, use_cache=True))
    return [layer.keys for layer in cache.layers]


def kept_positions(stored: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Which positions of ``full`` (B, H, T, D) each stored key (B, H, n, D) is: (B, H, n)."""
    same = (stored[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)
    assert bool(same.any(-1).all()), "a stored key is not one of the prompt's keys"
    return same.float().argmax(-1)


def held_back(press) -> bool:
    """Whether the prompt's last token is still in the cache after a press (it attends as the first decode step:
    a press that evicts at every decode step evicts again then)."""
    return press.interval != 1


def press_of(spec: str):
    return longreach.parse_spec(spec).of_kind("press")[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", PRESSES)
def test_press_keeps_exactly_the_budget_with_sinks_window_and_order(arch, spec):
    """The prompt but its last token is pressed to the budget; the last token then attends the pressed cache as
    the first decode step would, and is kept (unless the press evicts at every decode step)."""
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (1, T))
    full = full_layers(model, ids[:, : T - 1])
    press = press_of(spec)
    with torch.no_grad(), longreach.apply(model, spec):
        cache = output_cache(model(ids, use_cache=True))
    assert cache.get_seq_length() == T, "the logical length (next token's position) must not shrink"
    n_layers, held = len(cache.layers), held_back(press)
    for i, layer in enumerate(cache.layers):
        if layer.is_sliding:  # Gemma 3's local layers keep their own window
            assert not isinstance(layer, CompressedLayer)
            continue
        pressed = layer.keys[:, :, :-1]  # the held-back token's key comes from compressed attention below it
        assert layer.keys.shape[2] == press.capacity(i, n_layers, T - 1 if held else T) + held
        pos = torch.cat([kept_positions(pressed, full[i]), torch.full_like(pressed[..., :1, 0], T - 1).long()], -1)
        assert bool((pos.diff(dim=-1) > 0).all()), "kept keys must stay in order"
        assert bool((pos[..., : press.sinks] == torch.arange(press.sinks)).all()), "sinks must be kept"
        recent = press.recent if spec.split(":")[0] != "h2o" else (40 - press.sinks) // 2
        span = recent + held  # the pressed prompt's window, then the held-back token
        if recent:
            assert bool((pos[..., -span:] == torch.arange(T - span, T)).all()), "the window must be kept"


class KeepOnly(SelectionMethod):
    """Reference for a decode step: the new query sees exactly the given positions (+ itself), per KV head; layers
    without an entry, and forwards of several tokens, attend densely."""

    name: ClassVar[str] = "keeponly"
    kept: ClassVar[dict[int, torch.Tensor]] = {}

    def select(self, q, k, ctx):
        if q.shape[2] > 1 or ctx.layer_idx not in self.kept:
            return Selection.dense(q.shape[0], q.shape[2], k.shape[2])
        idx = self.kept[ctx.layer_idx][:, :, None, :]
        return Selection(idx, 1, k.shape[2], 1, 1, sinks=0, window=1)


KeepOnly = dataclass(frozen=True)(KeepOnly)
NO_DECODE_EVICTION = [s if "h2o" not in s and "tova" not in s and "streamingkv" not in s else s + ",every=0"
                      for s in PRESSES] + ["snapkv:budget=40,window=8,pool=5,vote=max"]


def restricted_decode(model, ids: torch.Tensor, nxt: torch.Tensor, kept: dict[int, torch.Tensor]):
    """The reference: a dense prefill of all but the prompt's last token, then that token and ``nxt`` each attending
    exactly the ``kept`` positions per head (+ the held-back token, + itself). Returns (logits of ``nxt``, the
    reference cache's bytes after the prompt)."""
    with torch.no_grad(), longreach.apply(model, KeepOnly()):
        KeepOnly.kept = {}
        ref_cache = output_cache(model(ids[:, : T - 1], use_cache=True))
        KeepOnly.kept = kept
        ref_cache = output_cache(model(ids[:, T - 1:], **cache_kwargs(model, ref_cache), use_cache=True))
        prompt_bytes = cache_bytes(ref_cache)
        KeepOnly.kept = {i: torch.cat([pos, torch.full_like(pos[..., :1], T - 1)], -1) for i, pos in kept.items()}
        return model(nxt, **cache_kwargs(model, ref_cache), use_cache=True).logits, prompt_bytes


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("spec", NO_DECODE_EVICTION)
def test_decode_after_compression_matches_dense_restricted_to_kept_keys(arch, spec):
    """A pressed prompt, then a decode step, equals a dense prefill of all but the prompt's last token, then that
    token and the next each attending exactly the kept keys (+ the held-back token, + itself)."""
    model = tiny_model(arch)
    ids = torch.randint(1, 128, (1, T))
    nxt = torch.randint(1, 128, (1, 1))
    full = full_layers(model, ids[:, : T - 1])
    seen = {}
    with torch.no_grad(), longreach.apply(model, spec) as handle:
        handle.observer = lambda i, q, k, v, scale, sliding, *rest: sliding or seen.setdefault(i, (q, k, scale))
        cache = output_cache(model(ids, use_cache=True))
        handle.observer = None
        kept = {i: kept_positions(layer.keys[:, :, :-1], full[i]) for i, layer in enumerate(cache.layers)
                if not layer.is_sliding}
        bytes_after = cache_bytes(cache)
        ours = model(nxt, **cache_kwargs(model, cache), use_cache=True).logits
    if spec.split(":")[0] in ("snapkv", "pyramidkv"):  # the reference keeps what the SnapKV oracle says, not the cache
        press = press_of(spec)
        assert set(seen) == set(kept)
        for i, (q, k, scale) in seen.items():
            assert q.shape[2] == T - 1, "the press sees the prompt without its held-back last token"
            want = snapkv_keep(q[:, :, -press.recent:], k, scale, press.capacity(i, len(cache.layers), T - 1),
                               sinks=press.sinks, pool=press.pool, vote=press.vote)
            assert torch.equal(kept[i], want), f"layer {i} keeps other keys than the window votes for"
            kept[i] = want
    ref, bytes_full = restricted_decode(model, ids, nxt, kept)
    assert (ours - ref).abs().max().item() < 1e-4
    assert bytes_after < bytes_full


@pytest.mark.parametrize("spec", ["h2o:budget=40", "tova:budget=40", "streamingkv:budget=40",
                                  "snapkv:budget=40,window=8,every=4"])
def test_presses_that_evict_while_decoding_hold_the_cache_at_budget(spec):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, T))
    with torch.no_grad(), longreach.apply(model, spec):
        out = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             return_dict_in_generate=True)
    cache = output_cache(out)
    every = press_of(spec).interval
    lengths = {layer.keys.shape[2] for layer in cache.layers}
    # the last token is cached but not yet evicted; with every=4, up to 3 more wait for the next compression
    assert lengths <= set(range(40, 40 + every + 1))
    assert cache.get_seq_length() == T + 11
    assert out.sequences.shape[1] == T + 12


def test_density_budget_follows_the_tokens_seen_and_bytes_really_drop():
    model = tiny_model("qwen2")
    ids = torch.randint(1, 128, (1, 200))
    with torch.no_grad():
        dense_bytes = cache_bytes(output_cache(model(ids, use_cache=True)))
        with longreach.apply(model, "snapkv:density=0.25"):
            cache = output_cache(model(ids, use_cache=True))
    assert {layer.keys.shape[2] for layer in cache.layers} == {50}
    assert cache_bytes(cache) * 4 == dense_bytes


def test_pyramid_budgets_shrink_with_depth_and_average_to_the_flat_budget():
    press = press_of("pyramidkv:budget=1000,window=32")
    caps = [press.capacity(i, 24, 8000) for i in range(24)]
    assert all(a >= b for a, b in itertools.pairwise(caps)) and caps[0] > 2 * caps[-1]
    assert sum(caps) / len(caps) == pytest.approx(1000, abs=1)


def test_finch_spreads_its_budget_over_chunks():
    press = press_of("finch:budget=28,sinks=4,window=4,chunk=25")
    scores = torch.zeros(1, 2, 104)
    scores[..., :54] = 1.0  # the first half of the context scores higher everywhere

    class Fixed(type(press)):
        def scores(self, obs):
            return scores

    keys = torch.zeros(1, 2, 104, 8)
    idx = Fixed(budget=28, sinks=4, window=4, chunk=25).keep_indices(
        Observation(0, 1, 104, torch.zeros(1, 2, 4, 8), keys, keys, 1.0), 28)
    assert idx.shape == (1, 2, 28)
    per_chunk = torch.bincount((idx[0, 0, 4:-4] - 4) // 25, minlength=4)
    assert per_chunk.tolist() == [5, 5, 5, 5], "every chunk keeps its share, even low-scoring ones"


def test_top_keep_protects_sinks_and_window_and_sorts():
    scores = torch.tensor([[[0.0, 0.0, 9.0, 1.0, 8.0, 0.0, 0.0]]])
    assert top_keep(scores, 4, sinks=1, recent=1).tolist() == [[[0, 2, 4, 6]]]


def test_grouped_scores_equal_expanded_attention():
    q, k = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 30, 8)
    obs = Observation(0, 1, 30, q, k, k, 0.3)
    probs = window_probs(obs)  # (B, Hkv, G, w, n)
    logits = q @ expand_kv(k, 6).transpose(-1, -2) * 0.3
    future = torch.arange(30)[None, :] > (25 + torch.arange(5))[:, None]
    ref = logits.masked_fill(future, float("-inf")).softmax(-1)
    assert torch.allclose(probs.flatten(1, 2), ref, atol=1e-6)
    got = attention_received(q, k, 0.3)
    assert torch.allclose(got, ref.view(2, 2, 3, 5, 30).sum(dim=(2, 3)), atol=1e-5)


def test_bad_press_specs_and_padding_are_refused_before_work():
    with pytest.raises(SpecError, match=r"budget= .* or density="):
        longreach.parse_spec("snapkv")
    with pytest.raises(SpecError, match="smaller than the always-kept"):
        longreach.parse_spec("snapkv:budget=10,window=32")
    with pytest.raises(SpecError, match="vote must be sum or max"):
        longreach.parse_spec("snapkv:density=0.1,vote=mean")
    model = tiny_model("llama")
    with pytest.raises(SpecError, match="cannot stack presses"):
        longreach.apply(model, "snapkv:density=0.5+h2o:density=0.5")
    ids = torch.randint(1, 128, (2, 40))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad(), longreach.apply(model, "snapkv:density=0.5"), pytest.raises(
            longreach.InputError, match="unpadded"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("spec", ["snapkv:density=0.5", "kvquant:bits=4", "streamingkv:budget=16"])
def test_a_model_set_to_generate_with_a_static_cache_is_refused_in_apply(spec):
    """A cache policy works on a DynamicCache; a generation config asking for a static one would only fail at the
    first forward of generate(), so apply() refuses it, and a select method is still allowed."""
    model = tiny_model("llama")
    model.generation_config.cache_implementation = "static"
    with pytest.raises(longreach.UnsupportedModelError, match=r"'static' cache.*cache_implementation = None"):
        longreach.apply(model, spec)
    assert model.config._attn_implementation != "longreach"  # nothing was attached
    longreach.apply(model, "quest:density=0.5").remove()
    model.generation_config.cache_implementation = None
    longreach.apply(model, spec).remove()


def test_compressed_cache_refuses_use_after_the_handle_is_removed():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 80))
    with torch.no_grad():
        with longreach.apply(model, "snapkv:budget=40,window=8"):
            cache = output_cache(model(ids, use_cache=True))
        with pytest.raises(LongreachError, match="handle is removed"):
            model(ids[:, :1], **cache_kwargs(model, cache))


def test_press_stacks_after_a_select_method():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 160))
    with torch.no_grad(), longreach.apply(model, "quest:budget=64,block=16+snapkv:budget=60,window=8") as h:
        out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    # 60 pressed prompt keys, the held-back last prompt token, 5 generated tokens (the 6th is not cached yet)
    assert {layer.keys.shape[2] for layer in output_cache(out).layers} == {66}
    assert h.density("prefill") < 1.0


def test_the_runtime_holds_the_last_prompt_token_back_so_every_answer_token_reads_the_compressed_cache():
    from longreach.generation import generate

    model = tiny_model("llama")
    ids = {"input_ids": torch.randint(1, 128, (1, T)), "attention_mask": torch.ones(1, T, dtype=torch.long)}
    with torch.no_grad(), longreach.apply(model, "snapkv:budget=40,window=8"):
        run = generate(model, ids, 4, eos=set())
    per_token = 2 * 2 * 16 * 4 * 2  # K and V x KV heads x head_dim x fp32 bytes x layers
    assert run.prompt_kv_bytes == (40 + 1) * per_token  # the budget, then the held-back last prompt token
    assert len(run.tokens) == 4 and run.cache.get_seq_length() == T + 3


def test_every_zero_turns_decode_eviction_off():
    assert press_of("h2o:budget=40").interval == 1
    assert press_of("h2o:budget=40,every=0").interval == 0
    assert press_of("snapkv:budget=40,window=8").interval == 0


@pytest.mark.parametrize("spec", ["snapkv:budget=40,window=8", "pyramidkv:budget=40,window=8",
                                  "h2o:budget=40,every=0", "finch:budget=40,window=8,chunk=20"])
def test_a_press_on_latent_attention_drops_whole_tokens_and_decode_reads_only_those(spec):
    """DeepSeek-V3's cache holds one latent (and one rotary key part) per token for every head: a press keeps the
    same tokens for all heads, cuts both tensors at them, and the decode step equals dense attention restricted
    to those tokens (+ the held-back prompt token, + itself) in every head."""
    model = tiny_model("deepseek-v3")
    ids, nxt = torch.randint(1, 128, (1, T)), torch.randint(1, 128, (1, 1))
    with torch.no_grad(), longreach.apply(model, "dense"):
        dense = output_cache(model(ids[:, : T - 1], use_cache=True))
    heads = model.config.num_attention_heads
    seen = {}
    press = press_of(spec)
    with torch.no_grad(), longreach.apply(model, spec) as handle:
        handle.observer = lambda i, q, k, v, scale, *rest: seen.setdefault(i, (q, k, scale))
        cache = output_cache(model(ids, use_cache=True))
        handle.observer = None
        kept = {}
        for i, layer in enumerate(cache.layers):
            assert layer.keys.shape[1] == 1 and layer.keys.shape[2] == press.capacity(i, len(cache.layers), T - 1) + 1
            # a token is its latent and its rotary key part together (layer 0's latent alone repeats with the token)
            stored = torch.cat([layer.keys, layer.values], -1)[:, :, :-1]
            kept[i] = kept_positions(stored, torch.cat([dense.layers[i].keys, dense.layers[i].values], -1))
        bytes_after = cache_bytes(cache)
        ours = model(nxt, **cache_kwargs(model, cache), use_cache=True).logits
    if press.name == "snapkv":  # one choice for all heads: their pooled window votes averaged
        for i, (q, k, scale) in seen.items():
            assert k.shape[1] == heads, "the press scores the heads expanded from the latent"
            votes = snapkv_votes(q[:, :, -press.recent:], k, scale).mean(1, keepdim=True)
            want = top_keep_oracle(pool_1d(votes, press.pool), press.capacity(i, len(kept), T - 1), press.sinks,
                                   press.recent)
            assert torch.equal(kept[i], want), f"layer {i} keeps other tokens than the heads' averaged votes"
    ref, bytes_full = restricted_decode(model, ids, nxt, {i: pos.expand(-1, heads, -1) for i, pos in kept.items()})
    assert (ours - ref).abs().max().item() < 1e-4
    assert bytes_after < 0.5 * bytes_full


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("press", ["snapkv:density=0.3", "tova:density=0.3", "pyramidkv:density=0.3"])
def test_hold_false_is_snapkvs_order_the_prompt_dense_then_the_cache_shrunk(arch, press):
    """hold=false: every prompt row attends every key (all prefill logits are dense's, so the first answer token
    is), the cache is shrunk as much after the forward, and the next step reads it. The default holds the last
    row back, so the prompt's last logits already read the shrunk cache."""
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 96))
    with torch.no_grad():
        dense = model(ids, use_cache=True)
        step = ids[:, :1]
        dense_next = model(step, use_cache=True, **cache_kwargs(model, output_cache(dense))).logits
        runs = {}
        for hold in ("true", "false"):
            with longreach.apply(model, f"{press},hold={hold}"):
                out = model(ids, use_cache=True)
                stored = cache_bytes(output_cache(out))
                nxt = model(step, use_cache=True, **cache_kwargs(model, output_cache(out))).logits
            runs[hold] = out.logits, stored, nxt
    logits, stored, nxt = runs["false"]
    torch.testing.assert_close(logits, dense.logits, atol=1e-5, rtol=1e-5)  # the whole prompt, dense
    assert stored < 0.6 * cache_bytes(output_cache(dense))  # shrunk all the same
    assert float((nxt - dense_next).abs().max()) > 1e-4  # and the next token reads the shrunk cache
    held, held_bytes, _ = runs["true"]
    torch.testing.assert_close(held[:, :-1], dense.logits[:, :-1], atol=1e-5, rtol=1e-5)
    assert float((held[:, -1] - dense.logits[:, -1]).abs().max()) > 1e-4  # the held-back row read the shrunk cache
    assert held_bytes == stored
