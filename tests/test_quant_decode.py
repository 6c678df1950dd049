"""Decode attention read from a kvquant cache's codes (``kernels.quantdecode``), against the reference kernel over
the dequantized cache, and the decode path of ``kvquant`` that uses it."""

from __future__ import annotations

import pytest
import torch
from conftest import decode_logits, tiny_model

import longreach
from longreach.cache import quantized
from longreach.cache.quant import quantize
from longreach.cache.quantized import QuantizedLayer
from longreach.compat import cache_kwargs, output_cache
from longreach.kernels import native, quantdecode, reference
from longreach.runtime.layer import LayerRuntime
from longreach.selection import Selection

pytestmark = pytest.mark.skipif(native.load() is None, reason="needs the compiled kernels (a C++ compiler)")


def _case(batch, n_q, n_kv, dim, n, rest, bits, group, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, n_kv, n + rest, dim, generator=g) * 2
    k[..., 1] += 8  # an outlier channel, as KIVI's keys have
    v = torch.randn(batch, n_kv, n + rest, dim, generator=g)
    q = torch.randn(batch, n_q, 1, dim, generator=g)
    return q, k, v, quantize(k[:, :, :n], bits, group, axis=-2), quantize(v[:, :, :n], bits, group, axis=-1)


def _oracle(q, k, v, qk, qv, n, scale, softcap=None, sinks=None):
    """The reference kernel in float64 over the dequantized cache followed by the exact residual."""
    keys = torch.cat([qk.dequantize(), k[:, :, n:]], dim=2).double()
    values = torch.cat([qv.dequantize(), v[:, :, n:]], dim=2).double()
    sel = Selection.dense(q.shape[0], 1, keys.shape[2])
    return reference.attend(q.double(), keys, values, sel, scale, softcap=softcap,
                            sinks=None if sinks is None else sinks.double())


@pytest.mark.parametrize("batch, n_q, n_kv, dim, n, rest, bits, group", [
    (1, 9, 3, 64, 512, 129, 4, 32),   # SmolLM2's heads, several tasks per head
    (1, 9, 3, 64, 768, 160, 8, 32),
    (2, 4, 2, 33, 96, 5, 4, 16),      # odd head dim: a half-used last byte at 4 bits
    (1, 4, 4, 16, 320, 1, 8, 32),     # no GQA, the residual is the new token alone
    (1, 4, 2, 16, 40, 3, 4, 5),       # odd group: value groups of 5, 5, 5 and 1 channels
    (1, 8, 1, 128, 256, 7, 8, 128),   # one KV head for 8 query heads, groups longer than a task's chunk
])
def test_attending_the_codes_equals_the_reference_kernel_over_the_dequantized_cache(batch, n_q, n_kv, dim, n, rest,
                                                                                     bits, group):
    q, k, v, qk, qv = _case(batch, n_q, n_kv, dim, n, rest, bits, group)
    assert quantdecode.usable(q, qk, qv)
    got = quantdecode.attend(q, qk, qv, k[:, :, n:], v[:, :, n:], dim**-0.5)
    want = _oracle(q, k, v, qk, qv, n, dim**-0.5)
    assert got.shape == want.shape == (batch, 1, n_q, dim)
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-4)
    # the oracle is not the quantized cache's own approximation of itself: attending the exact keys differs
    exact = reference.attend(q.double(), k.double(), v.double(), Selection.dense(batch, 1, n + rest), dim**-0.5)
    assert (exact - want).abs().max() > 1e-4


def test_softcap_and_learned_sinks_join_the_softmax_as_in_the_reference():
    q, k, v, qk, qv = _case(1, 4, 2, 16, 64, 9, 4, 16, seed=1)
    q = q * 6  # scores large enough for the cap to bend them
    sinks = torch.randn(4)
    got = quantdecode.attend(q, qk, qv, k[:, :, 64:], v[:, :, 64:], 0.25, softcap=5.0, sinks=sinks)
    want = _oracle(q, k, v, qk, qv, 64, 0.25, softcap=5.0, sinks=sinks)
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-4)
    plain = _oracle(q, k, v, qk, qv, 64, 0.25)
    assert (plain - want).abs().max() > 1e-2  # both extras change the answer: the comparison can fail


def test_layouts_the_kernel_does_not_read_are_not_usable():
    q, k, v, qk, qv = _case(1, 4, 2, 16, 64, 3, 8, 16)
    assert not quantdecode.usable(q.double(), qk, qv)
    assert not quantdecode.usable(torch.randn(1, 4, 2, 16), qk, qv)  # two query rows: not a decode step
    assert not quantdecode.usable(q, qv, qk)  # keys must be grouped over tokens, values over channels
    odd = quantize(k[:, :, :60], 8, 16, axis=-2)  # a last key group of 12 tokens
    assert not quantdecode.usable(q, odd, quantize(v[:, :, :60], 8, 16, axis=-1))


# -- the decode path of kvquant -----------------------------------------------------------------------------

