"""No silent no-op: every registered method, applied to a real (tiny) model, measurably does what it says.

Select methods attend fewer keys and change the output; presses and cache-shrinking head policies leave
fewer cache bytes; output hooks change the output; position methods change the output past the trained
window. A method added to the registry without a row here fails ``test_every_method_has_an_effect_row``.
Unsupported attention features are refused by ``apply()`` itself, before any forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import tiny_model
from test_heads import random_profile

import longreach
from longreach.cache.compressed import cache_bytes
from longreach.compat import cache_from_kwargs, cache_kwargs, output_cache
from longreach.errors import LongreachError, UnsupportedModelError
from longreach.methods.blocktopk import Quest
from longreach.spec import Spec

T = 160  # prompt tokens: past the tiny models' trained window below, and ten 16-token blocks
TRAINED = 96
P = "{profile}"

# name -> (spec on a tiny model, the effect to prove)
EFFECTS = {
    "dense": ("dense", "exact"),
    "quest": ("quest:density=0.3,block=16", "fewer-keys"),
    "moba": ("moba:density=0.3,block=16", "fewer-keys"),
    "anchor": ("anchor:density=0.3,block=16", "fewer-keys"),
    "flexprefill": ("flexprefill:density=0.3,block=16", "fewer-keys"),
    "hip": ("hip:density=0.3,block=16", "fewer-keys"),
    "hyper": ("hyper:density=0.3,block=16", "fewer-keys"),
    "loki": ("loki:density=0.3,block=16", "fewer-keys"),
    "longheads": ("longheads:density=0.3,block=16", "fewer-keys"),
    "recycled": ("recycled:density=0.3,block=16", "fewer-keys-decode"),  # dense prefill, as the paper
    "squeezed": ("squeezed:density=0.3,block=16", "fewer-keys"),
    "streaming": ("streaming:density=0.3,block=16", "fewer-keys"),
    "twilight": ("twilight:density=0.3,block=16", "fewer-keys"),
    "vslash": ("vslash:density=0.3,block=16", "fewer-keys"),
    "a2ats": ("a2ats:density=0.3,block=16", "fewer-keys-decode"),  # dense prefill, as the paper
    "ltri": ("ltri:density=0.3,block=16", "fewer-keys"),
    "duo": (f"duo:profile={P},ratio=0.5,window=16", "fewer-keys"),
    "lserve": (f"lserve:profile={P},ratio=0.5,window=16", "fewer-keys"),
    "ablate": (f"ablate:profile={P},top=0.25", "output"),
    "act": (f"act:profile={P},heads=1.0,alpha=1.0", "output"),  # every key past uniform share: act acts
    "snapkv": ("snapkv:density=0.3", "fewer-bytes"),
    "pyramidkv": ("pyramidkv:density=0.3", "fewer-bytes"),
    "h2o": ("h2o:density=0.3", "fewer-bytes"),
    "tova": ("tova:density=0.3", "fewer-bytes"),
    "finch": ("finch:density=0.3", "fewer-bytes"),
    "streamingkv": ("streamingkv:density=0.3", "fewer-bytes"),
    "razor": (f"razor:profile={P},ratio=0.5,window=16", "fewer-bytes"),
    "headkv": (f"headkv:profile={P},density=0.5,ratio=0.25", "fewer-bytes"),
    "kvquant": ("kvquant:bits=4,group=16,residual=16", "fewer-bytes"),
    "linear": ("linear:factor=2", "positions"),
    "dynamic": ("dynamic:factor=2", "positions"),
    "yarn": ("yarn:factor=2", "positions"),
    "llama3": ("llama3:factor=2", "positions"),
    "longrope": ("longrope:factor=2", "positions"),
    "selfextend": ("selfextend:group=4,window=32", "positions"),
    "gali": ("gali:window=32", "positions"),
    "string": ("string:shift=88,local=16", "positions"),  # reaches 168 tokens: T and a decode step
    "mspoe": ("mspoe:first_layer=0", "positions"),
    "buckets": ("buckets:bases=1x|0.01x", "output"),
    "posdim": ("posdim:dims=0|1,scale=0.25", "output"),
    "buckets-runs": ("buckets-runs:bases=0.01x", "output"),  # one run: a plain forward (several: test_lost_middle)
    "homer": ("homer:chunk=96,prefix=8,suffix=8,warmup=0", "procedure"),  # the cache holds one chunk
}


def test_every_method_has_an_effect_row():
    assert set(EFFECTS) == set(longreach.method_names())


def run(model, spec: str | None, ids: torch.Tensor):
    """Logits of a prefill and 4 decode steps, cache bytes right after the prefill, density per phase
    (``spec=None``: the model as transformers runs it)."""
    nxt = ids[:, :4]  # the same decode tokens for every run
    with torch.no_grad(), (longreach.apply(model, spec) if spec else contextlib.nullcontext()) as handle:
        out = model(ids, use_cache=True)
        logits, prompt_bytes = [out.logits[:, -1]], cache_bytes(output_cache(out))
        for i in range(nxt.shape[1]):
            out = model(nxt[:, i:i + 1], use_cache=True, **cache_kwargs(model, output_cache(out)))
            logits.append(out.logits[:, -1])
        density = {p: handle.density(p) for p in ("prefill", "decode")} if handle else {}
        return torch.stack(logits), prompt_bytes, density


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", sorted(EFFECTS))
def test_every_method_does_what_it_says_on_a_model(name, arch, tmp_path):
    model = tiny_model(arch, max_position_embeddings=TRAINED)
    cfg = model.config
    profile = random_profile(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads)
    spec, effect = EFFECTS[name]
    spec = spec.format(profile=profile.save(tmp_path / "p.json"))
    ids = torch.randint(1, 128, (1, T))
    if effect == "procedure":  # replaces the prefill (longreach.generate runs it): the cache holds one chunk
        if arch == "gemma3":  # sliding layers: refused by apply, with the families it drives
            with pytest.raises(UnsupportedModelError, match="supported"):
                longreach.apply(model, spec)
            return
        with torch.no_grad(), longreach.apply(model, spec):
            got = longreach.generate(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 2)
        assert got.prompt_kv_bytes < 0.8 * run(model, "dense", ids)[1]
        return
    dense_logits, dense_bytes, _ = run(model, "dense", ids)  # longreach's dense: the same cache layers
    logits, kept_bytes, density = run(model, spec, ids)
    changed = float((logits - dense_logits).abs().max())
    if effect == "exact":  # the model's own attention, token for token; cache bytes as transformers stores them
        plain_logits, plain_bytes, _ = run(model, None, ids)
        assert float((logits - plain_logits).abs().max()) < 1e-4 and density["prefill"] == pytest.approx(1.0)
        assert kept_bytes == plain_bytes
    elif effect.startswith("fewer-keys"):
        phase = "decode" if effect.endswith("decode") else "prefill"
        assert density[phase] < 0.9, f"{spec} attended {density[phase]} of the causal pairs in {phase}"
        assert changed > 1e-4, f"{spec} left the output as dense"
    elif effect == "fewer-bytes":
        assert kept_bytes < 0.8 * dense_bytes, f"{spec} kept {kept_bytes} of {dense_bytes} cache bytes"
    else:  # output hooks change the output; position methods change it past the trained window
        assert effect in ("output", "positions")
        assert changed > 1e-4, f"{spec} left the output as dense"


@pytest.mark.parametrize("spec", ["snapkv:density=0.3", "razor:profile={profile},ratio=0.5,window=16"])
def test_a_press_with_no_cache_to_compress_is_refused(spec, tmp_path):
    model = tiny_model("llama")
    spec = spec.format(profile=random_profile().save(tmp_path / "p.json"))
    with torch.no_grad(), longreach.apply(model, spec), pytest.raises(LongreachError, match="no cache"):
        model(torch.randint(1, 128, (1, 40)), use_cache=False)


def test_the_cache_is_found_under_its_old_and_its_new_name():
    cache = object()
    assert cache_from_kwargs({"cache": cache}) is cache  # transformers >= 5.24
    assert cache_from_kwargs({"past_key_values": cache}) is cache  # transformers 5.23
    assert cache_from_kwargs({"past_key_value": cache}) is cache  # older layer signature
    assert cache_from_kwargs({"cache": None, "hidden_states": 1}) is None


def test_the_model_cache_argument_follows_the_installed_forward_signature():
    import inspect

    model = tiny_model("llama")
    (name,) = cache_kwargs(model, None)
    assert name in inspect.signature(type(model).forward).parameters


@pytest.mark.parametrize("name", ["old", "new"])
def test_a_press_compresses_with_the_cache_under_either_name(name):
    """The attention modules' pre-hook is handed the cache as transformers of each version names it."""
    from longreach.hf import _RUNTIMES

    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 100))
    with torch.no_grad(), longreach.apply(model, "snapkv:density=0.3"):
        for module, runtime in _RUNTIMES.items():
            hook = runtime.before_forward
            rename = "past_key_values" if name == "old" else "cache"

            def renamed(mod, args, kwargs, hook=hook, rename=rename):
                cache = cache_from_kwargs(kwargs)
                return hook(mod, args, {rename: cache})
            module._forward_pre_hooks.clear()
            module.register_forward_pre_hook(renamed, with_kwargs=True)
        out = model(ids, use_cache=True)
    full = cache_bytes(output_cache(model(ids, use_cache=True)))
    assert cache_bytes(output_cache(out)) < 0.5 * full


