"""kvquant (KIVI-style quantized KV cache): quantization arithmetic against hand-computed bounds, the cache layer
against the tensors it was given, byte counts by hand, stacking with snapkv, and generation on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHS, decode_logits, tiny_model

import longreach
from longreach.cache.compressed import CompressedLayer, cache_bytes
from longreach.cache.quant import pack_int4, quantize, unpack_int4
from longreach.cache.quantized import QuantizedLayer
from longreach.compat import cache_kwargs, output_cache
from longreach.errors import LongreachError, SpecError


def group_bounds(x: torch.Tensor, bits: int, group: int, axis: int) -> torch.Tensor:
    """Oracle: per element, half the step of its group's grid, (max - min) / (2**bits - 1) / 2, with groups of
    ``group`` consecutive elements along ``axis`` (the last one shorter), computed group by group."""
    bound = torch.empty_like(x)
    n = x.shape[axis]
    for lo in range(0, n, group):
        part = x.narrow(axis, lo, min(group, n - lo))
        step = (part.amax(dim=axis, keepdim=True) - part.amin(dim=axis, keepdim=True)) / (2**bits - 1)
        bound.narrow(axis, lo, part.shape[axis]).copy_((step / 2).expand_as(part))
    return bound


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention of every query over every key, K/V heads repeated for GQA: (B, Hq, Tq, D)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


# -- quantization arithmetic -----------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("axis", [-2, -1])
@pytest.mark.parametrize(("n", "dim", "group"), [(37, 16, 8), (64, 10, 32), (5, 9, 4), (33, 16, 64)])
def test_round_trip_error_is_at_most_half_a_step_of_each_group(bits, axis, n, dim, group):
    x = torch.randn(2, 3, n, dim) * torch.linspace(0.1, 4, dim)  # channels of different ranges, as keys have
    q = quantize(x, bits, group, axis)
    err = (q.dequantize() - x).abs()
    bound = group_bounds(x, bits, group, axis)
    assert bool((err <= bound * (1 + 1e-5) + 1e-6).all()), float((err - bound).max())
    assert float(err.max()) > 0.1 * float(bound.max())  # really quantized, not passed through
    per_group = math.ceil(x.shape[axis] / group)  # statistics: one per group and per element of the other axis
    assert q.scale.shape == ((2, 3, per_group, dim) if axis == -2 else (2, 3, n, per_group))
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (2, 3, n, dim if bits == 8 else (dim + 1) // 2)


def test_a_constant_group_comes_back_exactly():
    x = torch.full((1, 1, 8, 4), 3.25)
    assert torch.equal(quantize(x, 4, 8, -2).dequantize(), x)


def test_int4_packing_round_trips_every_code_and_packs_two_per_byte():
    codes = torch.randint(0, 16, (2, 3, 7, 11), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 7, 6)
    assert torch.equal(unpack_int4(packed, 11), codes)
    # low nibble first: codes (1, 2) -> 0x21, an odd tail (15) -> 0x0F
    assert pack_int4(torch.tensor([1, 2, 15], dtype=torch.uint8)).tolist() == [0x21, 0x0F]
    assert unpack_int4(torch.tensor([0x21, 0x0F], dtype=torch.uint8), 3).tolist() == [1, 2, 15]


# -- the cache layer ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_layer_keeps_the_residual_exact_and_the_rest_within_its_groups_bound_while_decoding(bits):
    """Tokens arrive as a prompt then one by one; after each update the layer returns every token: the last
    ``residual`` exactly, the others within half a step of their group (groups of ``group`` tokens per channel
    for keys, of ``group`` channels per token for values, counted from the first token)."""
    group, residual, dim = 8, 5, 12
    k, v = torch.randn(1, 2, 70, dim), torch.randn(1, 2, 70, dim)
    layer = QuantizedLayer(k[:, :, :30], v[:, :, :30], 30, bits, group, residual)
    for t in range(30, 70):
        keys, values = layer.update(k[:, :, t:t + 1], v[:, :, t:t + 1])
        n = t + 1
        assert layer.get_seq_length() == n == keys.shape[2]
        assert layer.quantized_tokens % group == 0 and residual + 1 <= layer.residual_tokens <= residual + group
        assert torch.equal(keys[:, :, -residual:], k[:, :, n - residual:n])
        assert torch.equal(values[:, :, -residual:], v[:, :, n - residual:n])
        nq = layer.quantized_tokens
        key_bound = group_bounds(k[:, :, :nq], bits, group, -2)
        value_bound = group_bounds(v[:, :, :nq], bits, group, -1)
        assert bool(((keys[:, :, :nq] - k[:, :, :nq]).abs() <= key_bound + 1e-6).all())
        assert bool(((values[:, :, :nq] - v[:, :, :nq]).abs() <= value_bound + 1e-6).all())
    assert layer.quantized_tokens >= 56  # most of the 70 tokens are held quantized


def test_attention_error_from_the_quantized_cache_shrinks_with_bits():
    """GQA: 8 query heads read 2 KV heads; the output over the cache's keys against the output over the originals."""
    q = torch.randn(2, 8, 4, 32)
    k, v = torch.randn(2, 2, 300, 32), torch.randn(2, 2, 300, 32)
    dense = attention(q, k, v)
    errors = {}
    for bits in (8, 4):
        keys, values = QuantizedLayer(k, v, 300, bits, group=32, residual=16).dequantized()
        errors[bits] = float((attention(q, keys, values) - dense).abs().max())
    assert 0 < errors[8] < errors[4] / 8, errors  # one more bit halves the step: 4 more bits ~ 16x


