"""Lost in the middle: Attention Buckets (several RoPE bases) and positional-dimension scaling (posdim).

Oracles never go through longreach's re-rotation or scaling: buckets against the model's own attention run
once per base with transformers' rotary module rebuilt at that base; posdim against the model with its own
``apply_rotary_pos_emb`` wrapped to scale the dims before rotating.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
import transformers as tf
from conftest import ARCHS, prefill_then_steps, tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import longreach
from longreach.bench.e2e import run_rows
from longreach.errors import InputError, SpecError, UnsupportedModelError
from longreach.eval.runner import make_sweep
from longreach.heads.posdim import _Scorer, find_position_dims
from longreach.models import FAMILIES, tiny_family
from longreach.position.bucketruns import BucketRuns, combine_runs, running
from longreach.position.posdim import PositionDims, model_shape, position_scores
from longreach.serve.engine import servable


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _own_theta(model) -> float:
    params = model.config.get_text_config().rope_parameters
    return float(params.get("full_attention", params)["rope_theta"])


# -- identity settings ---------------------------------------------------------------------------------------

# the model's base written out (own: 10000.0, Gemma 3's global 1000000.0), and a file scaling 4 dims per layer by 1
IDENTITY = ["buckets:bases=1x", "buckets:bases=own", "buckets-runs:bases=1x", "buckets-runs:bases=own",
            "posdim:dims=3|13,scale=1.0", "posdim:file=DIMS,scale=1.0"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", IDENTITY)
def test_identity_settings_equal_dense_in_prefill_and_decode(arch, spec, tmp_path):
    model = tiny_model(arch)
    spec = spec.replace("own", repr(_own_theta(model)))
    if "DIMS" in spec:
        layers, head_dim = model_shape(model)
        PositionDims("", layers, head_dim, [[1.0] * head_dim] * layers).save(tmp_path / "dims.json")
        spec = spec.replace("DIMS", str(tmp_path / "dims.json")) + ",top=4,min_score=0.0"
    ids = torch.randint(0, 128, (1, 40))
    dense, dense_steps = model(ids).logits, prefill_then_steps(model, ids, 3)
    with longreach.apply(model, spec):
        got, steps = model(ids).logits, prefill_then_steps(model, ids, 3)
    assert float((got - dense).abs().max()) <= 1e-5
    assert float((steps - dense_steps).abs().max()) <= 1e-5


# -- Attention Buckets ---------------------------------------------------------------------------------------

def _buckets_oracle_logits(model, ids: torch.Tensor, bases: list[float]) -> torch.Tensor:
    """Every full-attention layer: the model's own attention forward once per base, with cos/sin from
    transformers' rotary class built on a config whose (global) rope_theta is that base; outputs averaged
    (o_proj is affine, so averaging after it equals averaging the attention outputs before it)."""
    rotary = model.model.rotary_emb
    per_type = "full_attention" in model.config.rope_parameters
    pos = torch.arange(ids.shape[1])[None]
    tables = []
    for base in bases:
        cfg = copy.deepcopy(model.config)
        params = cfg.rope_parameters["full_attention"] if per_type else cfg.rope_parameters
        params["rope_theta"] = base
        rot = type(rotary)(cfg)
        x = torch.zeros(1)
        tables.append(rot(x, pos, "full_attention") if per_type else rot(x, pos))
    attns = [layer.self_attn for layer in model.model.layers]

    def wrap(attn):
        own = attn.forward

        def forward(*args, **kwargs):
            if getattr(attn, "is_sliding", False):  # Gemma 3's local layers keep their own RoPE
                return own(*args, **kwargs)
            outs = [own(*args, **{**kwargs, "position_embeddings": table})[0] for table in tables]
            return sum(outs) / len(outs), None
        return forward

    try:
        for attn in attns:
            attn.forward = wrap(attn)
        return model(ids, use_cache=False).logits
    finally:
        for attn in attns:
            del attn.forward


@pytest.mark.parametrize("arch,bases", [("llama", (0.5, 3.0)), ("qwen2", (0.25, 1.0)), ("gemma3", (0.5, 3.0))])
def test_buckets_equal_the_mean_of_attention_under_each_base(arch, bases):
    """Prefill (one forward) and decode (prefill + 3 cached steps) against the oracle on the whole sequence."""
    model = tiny_model(arch)
    theta = _own_theta(model)
    ids = torch.randint(0, 128, (1, 48))
    want = _buckets_oracle_logits(model, ids, [b * theta for b in bases])
    dense = model(ids).logits
    spec = "buckets:bases=" + "|".join(f"{b}x" for b in bases)
    with longreach.apply(model, spec):
        got = model(ids).logits
        steps = prefill_then_steps(model, ids, 3)
    assert float((want - dense).abs().max()) > 5e-4  # the bases change the output 50x more than the tolerance
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps, want[:, -3:], atol=1e-5, rtol=1e-5)


def test_buckets_absolute_and_relative_bases_agree_and_specs_round_trip():
    model = tiny_model("llama")  # rope_theta 10000
    ids = torch.randint(0, 128, (1, 30))
    with longreach.apply(model, "buckets:bases=10000|17500|19000"):
        absolute = model(ids).logits
    with longreach.apply(model, "buckets:bases=1x|1.75x|1.9x"):
        relative = model(ids).logits
    torch.testing.assert_close(absolute, relative, atol=1e-6, rtol=1e-6)
    for spec in ("buckets", "buckets:bases=10000|17500", "posdim:dims=3|5,scale=0.25,on=k"):
        assert str(longreach.parse_spec(str(longreach.parse_spec(spec)))) == str(longreach.parse_spec(spec))
    for bad in ("buckets:bases=1x|1x", "buckets:bases=abc", "buckets:bases=-5", "posdim:dims=3,on=v",
                "posdim:dims=a|b", "posdim:dims=2|2", "posdim:dims=2,file=x.json"):
        with pytest.raises(SpecError):
            longreach.parse_spec(bad)
    with pytest.raises(SpecError, match="longreach heads posdim"):  # parses (defaults round-trip); apply says
        longreach.apply(model, "posdim")


# -- Attention Buckets as parallel runs (buckets-runs) -------------------------------------------------------

def _model_at_base(model, base: float):
    """An independent oracle: the same weights in a model built from a config whose (global) RoPE base is ``base``."""
    cfg = copy.deepcopy(model.config)
    params = cfg.get_text_config().rope_parameters
    params.get("full_attention", params)["rope_theta"] = base
    other = type(model)(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


def _combined(logits: list[torch.Tensor]) -> torch.Tensor:
    """The authors' rule, written out: run i weighted by exp(max_i) / sum_j exp(max_j), weighted logits summed."""
    tops = [float(x.detach().max()) for x in logits]
    weights = [math.exp(t - max(tops)) for t in tops]
    return sum(w / sum(weights) * x.double() for w, x in zip(weights, logits, strict=True))


