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


def _case(batch, n_q, n_kv, dim, n, seed=0, spare=0, batch_step=1):
    """q and the filled part of k/v buffers holding ``spare`` more rows (a growing cache's views: heads not
    contiguous with each other); ``batch_step`` > 1 takes every other sequence of a larger batch (a batch stride
    that is not heads x head stride)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(batch * batch_step, n_kv, n + spare, dim, generator=g)[::batch_step, :, :n]
    v = torch.randn(batch * batch_step, n_kv, n + spare, dim, generator=g)[::batch_step, :, :n]
    return torch.randn(batch, n_q, 1, dim, generator=g) * 2, k, v


def _oracle(q, k, v, scale, softcap=None, sinks=None):
    sel = Selection.dense(q.shape[0], 1, k.shape[2])
    return reference.attend(q.double(), k.double(), v.double(), sel, scale, softcap=softcap,
                            sinks=None if sinks is None else sinks.double())


@pytest.mark.parametrize("batch, n_q, n_kv, dim, n, spare, batch_step", [
    (1, 9, 3, 64, 1000, 0, 1),   # SmolLM2's heads: several 256-token tasks per head, a short last one
    (1, 9, 3, 64, 700, 37, 1),   # views into a buffer with spare room
    (2, 4, 4, 40, 300, 5, 1),    # batch of two, no GQA, a head dim that is not a multiple of 16
    (2, 6, 2, 40, 300, 7, 2),    # batch of two with GQA, every other sequence of a batch of four
    (1, 8, 1, 72, 256, 0, 1),    # one KV head for 8 query heads, exactly one task
    (1, 4, 2, 16, 1, 3, 1),      # one key
    (1, 6, 2, 128, 513, 0, 1),   # one token past two whole tasks
    # compiled for its group and width (groups of 1-8 heads, d = 64 or 128; the rows above with d = 64 or 128 are
    # too, the others take the loop for any shape)
    (1, 8, 1, 128, 300, 0, 1),   # a group of 8, the largest compiled
    (2, 4, 4, 64, 257, 2, 1),    # groups of one
    (1, 9, 1, 64, 300, 0, 1),    # a group of 9: the loop for any shape
])
def test_split_k_decode_equals_the_reference_kernel(batch, n_q, n_kv, dim, n, spare, batch_step):
    q, k, v = _case(batch, n_q, n_kv, dim, n, spare=spare, batch_step=batch_step)
    out, lse = decode.attend(q, k, v, dim**-0.5)
    want = _oracle(q, k, v, dim**-0.5)
    assert out.shape == want.shape == (batch, 1, n_q, dim)
    assert torch.allclose(out.double(), want, atol=2e-6, rtol=1e-5)
    # the log-sum-exp of each row's scores, which sinks and split merges rely on
    scores = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double() * dim**-0.5,
                          k.double().repeat_interleave(n_q // n_kv, dim=1))
    assert torch.allclose(lse[:, 0].double(), scores.logsumexp(-1), atol=1e-5)


def test_softcap_and_learned_sinks_join_the_softmax_as_in_the_reference(monkeypatch):
    q, k, v = _case(1, 4, 2, 16, 600, seed=1)
    q = q * 6  # scores large enough for the cap to bend them
    sinks = torch.randn(4)
    monkeypatch.setattr(decode, "faster", lambda *shape: True)
    calls, real = [], decode.attend
    monkeypatch.setattr(decode, "attend", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = gather.attend(q, k, v, Selection.dense(1, 1, 600), 0.25, softcap=5.0, sinks=sinks)
    assert len(calls) == 1, "the kernel computed it"
    want = _oracle(q, k, v, 0.25, softcap=5.0, sinks=sinks)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    assert (_oracle(q, k, v, 0.25) - want).abs().max() > 1e-2  # the extras change the answer: this can fail
    # the capped rows' log-sum-exp, which the sinks are merged with
    _, lse = real(q, k, v, 0.25, 5.0)
    scores = 5.0 * torch.tanh(torch.einsum("bhd,bhnd->bhn", q[:, :, 0].double() * 0.25,
                                           k.double().repeat_interleave(2, dim=1)) / 5.0)
    assert torch.allclose(lse[:, 0].double(), scores.logsumexp(-1), atol=1e-5)


def test_no_stored_key_gives_zero_output_and_an_empty_log_sum_exp():
    q, k, v = _case(1, 4, 2, 16, 0)
    out, lse = decode.attend(q, k, v, 0.25)
    assert out.abs().max() == 0 and torch.isneginf(lse).all()


def test_padding_and_two_piece_positions_keep_their_own_paths(monkeypatch):
    """A key mask (padded batch) or a far piece (two-piece position methods) never reaches the kernel, which
    attends every key with one set of scores."""
    from longreach.kernels.far import FarKeys

    monkeypatch.setattr(decode, "faster", lambda *shape: True)
    monkeypatch.setattr(decode, "attend", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("kernel ran")))
    q, k, v = _case(2, 4, 2, 16, 64)
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[1, :10] = False  # the second sequence is left-padded
    sel = Selection.dense(2, 1, 64, key_mask=keep)
    want = reference.attend(q.double(), k.double(), v.double(), sel, 0.25)
    assert torch.allclose(gather.attend(q, k, v, sel, 0.25).double(), want, atol=2e-6)
    q1, k1, v1 = q[:1], k[:1], v[:1]
    far = FarKeys(q1 * 0.5, k1 * 0.5, 16)
    sel = Selection.dense(1, 1, 64)
    want = reference.attend(q1.double(), k1.double(), v1.double(), sel, 0.25,
                            FarKeys(far.q.double(), far.k.double(), far.distance))
    assert torch.allclose(gather.attend(q1, k1, v1, sel, 0.25, far).double(), want, atol=2e-6)


def test_the_kernel_runs_only_where_it_can_and_measured_faster(monkeypatch):
    q, k, v = _case(1, 4, 2, 16, 64)
    calls = []
    monkeypatch.setattr(decode, "attend", lambda *a, **kw: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    monkeypatch.setattr(decode, "faster", lambda *shape: False)
    want = _oracle(q, k, v, 0.25)
    assert torch.allclose(gather.attend(q, k, v, Selection.dense(1, 1, 64), 0.25).double(), want, atol=2e-6)
    assert not calls  # measured slower here: SDPA runs
    monkeypatch.setattr(decode, "faster", lambda *shape: True)
    fallback = gather._without_decode_kernel
    assert decode.serves(q, k, v, None, fallback)
    assert not decode.serves(q.double(), k.double(), v.double(), None, fallback)
    assert not decode.serves(torch.randn(1, 4, 2, 16), k, v, None, fallback)  # two query rows: not a decode step
    assert not decode.serves(q, k[..., :8], v[..., :8], None, fallback)  # narrower keys than queries
    with torch.enable_grad():
        assert not decode.serves(q, k.requires_grad_(), v, None, fallback)


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