def hand_bytes(b: int, h: int, n: int, dim: int, bits: int, group: int, residual: int, width: int) -> int:
    """Bytes by the formula of docs/kvquant.md: whole groups of the oldest tokens beyond ``residual`` are codes
    (``bits`` per element) plus a scale and a zero point per group (keys: per channel and group of tokens;
    values: per token and group of channels); the rest are full-precision keys and values."""
    nq = max(0, (n - residual) // group * group)
    codes = 2 * b * h * nq * math.ceil(dim * bits / 8)
    stats = 2 * b * h * (nq // group) * dim * width + 2 * b * h * nq * math.ceil(dim / group) * width
    return codes + stats + 2 * b * h * (n - nq) * dim * width


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("n", "dim", "group", "residual"), [(1000, 128, 32, 128), (301, 48, 32, 7), (20, 16, 32, 0)])
def test_stored_bytes_are_the_hand_computed_count(bits, n, dim, group, residual):
    k, v = torch.randn(1, 2, n, dim), torch.randn(1, 2, n, dim)
    layer = QuantizedLayer(k, v, n, bits, group, residual)
    assert layer.nbytes == hand_bytes(1, 2, n, dim, bits, group, residual, 4)
    # e.g. 1000 tokens, int4: 2*2*864*64 codes + 2*2*27*128*4 + 2*2*864*4*4 statistics + 2*2*136*128*4 residual
    if (n, dim, bits) == (1000, 128, 4):
        assert layer.nbytes == 221184 + 55296 + 55296 + 278528


@pytest.mark.parametrize(("bits", "ideal"), [(8, 1 / 4), (4, 1 / 8)])
def test_a_long_cache_takes_about_a_quarter_or_an_eighth_of_fp32(bits, ideal):
    """Codes are 1/4 (int8) or 1/8 (int4) of fp32; fp32 scales and zero points per 128 elements add 1/64, the
    32..159-token residual under 2%."""
    k, v = torch.randn(1, 1, 8192, 128), torch.randn(1, 1, 8192, 128)
    layer = QuantizedLayer(k, v, 8192, bits, group=128, residual=32)
    ratio = layer.nbytes / (k.numel() * 4 * 2)
    assert ideal < ratio < ideal + 1 / 64 + 0.02, ratio


def test_truncate_gives_back_the_newest_tokens_and_mask_sizes_follow_what_is_stored():
    k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    layer = QuantizedLayer(k[:, :, :20], v[:, :, :20], 50, 4, group=8, residual=4)  # 30 dropped by a press
    assert (layer.quantized_tokens, layer.residual_tokens) == (16, 4)
    layer.update(k[:, :, 20:40], v[:, :, 20:40])
    layer.truncate(1)
    assert layer.get_seq_length() == 69 and layer.stored == 39
    assert layer.get_mask_sizes(1) == (40, 30)  # 39 stored keys + the query; positions offset by the 30 dropped
    with pytest.raises(LongreachError, match="cropped"):
        layer.crop(-1)


# -- on models ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_generate_holds_full_attention_layers_quantized_and_int8_keeps_greedy_tokens(arch):
    model = tiny_model(arch)
    ids, steps = torch.randint(1, 128, (1, 80)), torch.randint(1, 128, (1, 4))
    dense, dense_cache = decode_logits(model, None, ids, steps)
    errors = {}
    for bits in (8, 4):
        got, cache = decode_logits(model, f"kvquant:bits={bits},group=16,residual=8", ids, steps)
        errors[bits] = float((got - dense).abs().max())
        for layer, plain in zip(cache.layers, dense_cache.layers, strict=True):
            if getattr(layer, "is_sliding", False):  # the model's own sliding-window layers stay as they are
                assert not isinstance(layer, QuantizedLayer)
                continue
            assert isinstance(layer, QuantizedLayer) and layer.quantized_tokens == 64
            assert layer.qkeys.codes.dtype == torch.uint8
            assert layer.qkeys.codes.shape[-1] == layer.keys.shape[-1] * bits // 8
            assert layer.nbytes < 0.6 * (plain.keys.nbytes + plain.values.nbytes)
        assert cache_bytes(cache) < cache_bytes(dense_cache)
    assert 0 < errors[8] < errors[4] / 4, errors
    top = dense.topk(2, dim=-1).values
    assert float((top[..., 0] - top[..., 1]).min()) > 4 * errors[8]  # the int8 error cannot flip a greedy token
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        with longreach.apply(model, "kvquant:bits=8,group=16,residual=8"):
            got = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want)
    assert all(isinstance(layer, QuantizedLayer) for layer in got.past_key_values.layers
               if not getattr(layer, "is_sliding", False))