@pytest.mark.parametrize("arch,bases", [("llama", (1.0, 3.0)), ("qwen2", (0.25, 1.0, 4.0)), ("gemma3", (0.5, 3.0))])
def test_buckets_runs_are_the_model_at_each_base_and_generate_the_combined_tokens(arch, bases, monkeypatch):
    model = tiny_model(arch)
    theta = _own_theta(model)
    oracles = [_model_at_base(model, b * theta) for b in bases]
    ids = torch.randint(0, 128, (1, 40))
    spec = "buckets-runs:bases=" + "|".join(f"{b}x" for b in bases)
    # prefill: row i of the batch is the model at base i, through the cache's decode steps too
    want = torch.cat([o(ids).logits for o in oracles])
    with longreach.apply(model, spec), running(len(bases)):
        got = model(ids.expand(len(bases), -1)).logits
        steps = prefill_then_steps(model, ids.expand(len(bases), -1), 3)
    assert float((want[0] - want[1]).abs().max()) > 1e-3  # the bases give different runs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps, want[:, -3:], atol=1e-5, rtol=1e-5)
    # generation: at every step the runs' logits (recorded) are the models' at each base on the sequence so far,
    # and every run is fed the argmax of what combine returned (oracle: a full recompute per step). The spy
    # negates the combination: on tiny random models every base tends to pick the same token, the least likely
    # one differs, so the tokens show that generate feeds combine's answer and not one run's
    seen = []
    real = BucketRuns.combine
    monkeypatch.setattr(BucketRuns, "combine", lambda self, logits: seen.append(logits) or -real(self, logits))
    with longreach.apply(model, spec):
        run = longreach.generate(model, ids, 6)
        assert run.prompt_kv_bytes == len(bases) * longreach.generate(tiny_model(arch), ids, 1).prompt_kv_bytes
    seq = ids
    for rows in seen:
        per_base = [o(seq).logits[0, -1] for o in oracles]
        torch.testing.assert_close(rows, torch.stack(per_base), atol=1e-5, rtol=1e-5)
        seq = torch.cat([seq, (-_combined(per_base)).argmax().view(1, 1)], dim=1)
    assert len(seen) == 6 and run.tokens == seq[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_buckets_runs_generate_on_every_family(family, monkeypatch):
    """Every family's rotary code runs per row (NoPE and chunked layers included: Llama 4; MLA's rotary part:
    DeepSeek-V3): through longreach.generate, the runs' logits at each cached step are the same weights' in a model
    built at each base, on the sequence so far."""
    model = tiny_family(family, max_positions=48)
    theta = _own_theta(model)
    oracles = [_model_at_base(model, b * theta) for b in (1.0, 0.01)]
    ids = torch.randint(3, 128, (1, 24))
    seen = []
    real = BucketRuns.combine
    monkeypatch.setattr(BucketRuns, "combine", lambda self, logits: seen.append(logits) or real(self, logits))
    with longreach.apply(model, "buckets-runs:bases=1x|0.01x"):
        run = longreach.generate(model, ids, 3)
    seq = ids
    for rows in seen:
        per_base = [o(seq).logits[0, -1] for o in oracles]
        torch.testing.assert_close(rows, torch.stack(per_base), atol=1e-4, rtol=1e-4)
        seq = torch.cat([seq, _combined(per_base).argmax().view(1, 1)], dim=1)
    assert len(seen) == 3 and run.tokens == seq[0, ids.shape[1]:].tolist()
    assert float((oracles[0](ids).logits - oracles[1](ids).logits).abs().max()) > 1e-4  # the bases differ


def test_plan_counts_every_run_of_buckets_runs():
    """The plan's KV after the prompt is the cache longreach.generate measured: each run holds its own."""
    from longreach.plan import plan_memory

    for arch in ("llama", "gemma3"):
        model = tiny_model(arch)
        ids = torch.randint(0, 128, (1, 30))
        with longreach.apply(model, "buckets-runs:bases=1x|2x|3x"):
            measured = longreach.generate(model, ids, 1).prompt_kv_bytes
        plan = plan_memory(model, longreach.parse_spec("buckets-runs:bases=1x|2x|3x"), 30, available=2**40)
        dense = plan_memory(model, longreach.parse_spec("dense"), 30, available=2**40)
        assert plan.kv_cache == measured == 3 * dense.kv_cache
        assert plan.activations > dense.activations and any("3 times" in n for n in plan.notes)


def test_combine_runs_weights_confident_runs_more():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    w = math.exp(2.0) / (math.exp(2.0) + math.exp(1.0))
    want = torch.tensor([2 * w, 0.0, 1 - w])
    torch.testing.assert_close(combine_runs(logits), want)
    assert int(combine_runs(logits).argmax()) == 0
    one = torch.randn(1, 7)
    torch.testing.assert_close(combine_runs(one), one[0])  # one run is itself


def test_buckets_runs_refuse_what_would_not_run_the_paper_form():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 20))
    with longreach.apply(model, "buckets-runs:bases=1x|2x"):
        with pytest.raises(InputError, match=r"longreach\.generate"):
            model(ids)  # a plain forward is not the runs
        with pytest.raises(InputError, match=r"longreach\.generate"):
            model(ids.expand(2, -1))  # nor a batch outside a generation
    for spec, reason in (("buckets-runs+snapkv:density=0.5", "each run would compress"),
                         ("buckets-runs+kvquant:bits=4", "each run would compress")):
        with pytest.raises(SpecError, match=reason):
            longreach.apply(model, spec)
    with pytest.raises(SpecError, match="once per RoPE base"):
        longreach.parse_spec("buckets-runs+homer")
    with pytest.raises(SpecError, match="listed twice"):
        longreach.parse_spec("buckets-runs:bases=1x|1x")
    assert str(longreach.parse_spec("buckets-runs:bases=1x|2x")) == "buckets-runs:bases=1x|2x"
    with pytest.raises(SpecError, match="server"):
        servable(longreach.parse_spec("buckets-runs"))
    with pytest.raises(InputError, match="perplexity"):
        make_sweep("m", "ppl", "dense;buckets-runs:bases=1x|2x", "4k")
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0)).eval()
    with pytest.raises(UnsupportedModelError, match="needs a RoPE model"):
        longreach.apply(gpt2, "buckets-runs")
    with pytest.raises(SpecError, match="same base twice"):
        longreach.apply(model, "buckets-runs:bases=1x|10000")  # the tiny Llama's own base is 10000
    with pytest.raises(InputError, match="--hf-generate"):
        run_rows("m", "text", [64], ["dense", "buckets-runs"], hf_generate=True)
    # one base is an ordinary forward: it composes like any rope change, and the server takes it
    longreach.parse_spec("buckets-runs:bases=2x+homer")
    servable(longreach.parse_spec("buckets-runs:bases=2x"))
    make_sweep("m", "ppl", "dense;buckets-runs:bases=2x", "4k")
    plain = model(ids).logits
    with longreach.apply(model, "buckets-runs:bases=2x+snapkv:density=0.5"):
        model(ids)
    torch.testing.assert_close(model(ids).logits, plain)  # removed: the model's own rotary modules are back


