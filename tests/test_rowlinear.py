"""Decode's one-row linear layers on every thread (kernels/rowlinear.py): the compiled path against F.linear,
and apply() routing exactly the one-row calls of large fp32 layers through it, undone on remove."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import prefill_then_steps, tiny_model
from torch import nn

import longreach
from longreach.kernels import native, rowlinear

pytestmark = pytest.mark.skipif(native.load() is None, reason="needs the compiled kernel (a C++ compiler)")


@pytest.mark.parametrize("out_features,in_features", [(1, 1), (7, 33), (64, 64), (301, 576), (4099, 250)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_row_matches_f_linear(out_features, in_features, threads, bias):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weight = torch.randn(out_features, in_features, dtype=torch.float64)
        b = torch.randn(out_features, dtype=torch.float64) if bias else None
        for shape in [(in_features,), (1, in_features), (1, 1, in_features)]:
            x = torch.randn(shape, dtype=torch.float64)
            expected = F.linear(x, weight, b)  # float64: the oracle, not the float32 order of sums
            got = native.load().linear_row(x.float(), weight.float(), None if b is None else b.float())
            assert got.shape == expected.shape and got.dtype == torch.float32
            scale = (x.abs() @ weight.abs().T).max().item() + 1e-6
            assert (got.double() - expected).abs().max().item() <= 1e-6 * scale
    finally:
        torch.set_num_threads(previous)


def test_linear_row_reads_a_strided_row_and_a_temporary_bias():
    weight, bias = torch.randn(37, 20), torch.randn(74)[::2]
    x = torch.randn(20, 3)[:, 1]  # a column: not contiguous
    assert not bias.is_contiguous() and not x.is_contiguous()
    torch.testing.assert_close(native.load().linear_row(x, weight, bias), F.linear(x, weight, bias),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(native.load().linear_row(x, weight, bias * 2.0), F.linear(x, weight, bias * 2.0),
                               rtol=1e-5, atol=1e-5)  # a temporary bias, freed once the call returns


def test_linear_row_refuses_what_it_does_not_compute():
    mod = native.load()
    with pytest.raises(RuntimeError, match="one row"):
        mod.linear_row(torch.randn(2, 8), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="last dimension"):
        mod.linear_row(torch.randn(8, 1), torch.randn(4, 8), None)  # 8 values, but not a row of 8
    with pytest.raises(RuntimeError, match="last dimension"):
        mod.linear_row(torch.tensor(1.0), torch.randn(4, 1), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        mod.linear_row(torch.randn(8), torch.randn(8, 4).T, None)
    with pytest.raises(RuntimeError, match="float32"):
        mod.linear_row(torch.randn(8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), None)


@pytest.fixture
def counted(monkeypatch):
    """Every layer counts as large and faster; the compiled calls are counted."""
    calls = []
    real = native.load()

    def linear_row(x, weight, bias):
        calls.append(tuple(weight.shape))
        return real.linear_row(x, weight, bias)

    monkeypatch.setattr(rowlinear, "MIN_BYTES", 0)
    monkeypatch.setattr(rowlinear, "faster", lambda weight: True)
    counting = SimpleNamespace(**{name: getattr(real, name) for name in dir(real) if not name.startswith("_")})
    counting.linear_row = linear_row  # the other compiled kernels stay as they are
    monkeypatch.setattr(rowlinear.native, "load", lambda verbose=False: counting)
    return calls


def test_install_takes_one_row_calls_only_and_undoes(counted):
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4, bias=False))
    undo = rowlinear.install(model)
    assert all("forward" in m.__dict__ for m in (model[0], model[2]))
    with torch.no_grad():
        one = torch.randn(1, 1, 16)
        expected = F.linear(F.relu(F.linear(one, model[0].weight, model[0].bias)), model[2].weight)
        torch.testing.assert_close(model(one), expected, rtol=1e-5, atol=1e-6)
        assert counted == [(8, 16), (4, 8)]
        model(torch.randn(1, 3, 16))  # a prefill's rows go to torch
    assert len(counted) == 2
    model(torch.randn(1, 1, 16, requires_grad=True))  # autograd needs torch's op
    model[0].weight.requires_grad_(False)  # a trainable bias alone still needs it
    model(torch.randn(1, 1, 16))
    assert len(counted) == 2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(1, 1, 16)).dtype == torch.bfloat16  # autocast's dtype, as F.linear gives
    assert len(counted) == 2
    undo()
    assert not any("forward" in m.__dict__ for m in model)


def test_undo_leaves_a_forward_someone_else_installed_later(counted):
    model = nn.Sequential(nn.Linear(16, 8))
    undo = rowlinear.install(model)
    theirs = model[0].forward = lambda x: x  # e.g. a profiler's wrapper, set after apply()
    undo()
    assert model[0].forward is theirs


def test_apply_runs_decode_through_it_and_keeps_the_logits(counted):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        expected = prefill_then_steps(model, ids, 4)
        with longreach.apply(model, "dense"):
            got = prefill_then_steps(model, ids, 4)
    linear_layers = sum(isinstance(m, nn.Linear) for m in model.modules())
    # the prefill's one-row LM head call, then every linear layer in each of 4 decode steps
    assert len(counted) >= 4 * linear_layers
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # removed with the handle


def test_forced_torch_path_is_never_measured(monkeypatch):
    def measured(weight):
        raise AssertionError("timed although LONGREACH_NATIVE=0")

    monkeypatch.setenv("LONGREACH_NATIVE", "0")
    monkeypatch.setattr(rowlinear, "_timings", measured)
    assert rowlinear.faster(torch.empty(4096, 512)) is False


def test_a_large_weight_is_timed_in_place_and_small_ones_on_at_most_the_stream_budget(monkeypatch):
    """Timing never allocates more than ``STREAM_BYTES`` of copies, nor a copy of a large weight."""
    large, middle, small = torch.randn(512, 1024), torch.randn(192, 1024), torch.randn(64, 256)
    made = []
    real_randn = torch.randn
    monkeypatch.setattr(rowlinear.torch, "randn", lambda *a, **k: made.append(a) or real_randn(*a, **k))
    monkeypatch.setattr(rowlinear, "STREAM_BYTES", 1 << 20)
    rowlinear._timings(large)  # 2 MiB: itself, no copy
    assert [a for a in made if len(a) == 2] == []
    rowlinear._timings(middle)  # 0.75 MiB, over half the budget: itself
    assert [a for a in made if len(a) == 2] == []
    rowlinear._timings(small)  # 64 KiB: 16 copies make the 1 MiB budget
    assert len([a for a in made if len(a) == 2]) == 16