def test_stacked_after_snapkv_it_keeps_snapkvs_tokens_in_fewer_bytes():
    model = tiny_model("llama")
    ids, steps = torch.randint(1, 128, (1, 120)), torch.randint(1, 128, (1, 3))
    _, pressed = decode_logits(model, "snapkv:density=0.25", ids, steps)
    for spec in ("snapkv:density=0.25+kvquant:bits=4,group=8,residual=4", "kvquant:bits=4,group=8,residual=4"
                 "+snapkv:density=0.25"):  # the press runs first whichever is written first
        _, both = decode_logits(model, spec, ids, steps)
        for alone, quant in zip(pressed.layers, both.layers, strict=True):
            assert isinstance(alone, CompressedLayer) and isinstance(quant, QuantizedLayer)
            assert quant.stored == alone.keys.shape[2] and quant.get_seq_length() == alone.get_seq_length() == 123
            assert quant.quantized_tokens > 0
        # layer 0's keys come from the embeddings alone (deeper ones, once decoding, from quantized attention):
        # the same kept keys, the newest exact, the older within half a step of their group
        alone, quant = pressed.layers[0], both.layers[0]
        keys, _ = quant.dequantized()
        r, nq = quant.residual_tokens, quant.quantized_tokens
        assert torch.equal(keys[:, :, -r:], alone.keys[:, :, -r:])
        assert bool(((keys[:, :, :nq] - alone.keys[:, :, :nq]).abs()
                     <= group_bounds(alone.keys[:, :, :nq], 4, 8, -2) + 1e-6).all())
        assert cache_bytes(both) < 0.5 * cache_bytes(pressed)


@pytest.mark.parametrize(("spec", "message"), [
    ("kvquant:bits=3", "bits must be 8 or 4"),
    ("kvquant:bits=16", "bits must be 8 or 4"),
    ("kvquant:group=0", "group must be an integer >= 1"),
    ("kvquant:residual=-1", "residual must be an integer >= 0"),
])
def test_bad_parameters_are_refused_when_parsed(spec, message):
    with pytest.raises(SpecError, match=message):
        longreach.parse_spec(spec)


@pytest.mark.parametrize(("spec", "message"), [
    ("h2o:density=0.3+kvquant", "evicts keys while decoding"),
    ("kvquant+kvquant:bits=8", "one kvquant per spec"),
])
def test_stacks_it_cannot_serve_are_refused_by_apply(spec, message):
    model = tiny_model("llama")
    with pytest.raises(SpecError, match=message):
        longreach.apply(model, spec)
    assert model.config._attn_implementation != "longreach"