def test_buckets_runs_stack_a_select_method_and_chunk_and_stop_like_generate():
    """A select method chooses keys in each run as it would in the model at that base; a chunked prefill gives
    the same tokens; an EOS token ends the generation for every run."""
    model = tiny_model("llama")
    theta = _own_theta(model)
    ids = torch.randint(0, 128, (1, 64))
    oracles = [_model_at_base(model, b * theta) for b in (1.0, 3.0)]
    want = []
    for oracle in oracles:
        with longreach.apply(oracle, "quest:density=0.25,block=16"):
            want.append(oracle(ids).logits)
    with longreach.apply(model, "buckets-runs:bases=1x|3x+quest:density=0.25,block=16"), running(2):
        got = model(ids.expand(2, -1)).logits
    assert float((want[0] - oracles[0](ids).logits).abs().max()) > 1e-4  # quest left keys out
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)
    with longreach.apply(model, "buckets-runs:bases=1x|3x"):
        whole = longreach.generate(model, ids, 5)
        assert longreach.generate(model, ids, 5, chunk=16).tokens == whole.tokens
        stopped = longreach.generate(model, ids, 5, eos={whole.tokens[1]})
    assert stopped.tokens == whole.tokens[:2]


# -- posdim --------------------------------------------------------------------------------------------------