@pytest.fixture
def count_codes(monkeypatch):
    """Count the decode steps attended from the codes, with the compiled path chosen (as where it measured faster)."""
    calls = []
    real = quantdecode.attend
    monkeypatch.setattr(quantized, "codes_faster", lambda *a: True)
    monkeypatch.setattr(quantdecode, "attend", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_decode_from_the_codes_equals_decode_from_the_dequantized_cache(monkeypatch, count_codes, arch):
    model = tiny_model(arch)
    ids, steps = torch.randint(1, 128, (1, 80)), torch.randint(1, 128, (1, 5))
    spec = "kvquant:bits=4,group=16,residual=8"
    fused, cache = decode_logits(model, spec, ids, steps)
    full_layers = sum(not getattr(layer, "is_sliding", False) for layer in cache.layers)
    assert len(count_codes) == 5 * full_layers  # every decode step of every quantized layer read the codes
    assert all(layer.deferred == 0 and not layer.defer_next for layer in cache.layers
               if isinstance(layer, QuantizedLayer))
    monkeypatch.setattr(quantized, "codes_faster", lambda *a: False)  # the fallback: dequantize, then attend
    count_codes.clear()
    fallback, _ = decode_logits(model, spec, ids, steps)
    assert not count_codes
    assert torch.allclose(fused, fallback, atol=1e-4, rtol=1e-4)
    # and the path that never defers: the update dequantizes and the runtime's selector + kernel attend
    monkeypatch.setattr(LayerRuntime, "reads_codes", lambda self: False)
    plain, _ = decode_logits(model, spec, ids, steps)
    assert not count_codes
    assert torch.allclose(fused, plain, atol=1e-4, rtol=1e-4)
    assert (fused[1:] - fused[:1]).abs().max() > 1e-2  # the steps differ from each other: a real comparison


def test_a_press_reading_every_key_while_decoding_keeps_the_dequantized_path(count_codes):
    """h2o's history adds each decode query's attention to every stored key: its stack attends dequantized keys."""
    model = tiny_model("llama")
    ids, steps = torch.randint(1, 128, (1, 80)), torch.randint(1, 128, (1, 3))
    got, cache = decode_logits(model, "h2o:density=0.5,every=0+kvquant:bits=8,group=16,residual=8", ids, steps)
    assert not count_codes and torch.isfinite(got).all()
    assert all(isinstance(layer, QuantizedLayer) and layer.quantized_tokens for layer in cache.layers)


def test_decode_density_counts_every_stored_key_once_per_step(count_codes):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (2, 80))  # a batch of two
    densities = {}
    for spec in ("kvquant:bits=8,group=16,residual=8", "snapkv:density=0.5", "snapkv:density=0.5+kvquant:bits=8"
                 ",group=16,residual=8"):
        with torch.no_grad(), longreach.apply(model, spec, track_density=True) as handle:
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            densities[spec] = handle.density("decode")
    assert count_codes  # the kvquant specs read the codes
    assert densities["kvquant:bits=8,group=16,residual=8"] == pytest.approx(1.0)
    assert densities["snapkv:density=0.5+kvquant:bits=8,group=16,residual=8"] == pytest.approx(
        densities["snapkv:density=0.5"])


def test_an_armed_layer_returns_every_key_once_its_handle_is_removed():
    """A forward that failed between the pre-hook and the update leaves the layer armed; without longreach the
    next update must still return every stored key."""
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 80))
    with torch.no_grad(), longreach.apply(model, "kvquant:bits=8,group=16,residual=8") as handle:
        cache = output_cache(model(ids, use_cache=True))
        layer = cache.layers[0]
        quantized.defer_next(cache, 0, handle)
    k, v = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    keys, _ = layer.update(k, v)
    assert keys.shape[2] == 81 and layer.deferred == 0
    class Applied:  # an applied handle: its arming does defer (the assertion above can fail)
        active = True

    owner = Applied()
    quantized.defer_next(cache, 0, owner)
    keys, _ = layer.update(k, v)
    assert keys.shape[2] == layer.residual_tokens < 82 and layer.deferred == layer.quantized_tokens


def test_the_reference_kernel_a_select_method_or_an_observer_keep_the_dequantized_path(count_codes):
    model = tiny_model("llama")
    ids, steps = torch.randint(1, 128, (1, 80)), torch.randint(1, 128, (1, 2))
    decode_logits(model, "kvquant:bits=8,group=16,residual=8", ids, steps, kernel="reference")
    decode_logits(model, "quest:density=0.5+kvquant:bits=8,group=16,residual=8", ids, steps)
    assert not count_codes
    with torch.no_grad(), longreach.apply(model, "kvquant:bits=8,group=16,residual=8") as handle:
        seen = []
        handle.observer = lambda layer_idx, q, k, *rest: seen.append(k.shape[2])
        out = model(ids, use_cache=True)
        model(steps[:, :1], use_cache=True, **cache_kwargs(model, output_cache(out)))
    assert not count_codes
    assert seen[-1] == 81  # the observer saw every key of the decode step, not only the residual


def test_generate_with_an_attention_mask_and_density_tracking_reads_the_codes(monkeypatch, count_codes):
    model = tiny_model("qwen2")
    ids = torch.randint(1, 128, (1, 70))
    spec = "kvquant:bits=4,group=16,residual=8"
    with torch.no_grad():
        with longreach.apply(model, spec, track_density=True) as handle:
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            density = handle.density("decode")
        assert len(count_codes) == 3 * model.config.num_hidden_layers  # 3 decode steps after the prompt
        monkeypatch.setattr(quantized, "codes_faster", lambda *a: False)
        with longreach.apply(model, spec):
            want = model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    assert torch.allclose(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=1e-4)
    assert density == pytest.approx(1.0)  # a decode step over the codes attends every stored key