def test_a_head_policy_under_it_is_refused_by_apply(tmp_path):
    from test_heads import random_profile

    model = tiny_model("llama")
    profile = random_profile().save(tmp_path / "p.json")
    with pytest.raises(SpecError, match="gives heads different keys"):
        longreach.apply(model, f"razor:profile={profile},ratio=0.5+kvquant")


def test_only_a_press_may_shrink_a_layer_kvquant_holds():
    from longreach.cache.compressed import shrinkable_layer

    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    layers = [QuantizedLayer(k, v, 40, 8, 16, 8)]
    assert shrinkable_layer(layers, 0, "snapkv", quantized=True) is layers[0]
    with pytest.raises(LongreachError, match="kvquant holds it"):
        shrinkable_layer(layers, 0, "razor")


def test_no_cache_is_refused_not_ignored():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 64))
    with torch.no_grad(), longreach.apply(model, "kvquant"), pytest.raises(LongreachError, match="no cache"):
        model(ids, use_cache=False)


def test_a_chunked_prompt_under_a_press_keeps_the_press_tokens_quantized():
    """snapkv + kvquant on a prompt in two forwards: the second chunk's press drops tokens kvquant already holds
    (they are quantized again in new groups). The kept tokens are snapkv's own, within int8's error."""
    model = tiny_model("llama")
    ids, steps = torch.randint(1, 128, (1, 160)), torch.randint(1, 128, (1, 3))
    press = "snapkv:density=0.5,window=8"
    plain, plain_cache = decode_logits(model, press, ids, steps, cut=96)
    got, cache = decode_logits(model, f"{press}+kvquant:bits=8,group=16,residual=8", ids, steps, cut=96)
    for layer, ref in zip(cache.layers, plain_cache.layers, strict=True):
        assert isinstance(layer, QuantizedLayer) and layer.quantized_tokens > 0
        assert layer.stored == ref.keys.shape[2] and layer.seen == ref.get_seq_length()  # the press's count
        keys, _ = layer.dequantized()
        step = (ref.keys.amax() - ref.keys.amin()) / 255  # the widest int8 step any group can have
        assert float((keys - ref.keys).abs().max()) <= 2 * step  # quantized twice at most: half a step each
        assert layer.nbytes < 0.6 * (ref.keys.nbytes + ref.values.nbytes)
    assert float((got - plain).abs().max()) < 0.05
    assert float((got[1:] - got[:1]).abs().max()) > 0.05  # the steps differ from each other: a real comparison


def test_a_chunked_prompt_alone_is_quantized_as_it_arrives():
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 96))
    whole, _ = decode_logits(model, "kvquant:bits=8,group=16,residual=8", ids, ids[:, :0])
    with torch.no_grad(), longreach.apply(model, "kvquant:bits=8,group=16,residual=8"):
        out = model(ids[:, :48], use_cache=True)
        out = model(ids[:, 48:], use_cache=True, **cache_kwargs(model, output_cache(out)))
    layer = output_cache(out).layers[0]
    assert isinstance(layer, QuantizedLayer) and layer.get_seq_length() == 96 and layer.quantized_tokens == 80
    assert float((out.logits[:, -1] - whole[0]).abs().max()) < 0.01


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("axis", "n", "d", "group", "in_place"), [
    (-2, 64, 16, 32, True), (-1, 40, 16, 8, True),  # groups tile the tensor: written in place
    (-2, 50, 16, 32, False), (-1, 40, 12, 8, False)])  # a short last group: the general path
