"""Context extension: rope types configured through transformers, attention-level re-mapping by re-rotation."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import ARCHS, prefill_then_steps, tiny_model
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import longreach
from longreach.compat import cache_kwargs, output_cache
from longreach.errors import InputError, SpecError
from longreach.kernels import FarKeys, gather, reference
from longreach.methods.base import SelectContext
from longreach.methods.registry import method_class
from longreach.position import rerotate, rope_info
from longreach.selection import Selection
from longreach.spec import parse_spec

TRAINED = 64  # tiny models' max_position_embeddings: inputs past it need extension
IDENTITY = ["selfextend:window=16", "selfextend:group=1,window=16", "string:shift=60,local=8",
            "mspoe:min_ratio=1.0,max_ratio=1.0", "linear:factor=1.0", "dynamic:factor=1.0", "yarn:factor=1.0",
            "llama3:factor=1.0", "longrope:factor=1.0", "gali:window=8"]


def _rope_tables(inv_freq: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin as transformers builds them, for (possibly per-head) positions."""
    angle = pos.double().unsqueeze(-1) * inv_freq.double()
    emb = torch.cat([angle, angle], dim=-1)
    return emb.cos().float(), emb.sin().float()


def _rotate(x: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    cos, sin = _rope_tables(inv_freq, pos)
    if pos.dim() == 1:  # (T, D) -> (1, 1, T, D); per head (H, T, D) -> (1, H, T, D)
        cos, sin = cos[None], sin[None]
    out, _ = apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=1 if pos.dim() == 1 else 0)
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", IDENTITY)
def test_identity_settings_equal_dense_within_trained_length(arch, spec):
    model = tiny_model(arch, max_position_embeddings=TRAINED)
    ids = torch.randint(0, 128, (1, 50))
    dense = model(ids).logits
    with longreach.apply(model, spec):
        got = model(ids).logits
    torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids).logits, dense, atol=0, rtol=0)  # removed: the model is as before


def test_rerotation_equals_rope_at_the_new_positions():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).double() / 16))
    x = torch.randn(2, 3, 40, 16)
    pos = torch.arange(40)
    new = torch.randint(-30000, 30000, (40,)).double() + torch.rand(40).double()
    got = rerotate(_rotate(x, inv_freq, pos), new - pos, inv_freq)
    torch.testing.assert_close(got, _rotate(x, inv_freq, new), atol=2e-4, rtol=1e-4)
    per_head = torch.rand(3, 40).double() * 100
    got = rerotate(_rotate(x, inv_freq, pos), per_head - pos, inv_freq)
    torch.testing.assert_close(got, _rotate(x, inv_freq, per_head), atol=2e-4, rtol=1e-4)


def test_partial_rotary_leaves_the_unrotated_dimensions():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).double() / 8))  # 8 of 16 dimensions rotate
    x = torch.randn(1, 2, 5, 16)
    got = rerotate(x, torch.full((5,), 7.0), inv_freq)
    torch.testing.assert_close(got[..., 8:], x[..., 8:])
    assert not torch.allclose(got[..., :8], x[..., :8])


def _explicit_two_piece(q0, k0, v, inv_freq, near_q, near_k, far_q, far_k, distance, scale, softcap=None,
                        sinks=None):
    """Attention recomputed from un-rotated q/k: each pair scored with RoPE at the positions of its piece; then
    Gemma 2's cap * tanh(s / cap) and GPT-OSS's per-head sink logit in the denominator, when given."""
    group = q0.shape[1] // k0.shape[1]
    k0, v = k0.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    near = _rotate(q0, inv_freq, near_q) @ _rotate(k0, inv_freq, near_k).transpose(-1, -2)
    far = _rotate(q0, inv_freq, far_q) @ _rotate(k0, inv_freq, far_k).transpose(-1, -2)
    t_q, t_k = q0.shape[2], k0.shape[2]
    pq = torch.arange(t_k - t_q, t_k)[:, None]
    pk = torch.arange(t_k)[None, :]
    scores = torch.where(pq - pk >= distance, far, near) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(pk > pq, float("-inf"))
    if sinks is None:
        return (scores.softmax(-1) @ v).transpose(1, 2)
    sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    weights = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]  # the sink takes mass and gives nothing
    return (weights @ v).transpose(1, 2)


@pytest.mark.parametrize("t_q,t_k", [(90, 90), (17, 90), (1, 90)])
@pytest.mark.parametrize("kernel", ["reference", "gather"])
def test_selfextend_equals_rope_recomputed_at_grouped_positions(t_q, t_k, kernel):
    dim, group, window = 16, 3, 12
    rope = longreach.position.RopeInfo(1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim)), trained=40)
    q0, k0, v = torch.randn(1, 4, t_q, dim), torch.randn(1, 2, t_k, dim), torch.randn(1, 2, t_k, dim)
    pq, pk = torch.arange(t_k - t_q, t_k), torch.arange(t_k)
    q, k = _rotate(q0, rope.inv_freq, pq), _rotate(k0, rope.inv_freq, pk)
    method = method_class("selfextend")(group=group, window=window)
    view = method.view(q, k, rope, {})
    assert view.far is not None and view.far.distance == window
    sel = Selection.dense(1, t_q, t_k)
    got = longreach.attend(view.q, view.k, v, sel, 0.25, kernel, far=view.far)
    want = _explicit_two_piece(q0, k0, v, rope.inv_freq, pq, pk, pq // group + window - window // group,
                               pk // group, window, 0.25)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t_q", [90, 1])
@pytest.mark.parametrize("kernel", ["reference", "gather"])
@pytest.mark.parametrize("extra", ["softcap", "sinks", "both"])
def test_the_two_piece_path_applies_a_softcap_and_learned_sinks(t_q, kernel, extra):
    """Self-Extend's far keys on Gemma 2 / GPT-OSS style attention: the cap bends both pieces' scores and the sink
    joins one softmax over both, as recomputed from un-rotated q/k."""
    dim, group, window, t_k = 16, 3, 12, 90
    rope = longreach.position.RopeInfo(1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim)), trained=40)
    q0, k0, v = torch.randn(1, 4, t_q, dim) * 3, torch.randn(1, 2, t_k, dim), torch.randn(1, 2, t_k, dim)
    pq, pk = torch.arange(t_k - t_q, t_k), torch.arange(t_k)
    view = method_class("selfextend")(group=group, window=window).view(
        _rotate(q0, rope.inv_freq, pq), _rotate(k0, rope.inv_freq, pk), rope, {})
    softcap = 2.0 if extra in ("softcap", "both") else None
    sinks = torch.tensor([0.5, 3.0, -1.0, 6.0]) if extra in ("sinks", "both") else None
    got = longreach.attend(view.q, view.k, v, Selection.dense(1, t_q, t_k), 0.25, kernel, far=view.far,
                           softcap=softcap, sinks=sinks)
    args = (q0, k0, v, rope.inv_freq, pq, pk, pq // group + window - window // group, pk // group, window, 0.25)
    torch.testing.assert_close(got, _explicit_two_piece(*args, softcap=softcap, sinks=sinks), atol=1e-4, rtol=1e-4)
    assert (got - _explicit_two_piece(*args)).abs().max().item() > 1e-3  # the extra is not negligible here


def test_string_equals_rope_recomputed_at_shifted_positions():
    dim, shift, local = 16, 30, 6
    rope = longreach.position.RopeInfo(1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim)), trained=64)
    q0, k0, v = torch.randn(1, 4, 70, dim), torch.randn(1, 2, 70, dim), torch.randn(1, 2, 70, dim)
    pos = torch.arange(70)
    q, k = _rotate(q0, rope.inv_freq, pos), _rotate(k0, rope.inv_freq, pos)
    view = method_class("string")(shift=shift, local=local).view(q, k, rope, {})
    got = gather.attend(view.q, view.k, v, Selection.dense(1, 70, 70), 0.25, view.far)
    want = _explicit_two_piece(q0, k0, v, rope.inv_freq, pos, pos, pos - shift + local, pos, shift, 0.25)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t_q", [100, 9, 1])
