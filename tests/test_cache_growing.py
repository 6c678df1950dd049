"""The in-place growing KV cache stores exactly what transformers' DynamicLayer stores."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_model

import longreach
from longreach import kernels
from longreach.cache import growing
from longreach.cache.compressed import cache_bytes
from longreach.generation import generate
from longreach.kernels import reference
from longreach.selection import Selection


def test_appends_equal_concatenation_across_growth_and_crop(monkeypatch):
    monkeypatch.setattr(growing.GrowingLayer, "min_spare", 3)
    layer, keys, values = growing.GrowingLayer(), [], []
    for n in [10, 1, 1, 1, 1, 5, 1, 1]:  # the prompt, then steps that outgrow the spare room twice
        k, v = torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)
        keys.append(k)
        values.append(v)
        got_k, got_v = layer.update(k, v)
        torch.testing.assert_close(got_k, torch.cat(keys, -2), rtol=0, atol=0)
        torch.testing.assert_close(got_v, torch.cat(values, -2), rtol=0, atol=0)
    assert layer.get_seq_length() == 21
    assert layer.nbytes >= 2 * 21 * 2 * 4 * 4  # spare room is counted
    layer.crop(-4)
    k = torch.randn(1, 2, 1, 4)
    got_k, _ = layer.update(k, torch.randn(1, 2, 1, 4))
    torch.testing.assert_close(got_k, torch.cat([torch.cat(keys, -2)[..., :17, :], k], -2), rtol=0, atol=0)


def test_prompt_is_stored_without_spare_room():
    layer = growing.GrowingLayer()
    assert layer.nbytes == 0  # nothing held before the first update
    k = torch.randn(1, 2, 50, 8)
    layer.update(k, k.clone())
    assert layer.keys.is_contiguous() and layer.nbytes == 2 * k.numel() * 4


def test_reserved_room_is_allocated_once_and_outgrown_as_without_it(monkeypatch):
    monkeypatch.setattr(growing.GrowingLayer, "min_spare", 3)
    layer, keys = growing.GrowingLayer(), []
    layer.expected = 13
    for i, n in enumerate([10, 1, 1, 1, 1, 1]):  # 13 reserved, then 2 more than that
        k = torch.randn(1, 2, n, 4)
        keys.append(k)
        got, _ = layer.update(k, -k)
        torch.testing.assert_close(got, torch.cat(keys, -2), rtol=0, atol=0)
        if i == 0:
            first = layer._k.data_ptr()
            assert layer._k.shape[-2] == 13  # the prompt, in a buffer of the reserved size
        elif layer.get_seq_length() <= 13:
            assert layer._k.data_ptr() == first  # appended in place, never copied
    assert layer._k.shape[-2] == 14 + 3  # past the reservation: grown by the usual rule at 14 tokens


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", ["dense", "quest:budget=24,block=8"])
def test_generate_with_growing_cache_equals_dynamic_cache(arch, spec, monkeypatch):
    model = tiny_model(arch)
    ids = {"input_ids": torch.randint(0, 128, (1, 60)), "attention_mask": torch.ones(1, 60, dtype=torch.long)}
    grown_to = []
    real_grow = growing.GrowingLayer._grow
    monkeypatch.setattr(growing.GrowingLayer, "_grow", lambda self, buf, need: grown_to.append(need) or
                        real_grow(self, buf, need))
    with longreach.apply(model, spec):
        grown = generate(model, ids, 12, set(), cache="growing")
        reserved_grew_to = list(grown_to)
        plain = generate(model, ids, 12, set(), cache="dynamic")  # the runtime still makes its layers grow in place
    assert grown.tokens == plain.tokens
    assert any(isinstance(layer, growing.GrowingLayer) for layer in grown.cache.layers)
    for a, b in zip(grown.cache.layers, plain.cache.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
    # generate() reserves the prompt and its 11 decode steps: buffers are allocated with the prompt and never
    # again, and hold exactly what transformers' cache holds
    assert reserved_grew_to and set(reserved_grew_to) == {60}
    held = sum(t.numel() * t.element_size() for layer in grown.cache.layers for t in (layer.keys, layer.values))
    assert cache_bytes(grown.cache) == held < cache_bytes(plain.cache)  # the latter keeps the room growth added
    assert cache_bytes(plain.cache, room=False) == held  # its tokens alone


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_model_generate_under_apply_grows_the_cache_and_equals_sdpa(arch, monkeypatch):
    """transformers' own generate() says nothing of its length: the runtime's growing layers add room as they
    fill, and the tokens are the model's own."""
    monkeypatch.setattr(growing.GrowingLayer, "min_spare", 2)  # grow several times within a short generation
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 60))
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kwargs)
    with longreach.apply(model, "dense"):
        out = model.generate(ids, **kwargs, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    layers = [layer for layer in out.past_key_values.layers if isinstance(layer, growing.GrowingLayer)]
    assert layers and all(layer._k.shape[-2] > layer.get_seq_length() for layer in layers)  # room left by growth


def test_kernel_reads_strided_cache_views():
    """Decode reads K/V as views of buffers with spare room: same result as contiguous copies."""
    buf_k, buf_v = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    k, v = buf_k[..., :257, :], buf_v[..., :257, :]
    q = torch.randn(1, 4, 1, 16)
    sel = Selection(torch.tensor([[[[0, 3, 7]], [[1, 2, -1]]]]), 1, 257, 16, 16, 4, 32)
    out = kernels.attend(q, k, v, sel, 0.25, "gather")
    ref = reference.attend(q, k.contiguous(), v.contiguous(), sel, 0.25)
    assert (out - ref).abs().max().item() <= 1e-5


def test_unknown_cache_kind_is_refused():
    from longreach.errors import InputError

    model = tiny_model("llama")
    ids = {"input_ids": torch.randint(0, 128, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    with pytest.raises(InputError, match="growing"):
        generate(model, ids, 2, set(), cache="static")


def test_room_added_at_decode_is_capped_so_a_long_prompt_does_not_pay_n_over_8():
    layer = growing.GrowingLayer()
    layer.update(torch.zeros(1, 1, 20_000, 2), torch.zeros(1, 1, 20_000, 2))
    layer.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert layer._k.shape[-2] == 20_001 + growing.MAX_SPARE  # not 20_001 + 2_500
    assert torch.equal(layer.keys[..., -1, :], torch.ones(1, 1, 2)) and layer.keys.shape[-2] == 20_001