def _posdim_oracle_logits(model, ids: torch.Tensor, dims_of: dict[int, list[int]], scale: float, on: str
                          ) -> torch.Tensor:
    """The model with its own ``apply_rotary_pos_emb`` wrapped: on full-attention layers, dims ``dims_of[layer]``
    of q and/or k are multiplied by ``scale`` just before transformers rotates them."""
    attns = [layer.self_attn for layer in model.model.layers]
    modeling = sys.modules[type(attns[0]).__module__]
    rotate = modeling.apply_rotary_pos_emb
    current: list = [None]
    hooks = [a.register_forward_pre_hook(lambda mod, args: current.__setitem__(0, mod)) for a in attns]

    def scaled_rotary(q, k, cos, sin, *args, **kwargs):
        attn = current[0]
        dims = dims_of.get(attn.layer_idx, [])
        if dims and not getattr(attn, "is_sliding", False):
            w = torch.ones(q.shape[-1])
            w[dims] = scale
            q, k = (q * w if "q" in on else q), (k * w if "k" in on else k)
        return rotate(q, k, cos, sin, *args, **kwargs)

    modeling.apply_rotary_pos_emb = scaled_rotary
    try:
        return model(ids).logits
    finally:
        modeling.apply_rotary_pos_emb = rotate
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("arch,on", [("llama", "qk"), ("qwen2", "k"), ("mistral", "q"), ("gemma3", "qk")])
def test_posdim_equals_a_hook_that_scales_those_dims(arch, on):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 40))
    every = {layer: [3, 13] for layer in range(model.config.num_hidden_layers)}
    want = _posdim_oracle_logits(model, ids, every, 0.25, on)
    with longreach.apply(model, f"posdim:dims=3|13,scale=0.25,on={on}"):
        got, steps = model(ids).logits, prefill_then_steps(model, ids, 3)
    assert float((want - model(ids).logits).abs().max()) > 1e-4  # the scaling does change the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps, want[:, -3:], atol=1e-5, rtol=1e-5)  # decode: scaled cached keys


