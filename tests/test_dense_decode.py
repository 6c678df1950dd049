"""Decode attention over a float32 cache on the compiled split-K kernel (``kernels.decode``), against the float64
reference kernel, and the runtime's use of it for full selections at decode."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import longreach
from longreach.kernels import decode, gather, native, reference
from longreach.selection import Selection

pytestmark = pytest.mark.skipif(native.load() is None, reason="needs the compiled kernels (a C++ compiler)")


def _case(batch, n_q, n_kv, dim, n, seed=0, spare=0):
    """q and the filled part of k/v buffers holding ``spare`` more rows (a growing cache's views: heads not
    contiguous with each other)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, n_kv, n + spare, dim, generator=g)[:, :, :n]
    v = torch.randn(batch, n_kv, n + spare, dim, generator=g)[:, :, :n]
    return torch.randn(batch, n_q, 1, dim, generator=g) * 2, k, v


def _oracle(q, k, v, scale, softcap=None, sinks=None):
    sel = Selection.dense(q.shape[0], 1, k.shape[2])
    return reference.attend(q.double(), k.double(), v.double(), sel, scale, softcap=softcap,
                            sinks=None if sinks is None else sinks.double())


@pytest.mark.parametrize("batch, n_q, n_kv, dim, n, spare", [
    (1, 9, 3, 64, 1000, 0),   # SmolLM2's heads: several 256-token tasks per head, a short last one
    (1, 9, 3, 64, 700, 37),   # views into a buffer with spare room
    (2, 4, 4, 40, 300, 5),    # batch of two, no GQA, a head dim that is not a multiple of 16
    (1, 8, 1, 72, 256, 0),    # one KV head for 8 query heads, exactly one task
    (1, 4, 2, 16, 1, 3),      # one key
    (1, 6, 2, 128, 513, 0),   # one token past two whole tasks
])
def test_split_k_decode_equals_the_reference_kernel(batch, n_q, n_kv, dim, n, spare):
    q, k, v = _case(batch, n_q, n_kv, dim, n, spare=spare)
    out, lse = decode.attend(q, k, v, dim**-0.5)
    want = _oracle(q, k, v, dim**-0.5)
    assert out.shape == want.shape == (batch, 1, n_q, dim)
    assert torch.allclose(out.double(), want, atol=2e-6, rtol=1e-5)
    # the log-sum-exp of each row's scores, which sinks and split merges rely on
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double() * dim**-0.5,
                          k.double().repeat_interleave(n_q // n_kv, dim=1))
    assert torch.allclose(lse[:, 0].double(), scores.logsumexp(-1), atol=1e-5)


def test_softcap_and_learned_sinks_join_the_softmax_as_in_the_reference():
    q, k, v = _case(1, 4, 2, 16, 600, seed=1)
    q = q * 6  # scores large enough for the cap to bend them
    sinks = torch.randn(4)
    got = gather.attend(q, k, v, Selection.dense(1, 1, 600), 0.25, softcap=5.0, sinks=sinks)
    want = _oracle(q, k, v, 0.25, softcap=5.0, sinks=sinks)
    assert torch.allclose(got.double(), want, atol=2e-6, rtol=1e-5)
    assert (_oracle(q, k, v, 0.25) - want).abs().max() > 1e-2  # the extras change the answer: this can fail


def test_the_kernel_runs_only_where_it_can_and_measured_faster(monkeypatch):
    q, k, v = _case(1, 4, 2, 16, 64)
    calls = []
    monkeypatch.setattr(decode, "attend", lambda *a, **kw: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(decode, "faster", lambda *shape: False)
    want = _oracle(q, k, v, 0.25)
    assert torch.allclose(gather.attend(q, k, v, Selection.dense(1, 1, 64), 0.25).double(), want, atol=2e-6)
    assert not calls  # measured slower here: SDPA runs
    monkeypatch.setattr(decode, "faster", lambda *shape: True)
    assert decode.serves(q, k, v)
    assert not decode.serves(q.double(), k.double(), v.double())
    assert not decode.serves(torch.randn(1, 4, 2, 16), k, v)  # two query rows: not a decode step
    assert not decode.serves(q, k[..., :8], v[..., :8])  # narrower keys than queries
    with torch.enable_grad():
        assert not decode.serves(q.requires_grad_(), k, v)


def test_decoding_on_the_kernel_gives_the_tokens_sdpa_gives(monkeypatch):
    """Whole models, dense and after a press, with the kernel forced on and off: the same greedy tokens (the
    kernel sums in another order than SDPA, so logits agree to rounding)."""
    model = tiny_model("llama")
    ids = {"input_ids": torch.randint(1, 128, (1, 300)), "attention_mask": torch.ones(1, 300, dtype=torch.long)}
    for spec in ("dense", "snapkv:density=0.3"):
        runs = {}
        for on in (True, False):
            monkeypatch.setattr(decode, "faster", lambda *shape, on=on: on)
            calls, real = [], decode.attend

            def counted(*args, real=real, calls=calls, **kwargs):
                calls.append(1)
                return real(*args, **kwargs)

            monkeypatch.setattr(decode, "attend", counted)
            with torch.no_grad(), longreach.apply(model, spec):
                runs[on] = longreach.generate(model, ids, 8).tokens
            monkeypatch.setattr(decode, "attend", real)
            assert bool(calls) == on, "the kernel ran exactly when it was chosen"
        assert runs[True] == runs[False]
