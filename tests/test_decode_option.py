"""``decode=dense`` on the prefill-pattern selectors (vslash, flexprefill): the prompt is attended sparsely, every
decode step exactly over every key; ``decode=sparse`` (the default) keeps a decode step's budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import longreach
from longreach import SpecError, parse_spec
from longreach.kernels import reference
from longreach.methods import SelectContext

SCALE = 0.125


def _inputs(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, t, 64, generator=g)
    k = torch.randn(1, 2, t, 64, generator=g)
    v = torch.randn(1, 2, t, 64, generator=g)
    return q, k, v


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One decode query over every key, by hand (GQA: query heads 0-1 read KV head 0): (B, 1, Hq, D)."""
    k, v = k.repeat_interleave(2, dim=1).double(), v.repeat_interleave(2, dim=1).double()
    w = (q.double() @ k.transpose(-1, -2) * SCALE).softmax(-1)
    return (w @ v).transpose(1, 2)


@pytest.mark.parametrize("method", ["vslash", "flexprefill"])
def test_a_dense_decode_step_sees_every_key_and_a_sparse_one_does_not(method):
    q, k, v = _inputs(512)
    step = q[:, :, -1:]
    want = _softmax_attention(step, k, v)
    got = {}
    for decode in ("dense", "sparse"):
        sel = parse_spec(f"{method}:density=0.25,block=32,decode={decode}").selector.select(
            step, k, SelectContext(scale=SCALE))
        got[decode] = (sel.full, reference.attend(step, k, v, sel, SCALE).double())
    assert got["dense"][0] and torch.allclose(got["dense"][1], want, atol=1e-5)
    assert not got["sparse"][0] and (got["sparse"][1] - want).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["vslash", "flexprefill"])
def test_the_option_leaves_the_prefill_choice_alone(method):
    q, k, _ = _inputs(512)
    sels = [parse_spec(f"{method}:density=0.25,block=32,decode={d}").selector.select(q, k, SelectContext(scale=SCALE))
            for d in ("dense", "sparse")]
    assert not sels[0].full and torch.equal(sels[0].indices, sels[1].indices)


def test_an_unknown_decode_value_is_refused():
    with pytest.raises(SpecError, match="decode must be 'sparse' or 'dense'"):
        parse_spec("flexprefill:decode=exact")


@pytest.mark.parametrize("method", ["vslash", "flexprefill"])
def test_inside_the_model_decode_equals_plain_attention_over_the_sparse_prefills_cache(method):
    """The oracle: the same sparse prefill, then the model's own (sdpa) attention for the decode step, with
    longreach removed. decode=dense must give its logits; decode=sparse must not."""
    model = tiny_model("llama")
    x = torch.randint(0, 128, (1, 300))
    nxt = torch.randint(0, 128, (1, 1))
    spec = f"{method}:density=0.2,block=16"
    with torch.no_grad():
        with longreach.apply(model, spec):
            cache = model(x, use_cache=True).past_key_values
        want = model(nxt, cache=cache).logits
        got = {}
        for decode in ("dense", "sparse"):
            with longreach.apply(model, f"{spec},decode={decode}", track_density=True) as handle:
                cache = model(x, use_cache=True).past_key_values
                got[decode] = model(nxt, cache=cache).logits
                assert handle.density("prefill") < 0.6
                assert (handle.density("decode") == 1.0) == (decode == "dense")
    assert (got["dense"] - want).abs().max() < 1e-4
    assert (got["sparse"] - want).abs().max() > 1e-4
