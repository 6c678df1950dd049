"""apply()/remove() on tiny random Llama, Qwen2, Mistral and Gemma 3 models."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, tiny_model

import longreach
from longreach import LongreachError, UnsupportedModelError

FULL = ["dense", "quest:budget=100000,block=16", "moba:density=1.0,block=16", "streaming:window=100000",
        "hip:density=1.0,block=16", "twilight:density=1.0,block=16", "vslash:budget=100000,block=16",
        "flexprefill:budget=100000,block=16,decode=dense"]
NEW_SELECTORS = ["hip", "twilight", "flexprefill", "vslash", "squeezed", "loki", "hyper", "longheads", "anchor",
                 "recycled"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", FULL)
def test_full_budget_prefill_matches_sdpa(arch, spec):
    model = tiny_model(arch)
    x = torch.randint(0, 128, (2, 90))
    with torch.no_grad():
        ref = model(x).logits
        with longreach.apply(model, spec) as handle:
            out = model(x).logits
        assert handle.density("prefill") == pytest.approx(1.0)
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_full_budget_gives_the_same_tokens_and_remove_restores(arch):
    model = tiny_model(arch)
    x = torch.randint(0, 128, (1, 70))
    with torch.no_grad():
        before = model(x).logits
        dense_tokens = model.generate(x, max_new_tokens=24, do_sample=False)
        with longreach.apply(model, "quest:budget=100000,block=16") as handle:
            ours = model.generate(x, max_new_tokens=24, do_sample=False)
            assert model.config._attn_implementation == "longreach"
        assert handle.density("decode") == pytest.approx(1.0)
        after = model(x).logits
    assert torch.equal(ours, dense_tokens)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(before, after), "remove() must restore bit-identical dense outputs"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sparse_generate_runs_decode_from_incremental_summaries(arch):
    model = tiny_model(arch)
    x = torch.randint(0, 128, (1, 200))
    with torch.no_grad(), longreach.apply(model, "quest:budget=64,block=16,window=16") as handle:
        out = model.generate(x, max_new_tokens=40, min_new_tokens=40, do_sample=False)
        runtimes = [rt for m, rt in longreach.hf._RUNTIMES.items() if rt.handle is handle]
        summarised = [rt.summaries for rt in runtimes if rt.summaries is not None and rt.summaries.blocks_done]
        assert summarised, "decode must keep block summaries beside the cache"
        assert all(s.blocks_done == (200 + 39) // 16 for s in summarised)
        assert all(s.rebuilds == 0 for s in summarised), "summaries were recomputed over the whole cache"
        assert handle.density("decode") < 0.5
    assert out.shape == (1, 240)


def test_sparse_prefill_equals_reference_kernel_inside_the_model():
    """The same model run with gather and with the reference kernel gives the same logits."""
    model = tiny_model("llama")
    x = torch.randint(0, 128, (1, 150))
    with torch.no_grad():
        with longreach.apply(model, "moba:budget=48,block=16", kernel="gather"):
            a = model(x).logits
        with longreach.apply(model, "moba:budget=48,block=16", kernel="reference"):
            b = model(x).logits
        dense = model(x).logits
    assert (a - b).abs().max().item() < 1e-4
    assert (a - dense).abs().max().item() > 1e-3, "a sparse method should change something"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_padded_batches_match_sdpa_on_real_tokens(arch):
    model = tiny_model(arch)
    x = torch.randint(0, 128, (2, 60))
    attn = torch.ones(2, 60, dtype=torch.long)
    attn[0, :9] = 0  # left padding
    with torch.no_grad():
        ref = model(x, attention_mask=attn).logits
        with longreach.apply(model, "quest:budget=100000,block=16"):
            out = model(x, attention_mask=attn).logits
            gen = model.generate(x, attention_mask=attn, max_new_tokens=8, do_sample=False)
        ref_gen = model.generate(x, attention_mask=attn, max_new_tokens=8, do_sample=False)
    real = attn.bool()
    assert (out - ref)[real].abs().max().item() < 1e-4
    assert torch.equal(gen, ref_gen)


def test_custom_4d_masks_are_refused_not_silently_wrong():
    model = tiny_model("llama")
    x = torch.randint(0, 128, (1, 16))
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)  # bidirectional: not something we reproduce
    with longreach.apply(model, "dense"), pytest.raises(LongreachError, match="not causal"):
        model(x, attention_mask=mask)


def test_apply_twice_and_unsupported_models_fail_clearly():
    model = tiny_model("llama")
    with longreach.apply(model, "dense"), pytest.raises(LongreachError, match="already applied"):
        longreach.apply(model, "quest")
    with pytest.raises(UnsupportedModelError, match="Linear"):
        longreach.apply(torch.nn.Linear(2, 2), "dense")


def test_non_causal_model_is_refused():
    import transformers as tf

    bert = tf.BertModel(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="non-causal"):
        longreach.apply(bert, "dense")


def test_bad_spec_fails_before_touching_the_model():
    model = tiny_model("llama")
    with pytest.raises(longreach.SpecError):
        longreach.apply(model, "quest:budget=-1")
    with pytest.raises(longreach.SpecError, match="unknown kernel"):
        longreach.apply(model, "dense", kernel="triton")
    assert model.config._attn_implementation == "sdpa"


def test_attention_without_a_handle_explains_itself():
    model = tiny_model("llama")
    handle = longreach.apply(model, "dense")
    handle.remove()
    handle.remove()  # idempotent
    model.set_attn_implementation("longreach")
    with pytest.raises(LongreachError, match=r"longreach.apply"):
        model(torch.randint(0, 128, (1, 8)))


@pytest.mark.parametrize("name", NEW_SELECTORS)
def test_every_method_generates_sparsely_through_the_model(name):
    """Prefill and decode inside a real (tiny) model, with the per-layer state a method keeps."""
    model = tiny_model("qwen2")
    x = torch.randint(0, 128, (1, 200))
    spec = f"{name}:budget=64,block=16,window=16,sinks=4"
    with torch.no_grad(), longreach.apply(model, spec) as handle:
        out = model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        again = model.generate(x, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(out, again), "state from the first sequence leaked into the second"
    assert handle.density("decode") < 0.6
    if name == "recycled":
        assert handle.density("prefill") == pytest.approx(1.0)
    else:
        assert handle.density("prefill") < 0.6