def test_gali_equals_interpolated_logits_of_floor_and_ceil_positions(t_q):
    """Paper's rule: the query at ceil(p_q); a key at p = m + a scores (1 - a) s(m) + a s(m + 1)."""
    dim, t_k = 16, 100
    rope = longreach.position.RopeInfo(1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim)), trained=40)
    q0, k0, v = torch.randn(1, 4, t_q, dim), torch.randn(1, 2, t_k, dim), torch.randn(1, 2, t_k, dim)
    pq, pk = torch.arange(t_k - t_q, t_k), torch.arange(t_k)
    method = method_class("gali")(window=8)
    view = method.view(_rotate(q0, rope.inv_freq, pq), _rotate(k0, rope.inv_freq, pk), rope, {})
    got = reference.attend(view.q, view.k, v, Selection.dense(1, t_q, t_k), 0.25)
    pos = method.positions(t_k, rope.trained)
    qr = _rotate(q0, rope.inv_freq, pos[-t_q:].ceil())
    kr = k0.repeat_interleave(2, 1)
    low = qr @ _rotate(kr, rope.inv_freq, pos.floor()).transpose(-1, -2)
    high = qr @ _rotate(kr, rope.inv_freq, pos.floor() + 1).transpose(-1, -2)
    frac = (pos - pos.floor()).float()
    scores = ((1 - frac) * low + frac * high) * 0.25
    scores = scores.masked_fill(pk[None, :] > pq[:, None], float("-inf"))
    want = (scores.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("length", [40, 41, 79, 80, 81, 500, 5000])
@pytest.mark.parametrize("window", [0, 8])
def test_gali_positions_stay_below_the_trained_length(length, window):
    pos = method_class("gali")(window=window).positions(length, 40)
    assert len(pos) == length and bool((pos.diff() > 0).all())
    assert float(pos.max()) == min(length, 40) - 1  # the newest token: an integer, at most trained - 1
    if length > 40 and window:
        assert int((pos[-window:].diff() == 1).sum()) == window - 1  # the newest keep unit spacing


@pytest.mark.parametrize("length", [64, 65, 100, 1000, 4097, 32768, 100_000])
@pytest.mark.parametrize("window", [1, 16, 48])
def test_grouped_positions_never_exceed_the_trained_maximum(length, window):
    method = method_class("selfextend")(window=window)
    group = method.group_for(length, TRAINED)
    pq, pk = torch.arange(length), torch.arange(length)
    near_max = min(window - 1, length - 1)
    far_q = pq // group + window - window // group
    far_k = pk // group
    far_rel = far_q[:, None] - far_k[None, :] if length <= 1000 else (far_q[-1] - far_k[0]).view(1, 1)
    assert max(near_max, int(far_rel.max())) < TRAINED
    if length <= TRAINED:
        assert group == 1  # within the trained length nothing is grouped


def test_selfextend_refuses_a_group_too_small_for_the_input():
    with pytest.raises(InputError, match="raise group"):
        method_class("selfextend")(group=2, window=16).group_for(200, TRAINED)


def test_string_refuses_inputs_it_cannot_keep_in_range():
    method = method_class("string")(local=8)
    assert method.shift_for(100, TRAINED) < TRAINED
    with pytest.raises(InputError, match="selfextend"):
        method.shift_for(2 * TRAINED, TRAINED)


def _max_grouped_relative(length: int, group: int, window: int) -> int:
    """Self-Extend's largest relative position at ``length`` tokens, from its grouped positions written out."""
    pq = torch.arange(length)
    far = pq // group + window - window // group  # the last query's grouped position; the first key's is 0
    return max(min(window, length) - 1, int(far[-1]))


def _max_shifted_relative(length: int, shift: int, local: int) -> int:
    """STRING's largest relative position at ``length`` tokens: r, or r - shift + local from r = shift on."""
    r = torch.arange(length)
    return int(torch.where(r >= shift, r - shift + local, r).max())


@pytest.mark.parametrize(("group", "window"), [(2, 16), (3, 8), (4, 48), (5, 7)])
def test_selfextend_reach_is_the_longest_input_its_group_keeps_in_range(group, window):
    method = method_class("selfextend")(group=group, window=window)
    reach = method.reach(TRAINED)
    assert _max_grouped_relative(reach, group, window) < TRAINED <= _max_grouped_relative(reach + 1, group, window)
    method.group_for(reach, TRAINED)
    with pytest.raises(InputError, match="raise group"):
        method.group_for(reach + 1, TRAINED)
    assert method_class("selfextend")().reach(TRAINED) is None  # group=none fits every length itself


@pytest.mark.parametrize(("shift", "local"), [(20, 8), (40, 16), (63, 1)])
def test_string_reach_is_the_longest_input_its_shift_keeps_in_range(shift, local):
    fixed = method_class("string")(shift=shift, local=local)
    reach = fixed.reach(TRAINED)
    assert _max_shifted_relative(reach, shift, local) < TRAINED <= _max_shifted_relative(reach + 1, shift, local)
    assert fixed.shift_for(reach, TRAINED) == shift
    with pytest.raises(InputError, match="raise shift"):
        fixed.shift_for(reach + 1, TRAINED)
    auto = method_class("string")(local=local)
    auto.shift_for(auto.reach(TRAINED), TRAINED)  # shift=none reaches as far as it can shift...
    with pytest.raises(InputError, match="STRING reaches"):
        auto.shift_for(auto.reach(TRAINED) + 1, TRAINED)  # ...and refuses one token more


def test_a_specs_reach_is_its_furthest_position_methods():
    """Methods that leave positions alone reach the trained length; rope scaling reaches factor x trained;
    methods that fit (or refuse) each length themselves reach any length; a stack reaches its furthest method's."""
    reach = lambda spec: parse_spec(spec).reach(TRAINED)  # noqa: E731
    assert reach("dense") == reach("snapkv:density=0.25") == reach("quest:density=0.1") == TRAINED
    assert reach("mspoe") == reach("buckets") == TRAINED  # they move positions, but not past the trained ones
    assert reach("yarn:factor=2") == reach("linear:factor=2") == reach("llama3:factor=2") == 2 * TRAINED
    assert reach("yarn:factor=1.5") == 96 and reach("longrope:factor=3") == 3 * TRAINED
    assert reach("dynamic") is reach("gali") is reach("selfextend") is reach("homer") is None
    assert reach("homer:chunk=65,prefix=4,suffix=4") == TRAINED  # one chunk already past the trained positions
    assert reach("homer+yarn:factor=2") is None and reach("yarn:factor=3+snapkv:density=0.1") == 3 * TRAINED


# The published frequency rules, written out here (never through longreach): what a model trained to
# ``trained`` tokens reads at ``length`` tokens, for a head of ``dim`` rotated dimensions with base ``theta``.
def _default_inv_freq(theta: float, dim: int = 16) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _longrope_start_factors(factor: float, theta: float, trained: int = TRAINED, dim: int = 16) -> list[float]:
    """LongRoPE's search starting point as longreach documents it (NTK-by-parts over full turns within the
    trained length): a pair turning >= 32 times is kept (1), <= once is divided by ``factor``, linear between."""
    out = []
    for f in _default_inv_freq(theta, dim).tolist():
        turns = trained * f / (2 * math.pi)
        keep = min(max((turns - 1.0) / (32.0 - 1.0), 0.0), 1.0)
        out.append(keep * 1.0 + (1 - keep) * factor)
    return out


def _published_frequencies(kind: str, factor: float, theta: float, length: int, trained: int = TRAINED,
                           dim: int = 16) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, cos/sin scale) of each rope type's paper / reference code."""
    base = _default_inv_freq(theta, dim)
    if kind == "linear":  # Position Interpolation (arXiv:2306.15595): every position divided by the factor
        return base / factor, 1.0
    if kind == "dynamic":  # dynamic NTK (emozilla): the base grows with the current length past the trained one
        grown = theta * (factor * length / trained - (factor - 1)) ** (dim / (dim - 2)) if length > trained else theta
        return _default_inv_freq(grown, dim), 1.0
    if kind == "yarn":  # YaRN (arXiv:2309.00071) reference code: ramp over dimensions, beta_fast 32 / beta_slow 1
        def dim_of(turns: float) -> float:  # the dimension that turns `turns` times over the trained length
            return dim * math.log(trained / (turns * 2 * math.pi)) / (2 * math.log(theta))
        low, high = max(math.floor(dim_of(32.0)), 0), min(math.ceil(dim_of(1.0)), dim - 1)
        interpolated = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        return base * (1 - interpolated) + base / factor * interpolated, 0.1 * math.log(factor) + 1
    if kind == "llama3":  # Llama 3.1 apply_scaling (arXiv:2407.21783): low_freq_factor 1, high_freq_factor 4
        out = []
        for f in base.tolist():
            wavelength = 2 * math.pi / f
            if wavelength < trained / 4.0:
                out.append(f)
            elif wavelength > trained / 1.0:
                out.append(f / factor)
            else:
                smooth = (trained / wavelength - 1.0) / (4.0 - 1.0)
                out.append((1 - smooth) * f / factor + smooth * f)
        return torch.tensor(out, dtype=torch.float64), 1.0
    if kind == "longrope":  # LongRoPE (arXiv:2402.13753): long factors past the trained length, Phi-3's scale
        factors = _longrope_start_factors(factor, theta, trained, dim) if length > trained else [1.0] * (dim // 2)
        return base / torch.tensor(factors, dtype=torch.float64), math.sqrt(1 + math.log(factor) / math.log(trained))
    raise ValueError(kind)


def _written_rope_parameters(kind: str, factor: float, theta: float, trained: int = TRAINED) -> dict:
    """The ``rope_parameters`` a checkpoint of that rope type carries, written out by hand."""
    params = {"rope_type": kind, "rope_theta": theta, "factor": factor}
    if kind == "yarn":
        params.update(original_max_position_embeddings=trained, beta_fast=32.0, beta_slow=1.0)
    elif kind == "llama3":
        params.update(original_max_position_embeddings=trained, low_freq_factor=1.0, high_freq_factor=4.0)
    elif kind == "longrope":
        params.update(original_max_position_embeddings=trained, short_factor=[1.0] * 8,
                      long_factor=_longrope_start_factors(factor, theta, trained))
    return params


def _model_with_rope(model, params: dict, trained: int = TRAINED):
    """``model``'s weights in a model transformers builds with ``params`` as its (global layers') rope parameters."""
    config = copy.deepcopy(model.config)
    if "full_attention" in config.rope_parameters:  # Gemma 3: only the global layers change
        config.rope_parameters["full_attention"] = params
    else:
        config.rope_parameters = params
    if params["rope_type"] == "longrope":  # as Phi-3 checkpoints carry it: max positions = factor x original
        config.max_position_embeddings = math.ceil(params["factor"] * trained)
    twin = type(model)(config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def _tables(inv_freq: torch.Tensor, length: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq
    angle = torch.cat([angle, angle], -1)
    return angle.cos() * scale, angle.sin() * scale


# trained 64: YaRN's ramp spans dims 0-3 and beta_fast is clamped away; trained 1024: both betas bite (dims 1-5),
# Llama 3.1 keeps / smooths / divides, LongRoPE keeps / ramps / divides; Gemma 3: global layers' base 1e6 only
@pytest.mark.parametrize("arch,trained", [("llama", 64), ("llama", 1024), ("gemma3", 64)])
@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3", "longrope"])
def test_rope_types_equal_the_published_frequency_rules(kind, arch, trained):
    """The rotary tables of a forward past the trained length are the paper formulas written above, and the
    logits are those of the model transformers builds from the rope parameters written out by hand."""
    model = tiny_model(arch, max_position_embeddings=trained)
    params = model.config.rope_parameters
    theta = params.get("full_attention", params)["rope_theta"]
    length = trained + 86
    ids = torch.randint(0, 128, (1, length))
    tables: dict = {}  # layer type -> the (cos, sin) the rotary module returned

    def record(module, args, out):
        tables.setdefault(args[2] if len(args) > 2 else "full_attention", []).append(out)

    with longreach.apply(model, f"{kind}:factor=2.0"):
        hook = model.model.rotary_emb.register_forward_hook(record)
        got = model(ids).logits
        hook.remove()
    assert all(len(calls) == 1 for calls in tables.values())
    (cos, sin), = tables.pop("full_attention")
    inv_freq, scale = _published_frequencies(kind, 2.0, theta, length, trained)
    want_cos, want_sin = _tables(inv_freq, length, scale)
    torch.testing.assert_close(cos[0].double(), want_cos, atol=5e-4, rtol=0)
    torch.testing.assert_close(sin[0].double(), want_sin, atol=5e-4, rtol=0)
    for layer_type, [(cos, sin)] in tables.items():  # Gemma 3's sliding layers keep their own RoPE
        theirs = params[layer_type]["rope_theta"]
        want_cos, want_sin = _tables(_default_inv_freq(theirs), length, 1.0)
        torch.testing.assert_close(cos[0].double(), want_cos, atol=5e-4, rtol=0)
        torch.testing.assert_close(sin[0].double(), want_sin, atol=5e-4, rtol=0)
    twin = _model_with_rope(model, _written_rope_parameters(kind, 2.0, theta, trained), trained)
    torch.testing.assert_close(got, twin(ids).logits, atol=1e-4, rtol=1e-4)
    assert params.get("full_attention", params)["rope_type"] == "default"  # the model's own config is untouched


def test_longrope_uses_long_factors_only_past_the_trained_length():
    model = tiny_model("llama", max_position_embeddings=TRAINED)
    original = model.model.rotary_emb.inv_freq.clone()
    long_factors = torch.tensor(_longrope_start_factors(4.0, 10000.0), dtype=original.dtype)
    with longreach.apply(model, "longrope:factor=4.0"):
        rotary = model.model.rotary_emb.inner  # held per sequence (test_length_dependent_ropes_...)
        model(torch.randint(0, 128, (1, 40)))
        torch.testing.assert_close(rotary.inv_freq, original)  # short factors: 1
        model(torch.randint(0, 128, (1, 150)))
        torch.testing.assert_close(rotary.inv_freq, original / long_factors)
    factors = method_class("longrope")(factor=4.0).long_factors({"rope_theta": 10000.0}, 8192, 64)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(4.0)
    assert factors == sorted(factors)


def _decode_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Prefill ``prompt`` tokens, then the rest one decode step at a time: logits of every step."""
    out = model(ids[:, :prompt], use_cache=True)
    past, steps = output_cache(out), [out.logits[:, -1]]
    for i in range(prompt, ids.shape[1] - 1):
        out = model(ids[:, i:i + 1], **cache_kwargs(model, past), use_cache=True)
        past = output_cache(out)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, 1)


def _twin(model, spec: str, edit=lambda rope: rope):
    """The model transformers builds with ``spec``'s rope parameters written out by hand (``edit``-ed)."""
    kind, factor = spec.split(":factor=")
    params = model.config.rope_parameters
    theta = params.get("full_attention", params)["rope_theta"]  # Gemma 3: the global layers' base
    return _model_with_rope(model, edit(_written_rope_parameters(kind, float(factor), theta)))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("spec", ["longrope:factor=4.0", "dynamic:factor=4.0"])
def test_length_dependent_ropes_keep_the_prompts_frequencies_while_decoding(arch, spec):
    """A prompt of exactly the trained length, decoded past it: transformers alone switches LongRoPE to
    its long factors (dynamic NTK: a larger base) at the first decode step, so new queries meet keys
    rotated otherwise; longreach keeps the prompt's frequencies for the whole sequence."""
    model = tiny_model(arch, max_position_embeddings=TRAINED)
    ids = torch.randint(0, 128, (1, TRAINED + 12))
    if spec.startswith("longrope"):  # the prompt's choice is the short factors, held: long = short; and within
        # the trained length no attention factor (the model as it was: longreach.position.frozen)
        held = _twin(model, spec, lambda rope: dict(rope, long_factor=rope["short_factor"], attention_factor=1.0))
    else:  # a base for TRAINED tokens is the model's own
        held = model
    expected = held(ids).logits[:, TRAINED - 1:-1]
    switching = _decode_logits(_twin(model, spec), ids, TRAINED)  # transformers on its own
    with longreach.apply(model, spec):
        got = _decode_logits(model, ids, TRAINED)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (switching - expected).abs().max() > 1e-3  # the tiny model does show the switch


@pytest.mark.parametrize("spec", ["longrope:factor=4.0", "dynamic:factor=4.0"])
def test_length_dependent_ropes_pick_for_the_whole_chunked_prompt(spec):
    from longreach.generation import generate

    model = tiny_model("llama", max_position_embeddings=TRAINED)
    ids = {"input_ids": torch.randint(0, 128, (1, 150)), "attention_mask": torch.ones(1, 150, dtype=torch.long)}
    with longreach.apply(model, spec):
        one = generate(model, ids, 6, set())
        chunked = generate(model, ids, 6, set(), chunk=32)  # the first chunk alone is within the trained length
    assert chunked.tokens == one.tokens
    torch.testing.assert_close(chunked.cache.layers[0].keys, one.cache.layers[0].keys)


def test_gemma3_rope_scaling_touches_only_global_layers():
    model = tiny_model("gemma3", max_position_embeddings=TRAINED)
    rotary = model.model.rotary_emb
    local_before = rotary.sliding_attention_inv_freq.clone()
    with longreach.apply(model, "linear:factor=4.0"):
        swapped = model.model.rotary_emb
        assert swapped is not rotary
        torch.testing.assert_close(swapped.sliding_attention_inv_freq, local_before)
        torch.testing.assert_close(swapped.full_attention_inv_freq, rotary.full_attention_inv_freq / 4)
    assert model.model.rotary_emb is rotary


@pytest.mark.parametrize("spec", ["selfextend:group=3,window=16", "string:shift=60,local=4",
                                  "yarn:factor=4.0"])
def test_decode_with_cache_matches_one_forward(spec):
    """Re-mapping recomputed per step from the cache's keys: prefill + decode = the same tokens in one pass."""
    model = tiny_model("llama", max_position_embeddings=TRAINED)
    ids = torch.randint(0, 128, (1, 120))
    with longreach.apply(model, spec):
        full = model(ids).logits[:, -3:]
        steps = prefill_then_steps(model, ids, 3)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)


def _mspoe_ratios(q: torch.Tensor, k: torch.Tensor, scale: float, low: float, high: float, observe: int
                  ) -> torch.Tensor:
    """Ms-PoE's head order (arXiv:2403.04797; the authors' code counts weights above 4x the row mean), per KV
    head over its query heads and the last ``observe`` queries of ``q``/``k`` (one prompt, rotated at its
    true positions): the share of a query's causal keys weighted above 4x uniform. Most outliers (the most
    position-aware head) -> ``low``; ratios evenly spaced up to ``high``."""
    n_kv, t = k.shape[1], k.shape[2]
    group = q.shape[1] // n_kv
    score = []
    for h in range(n_kv):
        shares = []
        for head in range(h * group, (h + 1) * group):
            for p in range(max(0, t - observe), t):
                w = torch.softmax((k[0, h, : p + 1].double() @ q[0, head, p].double()) * scale, 0)
                shares.append(float((w > 4.0 / (p + 1)).sum()) / (p + 1))
        score.append(sum(shares) / len(shares))
    order = sorted(range(n_kv), key=lambda h: -score[h])
    gaps = [score[a] - score[b] for a, b in itertools.pairwise(order)]
    assert low == high or min(gaps, default=1.0) > 1e-3, score  # a near-tie would make the order arbitrary
    ratios = torch.empty(n_kv, dtype=torch.float64)
    for rank, h in enumerate(order):
        ratios[h] = low + (high - low) * rank / max(n_kv - 1, 1)
    return ratios


def _mspoe_oracle_logits(model, ids: torch.Tensor, first_layer: int, low: float, high: float, observe: int,
                         ranked_on: int) -> torch.Tensor:
    """Logits with every attention recomputed from the un-rotated projections: layers from ``first_layer`` on
    rotate head h's queries and keys at positions ``p / ratio_h``, the ratios ranked on the first ``ranked_on``
    tokens; earlier layers use plain RoPE. RoPE from the model's ``inv_freq``, through transformers' own
    ``apply_rotary_pos_emb`` (``_rotate``), never through longreach."""
    inv_freq = model.model.rotary_emb.inv_freq.double()
    layers = [layer.self_attn for layer in model.model.layers]

    def oracle(attn):
        def forward(hidden_states, *args, **kwargs):
            b, t, _ = hidden_states.shape
            q0 = attn.q_proj(hidden_states).view(b, t, -1, attn.head_dim).transpose(1, 2)
            k0 = attn.k_proj(hidden_states).view(b, t, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(hidden_states).view(b, t, -1, attn.head_dim).transpose(1, 2)
            group = q0.shape[1] // k0.shape[1]
            pos = torch.arange(t)
            ratios = torch.ones(k0.shape[1], dtype=torch.float64)
            if attn.layer_idx >= first_layer:
                ranked = pos[:ranked_on]
                ratios = _mspoe_ratios(_rotate(q0[:, :, :ranked_on], inv_freq, ranked),
                                       _rotate(k0[:, :, :ranked_on], inv_freq, ranked), attn.scaling, low, high,
                                       observe)
            q = _rotate(q0, inv_freq, pos[None] / ratios.repeat_interleave(group)[:, None])
            k = _rotate(k0, inv_freq, pos[None] / ratios[:, None]).repeat_interleave(group, 1)
            scores = (q @ k.transpose(-1, -2)) * attn.scaling
            scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
            out = scores.softmax(-1) @ v.repeat_interleave(group, 1)
            return attn.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None
        return forward

    try:
        for attn in layers:
            attn.forward = oracle(attn)
        return model(ids).logits
    finally:
        for attn in layers:
            del attn.forward


def test_mspoe_prefill_and_decode_equal_rope_at_per_head_scaled_positions():
    """Ms-PoE through the model: one forward, and a prefill + decode steps (ratios ranked on the prompt and
    kept), equal attention recomputed with head h's q/k rotated at ``p / ratio_h`` in every layer from
    ``first_layer`` on."""
    model = tiny_model("llama", max_position_embeddings=TRAINED, num_hidden_layers=3)
    with torch.no_grad():  # random init attends almost uniformly (no outliers, heads tie): sharpen q and k,
        for i, layer in enumerate(model.model.layers):  # one KV head more than the other, which one by layer
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.view(2, 16, -1)[i % 2].mul_(4.0)
    ids = torch.randint(0, 128, (1, 120))
    dense = model(ids).logits
    # the oracle itself: with every ratio 1 it is the model as transformers runs it
    torch.testing.assert_close(_mspoe_oracle_logits(model, ids, 0, 1.0, 1.0, 64, 120), dense, atol=1e-4, rtol=1e-4)
    with longreach.apply(model, "mspoe:first_layer=1,min_ratio=1.2,max_ratio=1.8,observe=64"):
        full = model(ids).logits
        steps = prefill_then_steps(model, ids, 3)
    assert (full - dense).abs().max() > 1e-2  # the re-mapping does change the layers it touches
    torch.testing.assert_close(full, _mspoe_oracle_logits(model, ids, 1, 1.2, 1.8, 64, 120), atol=1e-4, rtol=1e-4)
    decoded = _mspoe_oracle_logits(model, ids, 1, 1.2, 1.8, 64, 117)[:, -3:]  # ranked on the 117-token prompt
    torch.testing.assert_close(steps, decoded, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t_q", [100, 5, 1])
@pytest.mark.parametrize("kernel", ["reference", "gather"])
def test_mspoe_equals_rope_recomputed_at_per_head_scaled_positions(t_q, kernel):
    """Attention level, ratios known in advance: KV heads 1 / 2 / 3 have keys spiking on a near-static RoPE pair
    every 10 / 40 / 20 tokens (head 0: none), so ~10% / 2.5% / 5% / 0 of a query's keys are outliers; most
    outliers first the order is 1, 3, 2, 0, and ratios 1.2, 1.4, 1.6, 1.8 in that order give heads 0-3
    1.8, 1.2, 1.6, 1.4. The prompt ranks the heads; later queries (decode) reuse that state."""
    dim, t_k, scale = 16, 100, 0.25
    rope = longreach.position.RopeInfo(1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim)), trained=40)
    q0, k0, v = torch.randn(1, 8, t_k, dim) * 0.5, torch.randn(1, 4, t_k, dim) * 0.5, torch.randn(1, 4, t_k, dim)
    for h, every in ((1, 10), (2, 40), (3, 20)):  # pair (7, 15) turns 0.03 rad over 100 tokens
        q0[:, 2 * h: 2 * h + 2, :, 7] += 8.0
        k0[:, h, ::every, 7] += 3.0
    pos = torch.arange(t_k)
    q, k = _rotate(q0, rope.inv_freq, pos), _rotate(k0, rope.inv_freq, pos)
    method = method_class("mspoe")(min_ratio=1.2, max_ratio=1.8, first_layer=2, observe=32)
    state = {"layer_idx": 2, "scale": scale}
    ratios = torch.tensor([1.8, 1.2, 1.6, 1.4], dtype=torch.float64)
    method.view(q, k, rope, state)  # the prompt
    torch.testing.assert_close(state["ratios"], ratios)
    view = method.view(q[:, :, -t_q:], k, rope, state)
    got = longreach.attend(view.q, view.k, v, Selection.dense(1, t_q, t_k), scale, kernel)
    pq = pos[-t_q:]
    qr = _rotate(q0[:, :, -t_q:], rope.inv_freq, pq[None] / ratios.repeat_interleave(2)[:, None])
    kr = _rotate(k0, rope.inv_freq, pos[None] / ratios[:, None]).repeat_interleave(2, 1)
    scores = ((qr @ kr.transpose(-1, -2)) * scale).masked_fill(pos[None, :] > pq[:, None], float("-inf"))
    want = (scores.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    plain = reference.attend(q[:, :, -t_q:], k, v, Selection.dense(1, t_q, t_k), scale)
    assert (plain - want).abs().max() > 1e-3  # the scaled positions matter at this size
    below = method.view(q, k, rope, {"layer_idx": 1, "scale": scale})  # layers below first_layer: untouched
    assert below.q is q and below.k is k and below.far is None


def test_chunked_prefill_equals_one_prefill():
    from longreach.generation import generate

    model = tiny_model("llama", max_position_embeddings=TRAINED)
    ids = {"input_ids": torch.randint(0, 128, (1, 150)), "attention_mask": torch.ones(1, 150, dtype=torch.long)}
    with longreach.apply(model, "selfextend:group=4,window=16"):
        one = generate(model, ids, 6, set())
        chunked = generate(model, ids, 6, set(), chunk=32)
    assert chunked.tokens == one.tokens
    torch.testing.assert_close(chunked.cache.layers[0].keys, one.cache.layers[0].keys)


def test_selection_is_computed_on_extended_positions_and_keeps_the_neighbours():
    model = tiny_model("llama", max_position_embeddings=TRAINED)
    ids = torch.randint(0, 128, (1, 200))
    with longreach.apply(model, "selfextend:group=4,window=16") as handle:
        alone = model(ids).logits
    with longreach.apply(model, "selfextend:group=4,window=16+quest:density=1.0,block=16"):
        full_budget = model(ids).logits
    torch.testing.assert_close(full_budget, alone, atol=1e-5, rtol=1e-5)
    with longreach.apply(model, "selfextend:group=4,window=16+quest:density=0.3,block=16,window=16") as handle:
        sparse = model(ids).logits
        assert handle.density("prefill") < 0.6
    assert torch.isfinite(sparse).all()


def test_sparse_selection_with_far_keys_matches_reference():
    q, k, v = torch.randn(1, 4, 130, 16), torch.randn(1, 2, 130, 16), torch.randn(1, 2, 130, 16)
    far = FarKeys(torch.randn_like(q), torch.randn_like(k), 24)
    sel = method_class("quest")(density=0.3, block=16, window=24).select(q, k, SelectContext())
    torch.testing.assert_close(gather.attend(q, k, v, sel, 0.3, far), reference.attend(q, k, v, sel, 0.3, far),
                               atol=1e-5, rtol=1e-5)


def test_bad_combinations_and_inputs_are_refused():
    model = tiny_model("llama", max_position_embeddings=TRAINED)
    with pytest.raises(SpecError, match="keep one position method"):
        longreach.parse_spec("yarn:factor=2.0+selfextend")
    with pytest.raises(SpecError, match="drops keys"):
        longreach.apply(model, "selfextend:window=16+snapkv:density=0.5")
    with pytest.raises(SpecError, match="factor must be"):
        longreach.parse_spec("yarn:factor=0.5")
    with pytest.raises(InputError, match="below the trained length"):
        longreach.apply(model, "selfextend:window=64")
    with pytest.raises(InputError, match="below the trained length"):
        longreach.apply(model, "gali:window=63")
    ids = torch.randint(0, 128, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    with longreach.apply(model, "selfextend:window=16"), pytest.raises(InputError, match="one sequence"):
        model(ids, attention_mask=mask)


def test_rope_scaling_with_a_press_keeps_keys_rotated_at_their_own_positions():
    """yarn + a press is allowed: transformers rotates every key (with yarn's frequencies) before the press drops
    any, so the kept keys are exactly the yarn-only cache's keys at their original positions."""
    model = tiny_model("llama", max_position_embeddings=TRAINED)
    ids = torch.randint(0, 128, (1, 100))
    plain = output_cache(model(ids, use_cache=True))
    with longreach.apply(model, "yarn:factor=2.0"):
        rotated = output_cache(model(ids, use_cache=True))
    with longreach.apply(model, "yarn:factor=2.0+snapkv:density=0.5"):
        pressed = output_cache(model(ids, use_cache=True))
    for layer in range(2):
        kept, full, unscaled = (c.layers[layer].keys[0].detach() for c in (pressed, rotated, plain))  # (Hkv, T, D)
        # density 0.5 of the 99 keys before the held-back last token (its key comes from the pressed attention)
        assert kept.shape == (2, 49 + 1, 16)
        kept = kept[:, :-1]
        for head in range(2):
            dist = (kept[head][:, None] - full[head][None]).norm(dim=-1)  # each kept key is one of yarn's, in order
            at = dist.argmin(-1)
            assert float(dist.min(-1).values.max()) < 1e-5
            assert bool((at.diff() > 0).all())
            # and not RoPE's plain rotation: yarn moved every key past position 0
            moved = at[at > 0]
            assert bool(((kept[head][at > 0] - unscaled[head][moved]).norm(dim=-1) > 1e-4).all())


def test_rope_info_reads_the_global_frequencies():
    info = rope_info(tiny_model("gemma3", max_position_embeddings=TRAINED))
    assert info.trained == TRAINED and info.rotated_dims == 16


def test_plan_kv_estimate_equals_the_measured_cache():
    from longreach.plan import plan_memory

    for arch in ("llama", "gemma3"):
        model = tiny_model(arch, max_position_embeddings=TRAINED)
        out = model(torch.randint(0, 128, (1, 100)), use_cache=True)
        plan = plan_memory(model, longreach.parse_spec("dense"), 100, available=2**40)
        assert plan.kv_cache == longreach.cache_bytes(output_cache(out))  # sliding layers at their window
        assert plan.fits


def test_plan_shrinks_with_chunks_and_presses_and_refuses_what_does_not_fit():
    from longreach.plan import plan_memory

    model = tiny_model("llama", max_position_embeddings=TRAINED)
    dense = plan_memory(model, longreach.parse_spec("dense"), 20_000)
    chunked = plan_memory(model, longreach.parse_spec("dense"), 20_000, chunk=256)
    assert chunked.activations < dense.activations and chunked.kv_cache == dense.kv_cache
    pressed = plan_memory(model, longreach.parse_spec("snapkv:density=0.25"), 20_000, chunk=1024)
    assert pressed.kv_cache == dense.kv_cache // 4
    unchunked_press = plan_memory(model, longreach.parse_spec("snapkv:density=0.25"), 20_000)
    assert unchunked_press.kv_cache == dense.kv_cache  # the whole cache exists before the press runs
    assert unchunked_press.kv_kept == dense.kv_cache // 4 and dense.kv_kept is None
    assert ("KV cache after the press", f"{dense.kv_cache / 4 / 2**30:.2f} GiB") in unchunked_press.rows()
    assert any("--chunk" in n for n in unchunked_press.notes)
    assert any("past the trained" in n and "yarn:factor=312.5" in n for n in dense.notes)  # 20000 / 64
    far = lambda spec: [n for n in plan_memory(model, longreach.parse_spec(spec), 20_000).notes if "past" in n]  # noqa: E731
    assert far("yarn:factor=400") == far("selfextend:window=16") == []  # they reach 20000 tokens
    assert far("yarn:factor=2") == ["20000 tokens is past the 128 that yarn keeps inside the trained 64 "
                                    "positions; raise its factor (yarn:factor=312.5) or group, or use selfextend "
                                    "(its group adapts to the length)"]
    assert not plan_memory(model, longreach.parse_spec("dense"), 20_000, available=1000).fits
    with pytest.raises(InputError, match="STRING reaches"):
        plan_memory(model, longreach.parse_spec("string:local=8"), 20_000)
    with pytest.raises(InputError, match="chunk"):
        plan_memory(model, longreach.parse_spec("dense"), 100, chunk=0)


def test_plan_command_exits_2_when_it_would_not_fit(tiny_lm_folder):
    from typer.testing import CliRunner

    from longreach.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["plan", "--model", str(tiny_lm_folder), "--length", "8k", "--method", "selfextend"])
    assert ok.exit_code == 0 and "fits" in ok.output and "KV cache" in ok.output
    assert "groups far positions by 3" in ok.output  # 8k tokens on a 4k model, window 1024
    tight = runner.invoke(app, ["plan", "--model", str(tiny_lm_folder), "--length", "8k", "--memory-gib", "0.001"])
    assert tight.exit_code == 2 and "does not fit" in tight.output
    bad = runner.invoke(app, ["plan", "--model", str(tiny_lm_folder), "--length", "8k", "--method", "nope"])
    assert bad.exit_code == 2 and "unknown method" in bad.output


@pytest.mark.parametrize("shape", [(1, 4, 2, 100, 16, 24), (2, 6, 2, 37, 8, 40), (1, 4, 1, 64, 16, 16),
                                   (1, 2, 2, 5, 8, 8)])
def test_band_attention_equals_the_local_selection(shape):
    from longreach.kernels.band import band_attention_with_lse

    batch, n_q, n_kv, t, dim, window = shape
    q, k, v = torch.randn(batch, n_q, t, dim), torch.randn(batch, n_kv, t, dim), torch.randn(batch, n_kv, t, dim)
    out, lse = band_attention_with_lse(q, k, v, window, 0.3)
    sel = Selection.local(batch, t, t, sinks=0, window=window)
    torch.testing.assert_close(out, reference.attend(q, k, v, sel, 0.3), atol=1e-5, rtol=1e-5)
    _, want_lse = gather.attend_with_lse(q, k, v, sel, 0.3)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.model
def test_real_smollm2_identity_settings_equal_dense():
    """The bundled model's own rotary module and config go through the same swap and re-rotation."""
    model, tok = longreach.load_model("smollm2-135m")
    ids = tok("The quick brown fox jumps over the lazy dog. " * 30, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        dense = model(ids).logits[:, -5:]
        for spec in ("yarn:factor=1.0", "selfextend", "gali", "mspoe:min_ratio=1.0,max_ratio=1.0"):
            with longreach.apply(model, spec):
                got = model(ids).logits[:, -5:]
            torch.testing.assert_close(got, dense, atol=2e-4, rtol=2e-4)
        with longreach.apply(model, "yarn:factor=4.0"):  # a real change stays a small one within 8k
            changed = model(ids).logits[:, -5:]
    assert not torch.allclose(changed, dense, atol=1e-3)
    assert rope_info(model).trained == 8192


def test_mspoe_gives_the_smallest_ratio_to_the_most_position_aware_head():
    t, dim = 80, 16
    q = torch.zeros(1, 4, t, dim)
    k = torch.zeros(1, 2, t, dim)
    q[:, :2, :, 0] = 10.0  # KV head 0's queries: peaked on a few keys (outliers)
    k[:, 0, ::20, 0] = 3.0
    k[:, 1] = torch.randn(t, dim) * 0.01  # KV head 1: nearly uniform
    ratios = method_class("mspoe")(min_ratio=1.2, max_ratio=1.8).ratios(q, k, 0.25)
    assert ratios.tolist() == pytest.approx([1.2, 1.8])


def test_generate_command_chunks_the_prefill_and_warns_past_the_trained_length(tiny_lm_folder, tmp_path):
    from typer.testing import CliRunner

    from longreach.cli import app

    prompt = tmp_path / "long.txt"
    prompt.write_text("the cat sat on the mat and looked at the door. " * 500)  # ~6k tokens, model trained to 4k
    runner = CliRunner()
    base = ["generate", "--model", str(tiny_lm_folder), "--input", str(prompt), "--max-new-tokens", "4"]
    plain = runner.invoke(app, base)
    assert plain.exit_code == 0 and "past the trained 4096" in plain.output
    one = runner.invoke(app, [*base, "--method", "selfextend"])
    chunked = runner.invoke(app, [*base, "--method", "selfextend:group=4", "--chunk", "1024"])
    fixed = runner.invoke(app, [*base, "--method", "selfextend:group=4"])
    assert one.exit_code == 0 and "past the" not in one.output
    short = runner.invoke(app, [*base, "--method", "yarn:factor=1.2"])  # reaches 4915 of the ~6k tokens
    words = lambda out: " ".join(out.split())  # noqa: E731  (rich wraps the warning)
    assert short.exit_code == 0 and "past the 4915 that yarn:factor=1.2 keeps" in words(short.output)
    assert "yarn:factor=1.5" in words(short.output)  # 6001 / 4096 = 1.47, rounded up to a tenth
    same = runner.invoke(app, [*base, "--method", "mspoe:first_layer=0"])  # moves positions, extends none
    assert same.exit_code == 0 and "no method in the spec extends positions" in words(same.output)
    assert chunked.exit_code == 0 and fixed.exit_code == 0
    text = lambda out: out.split("it/s]")[-1].split("\n")[0]  # noqa: E731  (after the weights progress bar)
    assert text(chunked.output) == text(fixed.output)  # the same continuation, chunked or not


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # float64 takes the plain-math path
@pytest.mark.parametrize("t_q", [40, 7, 1])
def test_causal_attention_with_lse_is_bottom_right_causal(dtype, t_q):
    from longreach.compat import attention_with_lse_math
    from longreach.kernels.dense import causal_attention_with_lse, causal_keep

    q, k, v = (torch.randn(1, 2, t, 16, dtype=dtype) for t in (t_q, 40, 40))
    out, lse = causal_attention_with_lse(q, k, v, 0.25)
    bias = torch.zeros(t_q, 40, dtype=dtype).masked_fill(~causal_keep(t_q, 40, q.device), float("-inf"))
    want, want_lse = attention_with_lse_math(q, k, v, bias, 0.25)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_interleaved_rope_pairs_are_reordered_and_rerotated_like_the_models_own_rope():
    """GLM-4 pairs rotary dims (2i, 2i+1) over part of each head: rotating by transformers' own GLM code at p + d
    equals rotating at p and then moving by d through longreach's re-ordering + half-split re-rotation."""
    from transformers.models.glm4 import modeling_glm4

    from longreach.models import tiny_family
    from longreach.position.rotary import half_split, rope_info

    model = tiny_family("glm4")
    rope = rope_info(model)
    assert rope.interleaved and rope.rotated_dims < 16  # partial rotary: the pass-through dims stay last
    q = torch.randn(1, 4, 6, 16)
    p, d = torch.arange(6).view(1, 6), torch.tensor([3, 40, 7, 100, 0, 1234]).view(1, 6)

    def at(pos: torch.Tensor) -> torch.Tensor:
        return modeling_glm4.apply_rotary_pos_emb(q, q, *model.model.rotary_emb(q, pos))[0]

    moved = rerotate(half_split(at(p), rope.rotated_dims), d[0].double(), rope.inv_freq)
    assert (moved - half_split(at(p + d), rope.rotated_dims)).abs().max().item() < 1e-4
    assert not torch.allclose(half_split(at(p), rope.rotated_dims), half_split(at(p + d), rope.rotated_dims))


def stablelm() -> torch.nn.Module:
    """A tiny StableLM (not a conformance family): its default config rotates a quarter of each head."""
    import transformers

    cfg = transformers.StableLmConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.StableLmForCausalLM(cfg).eval()


@pytest.mark.parametrize("family,rotated", [("gpt-neox", 4), ("phi3", 8), ("stablelm", 4)])
def test_partial_rotary_models_are_rerotated_on_their_rotary_part_only(family, rotated):
    """GPT-NeoX, Phi-3 and StableLM rotate only the first dims of each head: rotating by the model's own RoPE code
    at p + d equals rotating at p and moving by d with the rotary info longreach reads from the model, and the
    pass-through dims are the model's, untouched."""
    import sys

    from longreach.models import tiny_family

    model = stablelm() if family == "stablelm" else tiny_family(family)
    rope = rope_info(model)
    assert rope.rotated_dims == rotated and not rope.interleaved
    own = sys.modules[type(model).__module__].apply_rotary_pos_emb
    q = torch.randn(1, 4, 6, 16)
    p, d = torch.arange(6).view(1, 6), torch.tensor([3, 40, 7, 100, 0, 1234]).view(1, 6)

    def at(pos: torch.Tensor) -> torch.Tensor:
        cos, sin = model.get_decoder().rotary_emb(q, pos)
        if family == "stablelm":  # its attention splits the head itself, as here, before the shared RoPE code
            return torch.cat([own(q[..., :rotated], q[..., :rotated], cos, sin)[0], q[..., rotated:]], dim=-1)
        return own(q, q, cos, sin)[0]  # GPT-NeoX and Phi-3 split inside it

    moved = rerotate(at(p), d[0].double(), rope.inv_freq)
    assert (moved - at(p + d)).abs().max().item() < 1e-4
    assert torch.equal(moved[..., rotated:], q[..., rotated:])  # the pass-through part is never rotated
    assert not torch.allclose(at(p)[..., :rotated], at(p + d)[..., :rotated])


@pytest.mark.parametrize("spec", ["selfextend:group=4,window=8", "string:shift=24,local=4", "gali:window=16"])
def test_position_methods_leave_nope_layers_alone(spec, monkeypatch):
    """Llama 4's NoPE layers have no positions to re-map: the method re-maps only the RoPE layer (layer 0 here) and
    changes the output past the trained window; on a model with no RoPE layer to act on it is refused (it would
    change nothing)."""
    from longreach.errors import UnsupportedModelError
    from longreach.models import tiny_family

    ids = torch.randint(3, 128, (1, 50))  # past the trained 32, within what each spec reaches (STRING: 52)
    full = ["full_attention", "full_attention"]
    model = tiny_family("llama4", max_positions=32, no_rope_layers=[1, 0], layer_types=full)
    method = type(longreach.parse_spec(spec).methods[0])
    seen: list[int] = []
    real_view = method.view

    def view(self, q, k, rope, state):
        seen.append(state["layer_idx"])
        return real_view(self, q, k, rope, state)

    monkeypatch.setattr(method, "view", view)
    with torch.no_grad():
        want = model(ids).logits
        with longreach.apply(model, spec):
            got = model(ids).logits
    assert set(seen) == {0} and (got - want).abs().max().item() > 1e-4
    nope_only = tiny_family("llama4", max_positions=32, no_rope_layers=[0, 0], layer_types=full)
    with pytest.raises(UnsupportedModelError, match="would change nothing"):
        longreach.apply(nope_only, spec)