def gemma2():
    import transformers as tf

    cfg = tf.Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16)
    return tf.Gemma2ForCausalLM(cfg).eval()


def gpt_oss():
    import transformers as tf

    cfg = tf.GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=16)
    return tf.GptOssForCausalLM(cfg).eval()


def deepseek_v3():
    return tiny_model("deepseek-v3")


def own_softmax_selector() -> Spec:
    """A selector declaring that its own softmax leaves the model's softcap and sinks out (every shipped method
    now includes them; this stands for the next one), built without registering it."""

    @dataclass(frozen=True)
    class PlainSoftmaxQuest(Quest):
        scores_attention: ClassVar[bool] = True

    return Spec((PlainSoftmaxQuest(density=0.3),))


@pytest.mark.parametrize(("build", "spec", "reason"), [
    (gemma2, own_softmax_selector(), "softcapping"),  # the kernels cap scores; this method's softmax does not
    (gpt_oss, own_softmax_selector(), "attention-sink logits"),
    (deepseek_v3, "kvquant:bits=8", "one latent per token")])  # MLA: no per-head keys to re-store
def test_attention_the_kernels_or_a_method_lack_is_refused_by_apply_with_its_reason(build, spec, reason):
    model = build()
    before = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=reason):
        longreach.apply(model, spec)
    assert model.config._attn_implementation == before  # nothing was switched