def test_posdim_file_scales_each_layers_own_best_dims(tmp_path):
    model = tiny_model("llama")  # 2 layers, head_dim 16
    scores = [[0.1] * 16 for _ in range(2)]
    scores[0][3], scores[0][9], scores[1][7], scores[1][2] = 0.9, 0.8, 0.95, 0.4
    path = PositionDims("", 2, 16, scores).save(tmp_path / "dims.json")
    ids = torch.randint(0, 128, (1, 40))
    for top, min_score, dims_of in [(1, 0.5, {0: [3], 1: [7]}), (2, 0.5, {0: [3, 9], 1: [7]}),
                                    (2, 0.0, {0: [3, 9], 1: [7, 2]})]:
        want = _posdim_oracle_logits(model, ids, dims_of, -1.0, "qk")
        with longreach.apply(model, f"posdim:file={path},scale=-1.0,top={top},min_score={min_score}"):
            got = model(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_position_scores_find_a_planted_positional_dimension():
    torch.manual_seed(1)
    x = torch.randn(1, 4, 300, 16)
    pos = torch.arange(300.0)
    x[:, 1:, :, 5] = 0.02 * pos - 3 + 0.3 * torch.randn(3, 300)  # three of four heads: monotonic + noise
    x[:, :, :, 11] = torch.sin(pos / 3)  # periodic in position: not monotonic
    x[:, :, :4, 5] = 50.0  # sink outliers in the skipped first tokens change nothing
    scores = position_scores(x, skip=4)
    assert int(scores.argmax()) == 5
    assert float(scores[5]) > 0.7 and float(scores[torch.arange(16) != 5].max()) < 0.25
    ties = torch.randn(1, 2, 200, 4)
    ties[..., 0] = 1.5  # constant
    ties[..., 1] = torch.randint(0, 3, (1, 2, 200)).float()  # few distinct values, as in bf16
    tied = position_scores(ties, skip=0)
    assert float(tied[0]) == 0.0 and float(tied[1]) < 0.25


def test_detection_scores_un_rotated_dims_not_slow_rotations():
    """Post-RoPE, a constant channel in a slowly rotating pair looks monotonic in position; the detector
    un-rotates each token first, so only the planted channel (dim 2, a position ramp before RoPE) scores."""
    t, dim = 300, 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim))
    pos = torch.arange(t)
    x0 = torch.randn(1, 2, t, dim) * 0.1 + torch.randn(1, 2, 1, dim)  # a constant vector + noise per token
    x0[..., 2] = 0.01 * pos
    angle = pos.double()[:, None] * inv_freq
    cos, sin = torch.cat([angle, angle], -1).cos().float(), torch.cat([angle, angle], -1).sin().float()
    q, k = apply_rotary_pos_emb(x0, x0, cos[None], sin[None], unsqueeze_dim=1)
    scorer = _Scorer(1, dim, 4, inv_freq, set())
    scorer(0, q, k, k, 0.25, None, None)
    scores = scorer.scores[0]
    assert int(scores.argmax()) == 2 and float(scores[torch.arange(dim) != 2].max()) < 0.3
    rotated = position_scores(q)
    assert float(rotated[torch.arange(dim) != 2].max()) > 0.7  # what a post-RoPE search would have picked


class _WordTokenizer:
    """Enough of a tokenizer for the detection probe: one id per word."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [hash(w) % 128 for w in text.split()]}


def test_detection_on_a_model_saves_and_loads_and_drives_posdim(tmp_path):
    model = tiny_model("gemma3")
    found = find_position_dims(model, _WordTokenizer(), " ".join(f"w{i % 97}" for i in range(400)), length=200)
    assert (found.layers, found.head_dim) == (4, 16) and found.probe["tokens"] == 200
    assert all(0 <= s <= 1 for row in found.scores for s in row)
    assert found.scores[0] == [0.0] * 16 and found.scores[2] == [0.0] * 16  # sliding layers: not scored
    assert max(found.scores[1]) > 0
    path = found.save(tmp_path / "dims.json")
    back = PositionDims.load(path)
    assert back == found
    best = {layer: found.best(layer, 1) for layer in range(4)}
    ids = torch.randint(0, 128, (1, 40))
    want = _posdim_oracle_logits(model, ids, best, 0.5, "qk")
    with longreach.apply(model, f"posdim:file={path},min_score=0.0"):
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_bad_files_and_models_are_refused(tmp_path):
    with pytest.raises(InputError, match="longreach heads posdim"):
        longreach.parse_spec(f"posdim:file={tmp_path / 'missing.json'}")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputError, match="not a longreach position dims file"):
        longreach.parse_spec(f"posdim:file={tmp_path / 'other.json'}")
    path = PositionDims("x", 3, 16, [[0.0] * 16] * 3).save(tmp_path / "three.json")
    with pytest.raises(InputError, match="3 layers"):
        longreach.apply(tiny_model("llama"), f"posdim:file={path}")
    with pytest.raises(InputError, match="head_dim 16"):
        longreach.apply(tiny_model("llama"), "posdim:dims=3|16")
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=0)).eval()
    for spec in ("buckets", "posdim:dims=3"):
        with pytest.raises(UnsupportedModelError, match="need a RoPE model"):
            longreach.apply(gpt2, spec)
    with pytest.raises(SpecError, match="drops keys"):
        longreach.apply(tiny_model("llama"), "buckets+snapkv:density=0.5")
