"""``dense_layers=N`` on the phase-gated selectors (vslash, flexprefill, quest, moba): the model's first N layers attend
every key, the others choose exactly as without the option."""

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
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, t, 64, generator=g), torch.randn(1, 2, t, 64, generator=g),
            torch.randn(1, 2, t, 64, generator=g))


@pytest.mark.parametrize("method", ["vslash", "flexprefill", "quest", "moba"])
@pytest.mark.parametrize("t_q", [512, 1])  # prefill, and a decode step with decode=sparse
def test_layers_below_n_attend_every_key_and_the_rest_choose_as_without_the_option(method, t_q):
    q, k, v = _inputs(512)
    q = q[:, :, -t_q:]
    base = parse_spec(f"{method}:density=0.25,block=32").selector
    opt = parse_spec(f"{method}:density=0.25,block=32,dense_layers=2").selector
    for layer in (0, 1):
        sel = opt.select(q, k, SelectContext(layer_idx=layer, scale=SCALE))
        assert sel.full
        got = reference.attend(q, k, v, sel, SCALE)
        assert torch.allclose(got, dense_attention(q, k, v, SCALE), atol=1e-5)
    for layer in (2, 7):
        want = base.select(q, k, SelectContext(layer_idx=layer, scale=SCALE))
        sel = opt.select(q, k, SelectContext(layer_idx=layer, scale=SCALE))
        assert not sel.full and torch.equal(sel.indices, want.indices)


def test_inside_the_model_the_dense_layer_matches_plain_attention_and_the_next_stays_sparse():
    """The oracle for layer 0 is the model's own attention with longreach removed; layer 1 must differ from it
    (its input is plain, so only its own sparse attention can make it differ)."""
    model = tiny_model("llama")
    x = torch.randint(0, 128, (1, 400))
    outs: dict[str, list[torch.Tensor]] = {}

    def run(name: str) -> None:
        seen: list[torch.Tensor] = []
        hooks = [layer.self_attn.register_forward_hook(lambda _m, _a, out: seen.append(out[0].detach()))
                 for layer in model.model.layers]
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
        outs[name] = seen

    with torch.no_grad():
        run("plain")
        with longreach.apply(model, "flexprefill:density=0.2,block=16,dense_layers=1", track_density=True) as handle:
            run("opt")
            assert 0.55 < handle.density("prefill") < 0.75  # one of two layers dense, the other below 0.5
        with longreach.apply(model, "flexprefill:density=0.2,block=16"):
            run("sparse")
    assert (outs["opt"][0] - outs["plain"][0]).abs().max() < 1e-5
    assert (outs["sparse"][0] - outs["plain"][0]).abs().max() > 1e-4
    assert (outs["opt"][1] - outs["plain"][1]).abs().max() > 1e-4


def test_a_dense_layers_that_leaves_no_sparse_layer_is_refused_before_any_forward():
    with pytest.raises(SpecError, match="dense_layers=2 leaves no layer sparse"):
        longreach.apply(tiny_model("llama"), "vslash:density=0.2,dense_layers=2")
    # Gemma 3's sliding layers keep their window: with layers sliding, full, sliding, full, dense_layers=3 still
    # leaves layer 3 sparse, and 4 leaves none
    gemma = tiny_model("gemma3")
    longreach.apply(gemma, "flexprefill:density=0.2,dense_layers=3").remove()
    with pytest.raises(SpecError, match=r"layers with full attention are \[1, 3\]"):
        longreach.apply(gemma, "flexprefill:density=0.2,dense_layers=4")


@pytest.mark.parametrize(("value", "message"), [("-1", "must be an integer >= 0"), ("1.5", "is not a valid int"),
                                               ("true", "is not a valid int")])
def test_a_bad_dense_layers_is_a_spec_error(value, message):
    with pytest.raises(SpecError, match=f"dense_layers.*{message}"):
        parse_spec(f"flexprefill:dense_layers={value}")