def test_a_position_method_on_a_model_without_rope_is_refused_by_apply():
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)).eval()
    with pytest.raises(UnsupportedModelError, match="rotary"):
        longreach.apply(model, "yarn:factor=2")


@pytest.mark.parametrize("spec", ["quest:density=0.3,block=16", "snapkv:density=0.3", "selfextend:group=4,window=32"])
def test_a_model_whose_every_layer_slides_is_refused_for_methods_that_act_on_layers(spec):
    """Mistral-7B-v0.1 style (sliding_window set, no per-layer types): the runtime leaves a model's own sliding
    layers as they are, so these specs would silently change nothing."""
    model = tiny_model("mistral", sliding_window=4096)
    with pytest.raises(UnsupportedModelError, match="sliding-window layer"):
        longreach.apply(model, spec)
    with longreach.apply(model, "yarn:factor=2"):  # rotary modules are swapped: still does what it says
        pass


def test_a_selector_stacked_before_a_head_policy_still_chooses_the_long_heads_keys(tmp_path):
    model = tiny_model("llama")
    profile = random_profile().save(tmp_path / "p.json")
    ids = torch.randint(1, 128, (1, 300))
    density = {}
    for spec in (f"razor:profile={profile},ratio=0.5,window=16",
                 f"quest:density=0.1,block=16+razor:profile={profile},ratio=0.5,window=16"):
        with torch.no_grad(), longreach.apply(model, spec) as handle:
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            density[spec.split(":")[0]] = handle.density("decode")
    assert density["quest"] < 0.5 * density["razor"]  # quest picks 10% of the long heads' keys while decoding


def test_rope_scaling_on_a_model_that_already_scales_rope_is_refused():
    model = tiny_model("llama", rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 1024,
                                                 "rope_theta": 10000.0})
    for spec in ("yarn:factor=2", "linear:factor=1", "llama3:factor=8"):
        with pytest.raises(UnsupportedModelError, match="already scales RoPE"):
            longreach.apply(model, spec)


def test_mspoe_that_would_leave_every_layer_alone_is_refused():
    with pytest.raises(LongreachError, match="first_layer"):
        longreach.apply(tiny_model("llama"), "mspoe")  # 2 layers, first_layer=2 by default


def test_block_summaries_are_not_reused_under_a_position_remap():
    """GALI re-rotates every key at each forward: a summary-based selector must score the keys it is given, as it
    does with no incremental summaries at all (the reference)."""
    from longreach.hf import _RUNTIMES

    model = tiny_model("llama", max_position_embeddings=TRAINED)
    ids = torch.randint(1, 128, (1, 150))
    spec = "gali:window=32+quest:budget=64,block=16"
    logits = []
    for keep_summaries in (True, False):
        with torch.no_grad(), longreach.apply(model, spec) as handle:
            if not keep_summaries:
                for runtime in _RUNTIMES.values():
                    if runtime.handle is handle:
                        runtime.summaries = None
            out = model(ids[:, :-1], use_cache=True)
            for _ in range(3):
                out = model(ids[:, -1:], use_cache=True, **cache_kwargs(model, output_cache(out)))
            logits.append(out.logits)
    assert float((logits[0] - logits[1]).abs().max()) < 1e-5
