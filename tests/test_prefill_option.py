"""``prefill=dense`` on the block top-k selectors (quest, moba): a prompt attends every key and only decode selects,
as Quest's paper runs it; ``prefill=sparse`` (the default) selects in both phases."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from oracles import dense_attention

import longreach
from longreach import SpecError, parse_spec
from longreach.kernels import reference
from longreach.methods import SelectContext

SCALE = 0.125


def _inputs(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(1, 4, t, 64, generator=g), torch.randn(1, 2, t, 64, generator=g),
            torch.randn(1, 2, t, 64, generator=g))


@pytest.mark.parametrize("method", ["quest", "moba"])
def test_a_dense_prefill_sees_every_key_and_a_sparse_one_does_not(method):
    q, k, v = _inputs(512)
    want = dense_attention(q, k, v, SCALE)
    for prefill in ("dense", "sparse"):
        sel = parse_spec(f"{method}:density=0.25,block=32,prefill={prefill}").selector.select(
            q, k, SelectContext(scale=SCALE))
        err = (reference.attend(q, k, v, sel, SCALE) - want).abs().max()
        assert sel.full == (prefill == "dense")
        assert err < 1e-5 if prefill == "dense" else err > 1e-3


@pytest.mark.parametrize("method", ["quest", "moba"])
def test_the_option_leaves_the_decode_choice_alone(method):
    q, k, _ = _inputs(512)
    step = q[:, :, -1:]
    sels = [parse_spec(f"{method}:density=0.25,block=32,prefill={p}").selector.select(
        step, k, SelectContext(scale=SCALE)) for p in ("dense", "sparse")]
    assert not sels[0].full and torch.equal(sels[0].indices, sels[1].indices)


def test_both_phases_dense_and_unknown_values_are_refused():
    with pytest.raises(SpecError, match="prefill=dense and decode=dense attend every key in both phases"):
        parse_spec("quest:prefill=dense,decode=dense")
    with pytest.raises(SpecError, match="prefill must be 'sparse' or 'dense', got 'exact'"):
        parse_spec("quest:prefill=exact")


def test_inside_the_model_the_prompt_is_plain_attention_and_decode_is_the_methods():
    """Oracles: the model with longreach removed for the prompt's logits; for the decode step, the plain prompt's
    cache decoded under the method without the option (its decode rule, on the same keys)."""
    model = tiny_model("llama")
    x = torch.randint(0, 128, (1, 300))
    nxt = torch.randint(0, 128, (1, 1))
    spec = "quest:density=0.2,block=16"
    with torch.no_grad():
        plain = model(x, use_cache=True)
        with longreach.apply(model, spec):
            want = model(nxt, cache=plain.past_key_values).logits
        dense_step = model(nxt, cache=model(x, use_cache=True).past_key_values).logits
        with longreach.apply(model, f"{spec},prefill=dense", track_density=True) as handle:
            out = model(x, use_cache=True)
            got = model(nxt, cache=out.past_key_values).logits
            assert handle.density("prefill") == 1.0 and handle.density("decode") < 0.6
    assert (out.logits - plain.logits).abs().max() < 1e-4
    assert (got - want).abs().max() < 1e-4
    assert (got - dense_step).abs().max() > 1e-4  # the decode step did select
