"""One generation path: ``model.generate()`` under ``apply`` gets what ``longreach.generate()`` gets — the same
tokens, the cache grown in place, and after a press the same (compressed) cache bytes. That the first answer
token reads the compressed cache (the runtime holds the prompt's last token back) is checked against a dense
reference restricted to the kept keys in tests/test_presses.py and tests/test_heads.py."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_heads import random_profile

import longreach
from longreach.cache.growing import GrowingLayer
from longreach.compat import output_cache

SPECS = ["dense", "quest:density=0.3,block=16", "snapkv:density=0.3", "h2o:density=0.3",
         "razor:profile={profile},ratio=0.5,window=16", "duo:profile={profile},ratio=0.5,window=16"]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("spec", SPECS)
def test_model_generate_under_apply_equals_longreach_generate(spec, arch, tmp_path):
    model = tiny_model(arch)
    cfg = model.config
    spec = spec.format(profile=random_profile(cfg.num_hidden_layers, cfg.num_attention_heads,
                                              cfg.num_key_value_heads).save(tmp_path / "p.json"))
    ids = {"input_ids": torch.randint(1, 128, (1, 150)), "attention_mask": torch.ones(1, 150, dtype=torch.long)}
    with torch.no_grad(), longreach.apply(model, spec):
        ours = longreach.generate(model, ids, 8)
        theirs = model.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                return_dict_in_generate=True)
    assert theirs.sequences[0, 150:].tolist() == ours.tokens
    cache = output_cache(theirs)
    # the same tokens held per layer; longreach.generate() reserved exactly its length, model.generate() could not
    assert [layer.get_seq_length() for layer in cache.layers] == [layer.get_seq_length() for layer in ours.cache.layers]
    assert longreach.cache_bytes(ours.cache) <= longreach.cache_bytes(cache)
    full_layers = [layer for layer in cache.layers if not layer.is_sliding]
    assert all(isinstance(layer, GrowingLayer) for layer in full_layers), "decode appends in place"


def test_bench_times_model_generate_on_the_same_path():
    """The bench row for model.generate() counts the decoded tokens from its streamer and holds the cache bytes
    longreach.generate() holds (a row that timed another path would differ here)."""
    from longreach.bench.e2e import HF_PATH, _hf_generate_row

    model = tiny_model("llama")
    ids = {"input_ids": torch.randint(1, 128, (1, 150)), "attention_mask": torch.ones(1, 150, dtype=torch.long)}
    with torch.no_grad(), longreach.apply(model, "snapkv:density=0.3"):
        row = _hf_generate_row(model, ids, 150, "snapkv:density=0.3", 6)
        ours = longreach.generate(model, ids, 6)
    assert row["method"] == "snapkv:density=0.3" + HF_PATH and row["decode_tokens"] == 5
    # the same tokens: model.generate()'s cache keeps the room it grew by, longreach.generate() reserved exactly
    held = longreach.cache_bytes(ours.cache)
    assert held == longreach.cache_bytes(ours.cache, room=False) <= row["kv_bytes"] < 1.5 * held
    assert row["ttft_s"] > 0 and row["decode_tok_s"] > 0


def test_generate_takes_a_tensor_of_ids():
    """A plain tensor of ids, (n,) or (1, n), decodes exactly as the tokenizer-shaped input does (greedy, without
    apply: transformers' own generate is the oracle); a batch or an empty prompt is refused with the shape."""
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 40))
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                                do_sample=False)
    assert longreach.generate(model, ids, 6).tokens == theirs[0, 40:].tolist()
    assert longreach.generate(model, ids[0], 6).tokens == theirs[0, 40:].tolist()
    for bad in (ids.repeat(2, 1), ids[:, :0]):
        with pytest.raises(longreach.errors.InputError, match="one non-empty prompt"):
            longreach.generate(model, bad, 6)
    with pytest.raises(longreach.errors.InputError, match="tokenizer's output"):
        longreach.generate(model, [1, 2, 3], 6)


def test_leads_are_the_chosen_tokens_probability_over_the_runner_up():
    """Each generated token's lead (its probability minus the runner-up's) against transformers' own generate
    with its logits returned (greedy, no apply); under a sparse spec too, against model.generate() on the same
    path."""
    model = tiny_model("llama")
    ids = torch.randint(1, 128, (1, 60))
    for spec in ("dense", "quest:density=0.3,block=16"):
        with torch.no_grad(), longreach.apply(model, spec):
            ours = longreach.generate(model, ids, 6)
            theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True)
        top = torch.stack(theirs.logits).float().softmax(-1).topk(2).values  # (steps, 1, 2)
        assert ours.tokens == theirs.sequences[0, 60:].tolist()
        assert ours.leads == pytest.approx((top[:, 0, 0] - top[:, 0, 1]).tolist(), abs=1e-5)
        assert all(0 <= lead <= 1 for lead in ours.leads)


def test_answer_lead_is_the_smallest_lead_until_the_answer_reached_its_score():
    from longreach.eval.measure import answer_lead

    text = lambda tokens: "".join(tokens)  # noqa: E731  tokens are strings here: the decode is a join
    exact = lambda answer: float("42" in answer)  # noqa: E731
    assert answer_lead(["4", "2", "."], [0.5, 0.01, 0.9], text, exact) == 0.01
    # the '.' closed the answer ("42" could have gone on as "423"): its lead counts ...
    assert answer_lead(["4", "2", ".", "x"], [0.5, 0.3, 0.02, 0.0], text, exact) == 0.02
    # ... but not a token after text that already ended outside a word
    assert answer_lead(["42", " .", "x"], [0.5, 0.03, 0.0], text, lambda a: float("42 " in a or "42." in a)) == 0.03
    assert answer_lead(["4", "2 ", "x"], [0.5, 0.3, 0.0], text, lambda a: float("42 " in a)) == 0.3
    assert answer_lead([" ", "42"], [0.2, 0.9], text, exact) == 0.2  # a leading token of the answer counts
    assert answer_lead(["1", "1"], [0.9, 0.9], text, exact) is None  # no score: no answer to have led
    half = lambda answer: ("1" in answer) / 2 + ("2" in answer) / 2  # noqa: E731  partial credit: its final score
    assert answer_lead(["1", "x", "2", " y"], [0.8, 0.7, 0.6, 0.01], text, half) == 0.01  # ' y' closed the '2'
    assert answer_lead(["1", "x", "2 ", "y"], [0.8, 0.7, 0.6, 0.01], text, half) == 0.6