def test_dequantizing_into_a_buffer_equals_the_general_path(bits, axis, n, d, group, in_place):
    """The decode path writes codes x scales + zero points straight into the joined buffer; it must give exactly
    what ``dequantize`` gives, or decline (a short last group)."""
    x = torch.randn(2, 3, n, d)
    q = quantize(x, bits=bits, group=group, axis=axis)
    buf = torch.full((2, 3, n + 5, d), float("nan"))
    assert q.dequantize_into(buf[..., :n, :]) is in_place
    if in_place:
        assert torch.allclose(buf[..., :n, :], q.dequantize(), atol=1e-6)
        assert torch.isnan(buf[..., n:, :]).all()  # nothing written past its rows


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [100, 104, 105, 120])  # 104 - 8 and 120 - 8 fill whole groups of 16
def test_plan_counts_the_quantized_cache_that_a_prefill_leaves(bits, n):
    """``longreach plan`` counts codes, scales, zero points and the exact residual, not the full width: equal to the
    bytes a prefill under the spec really holds, the held-back last token included (it joins the residual after
    the others are quantized)."""
    from longreach.plan import plan_memory

    model, spec = tiny_model("llama"), f"kvquant:bits={bits},group=16,residual=8"
    with torch.no_grad(), longreach.apply(model, spec):
        cache = output_cache(model(torch.randint(1, 128, (1, n)), use_cache=True))
    dense = plan_memory(model, longreach.parse_spec("dense"), n, available=2**40)
    plan = plan_memory(model, longreach.parse_spec(spec), n, available=2**40)
    assert plan.kv_kept == cache_bytes(cache) < dense.kv_cache
    # the peak: the full-width cache during the prefill, before quantizing, or the quantized cache and the full-width
    # copy one layer attends
    per_layer = dense.kv_cache // model.config.num_hidden_layers
    assert plan.kv_cache == max(dense.kv_cache, plan.kv_kept + per_layer)
    chunked = plan_memory(model, longreach.parse_spec(spec), n, chunk=32, available=2**40)
    assert chunked.kv_cache == plan.kv_kept + per_layer  # chunk by chunk, the full cache never exists
    assert any(label == "KV cache after kvquant" for label, _ in plan.rows())


def test_plan_counts_a_press_then_kvquant_as_the_press_keeps_and_kvquant_stores():
    from longreach.plan import plan_memory

    model, n = tiny_model("llama"), 120
    spec = "snapkv:budget=40,window=8+kvquant:bits=4,group=8,residual=4"
    with torch.no_grad(), longreach.apply(model, spec):
        cache = output_cache(model(torch.randint(1, 128, (1, n)), use_cache=True))
    plan = plan_memory(model, longreach.parse_spec(spec), n, available=2**40)
    press = plan_memory(model, longreach.parse_spec("snapkv:budget=40,window=8"), n, available=2**40)
    # the press's 40 tokens of the first 119 quantized, then the prompt's last token (held back to attend the pressed
    # cache) in the exact residual
    assert cache_bytes(cache) == plan.kv_kept < press.kv_kept


@pytest.mark.parametrize("bits", [8, 4])
def test_each_keep_adds_at_most_half_a_step_of_error(bits):
    """``QuantizedLayer.keep`` quantizes the kept tokens again in new groups: after c keeps a key was quantized at
    most c + 1 times and is within c + 1 half steps (of the widest group) of its original; the residual stays
    exact."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 200, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g)
    layer = QuantizedLayer(k, v, 200, bits, 16, 8)
    step = float((k.amax() - k.amin()) / (2**bits - 1))
    kept = torch.arange(200)
    errors = []
    for c in range(1, 6):
        drop = torch.randperm(len(kept), generator=g)[:10]
        mask = torch.ones(len(kept), dtype=torch.bool)
        mask[drop] = False
        mask[-8:] = True  # the newest tokens, in the residual: kept, and exact
        layer.keep(torch.nonzero(mask).flatten().view(1, 1, -1).expand(1, 2, -1))
        kept = kept[mask]
        keys, _ = layer.dequantized()
        err = float((keys - k[:, :, kept]).abs().max())
        assert err <= (c + 1) * step / 2 + 1e-6, (c, err, step)
        assert torch.equal(keys[:, :, -8:], k[:, :, kept[-8:]])
        errors.append(err)
    assert errors[0] > 0 and layer.stored == len(kept) < 160


@pytest.mark.parametrize(("spec", "owner", "reason"), [
    ("selfextend+kvquant:bits=4", "kvquant", "quantized codes"),
    ("string+snapkv:density=0.5", "snapkv", "drops keys"),
])
def test_a_remapping_method_with_a_cache_owner_is_refused_in_apply_with_the_reason(spec, owner, reason):
    """Re-mapping re-rotates cached keys by cache index: refused before any forward, naming what to use instead;
    a rope scaling method takes the same cache policy."""
    model = tiny_model("llama")
    with pytest.raises(SpecError, match=rf"cannot stack \w+ with {owner}: .*{reason}.*use a rope scaling method"):
        longreach.apply(model, spec)
    with longreach.apply(model, f"yarn:factor=2+{spec.split('+')[1]}"):
        model(input_ids=torch.randint(1, 128, (1, 40)))
