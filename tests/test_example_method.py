"""docs/architecture.md's worked example (docs/examples/knormblocks.py) is a real method: loaded as a user
would, it registers, parses as a spec, runs through a model, equals dense at a full budget and keeps exactly
the blocks an oracle written here keeps."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import longreach
from longreach.methods import registry
from longreach.methods.base import SelectContext

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "knormblocks.py"


@pytest.fixture
def knorm():
    spec = importlib.util.spec_from_file_location("knormblocks_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # registers "knormblocks"
    yield module.KNormBlocks
    registry._REGISTRY.pop("knormblocks", None)  # other tests list every built-in method
    del sys.modules[spec.name]


def test_the_example_is_about_thirty_lines():
    assert len(EXAMPLE.read_text().splitlines()) <= 40


def test_example_keeps_the_lowest_norm_blocks(knorm):
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 200, 16)
    k[:, :, 64:80] *= 0.1  # two blocks of 8 with tiny keys
    method = longreach.parse_spec("knormblocks:budget=40,block=8,sinks=4,window=8").selector
    sel = method.select(q, k, SelectContext())
    # oracle: sinks 0..3 and the window 192..199 always; then 40 - 4 - 8 = 28 keys = 3 blocks of 8, the ones
    # with the lowest mean key norm among blocks with a key past the sinks and behind the window (not block 24)
    for h in range(2):
        norms = k[0, h].norm(dim=-1).view(25, 8).mean(-1)
        norms[24] = float("inf")  # the window's block
        want = set(norms.argsort()[:3].tolist())
        got = {int(b) for b in sel.indices[0, h, 0] if b >= 0}
        assert got == want and {8, 9} <= got


def test_example_at_full_budget_equals_dense_on_a_model(knorm):
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 100))
    with torch.no_grad():
        dense = model(ids).logits
        with longreach.apply(model, "knormblocks:budget=4096,block=16"):
            full = model(ids).logits
        with longreach.apply(model, "knormblocks:density=0.3,block=16") as handle:
            part = model(ids).logits
    assert (full - dense).abs().max() < 1e-5
    assert handle.density("prefill") < 0.6 and (part - dense).abs().max() > 1e-4


def test_example_choose_at_a_budget_covering_everything_picks_every_causal_block(knorm):
    method = knorm(budget=64, block=8)
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    quota = method.make_quota(40, 40, q.device)
    sel = method.choose(q, k, quota, SelectContext())  # select() would short-circuit to dense
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    assert torch.equal(sel.to_mask()[0, 0], causal)


def test_the_architecture_page_shows_the_file_as_it_is():
    source = EXAMPLE.read_text()
    page = (EXAMPLE.parents[1] / "architecture.md").read_text()
    assert source[source.index("@register"):].strip() in page
