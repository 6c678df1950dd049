"""Every kernel equals the reference kernel; full budget equals dense attention (fp32, <= 1e-5)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from longreach import kernels
from longreach.kernels import gather, native, reference
from longreach.selection import Selection

TOL = 1e-5
# (batch, q_heads, kv_heads, q_len, kv_len, dim, block_q, block_k): MHA, GQA, decode, chunk after prefix,
# lengths that are not multiples of the block
SHAPES = [
    (1, 4, 4, 96, 96, 16, 16, 16),
    (2, 6, 2, 77, 77, 8, 16, 8),
    (1, 8, 2, 130, 130, 16, 32, 32),
    (2, 6, 2, 1, 131, 8, 16, 16),
    (1, 4, 1, 1, 64, 16, 16, 16),
    (1, 4, 2, 33, 200, 8, 16, 32),
]
FAST_KERNELS = ["gather", "reference"]


def qkv(b, hq, hkv, tq, tk, d):
    return torch.randn(b, hq, tq, d), torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)


def random_selection(b, heads, tq, tk, bq, bk, k, sinks, window, key_mask=None):
    idx = torch.randint(-1, math.ceil(tk / bk), (b, heads, math.ceil(tq / bq), k))
    return Selection(idx, tq, tk, bq, bk, sinks, window, key_mask)


def sdpa_dense(q, k, v):
    """PyTorch's own causal attention, the ground truth for full budgets (bottom-right aligned)."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    return F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_full_selection_equals_dense(shape, kernel):
    b, hq, hkv, tq, tk, d, bq, _bk = shape
    q, k, v = qkv(b, hq, hkv, tq, tk, d)
    sel = Selection.dense(b, tq, tk, block=bq)
    out = kernels.attend(q, k, v, sel, d**-0.5, kernel)
    assert (out - sdpa_dense(q, k, v)).abs().max().item() <= TOL


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape", [(1, 9, 3, 33, 200), (2, 4, 4, 64, 65), (1, 6, 2, 2, 50), (1, 4, 1, 50, 51)])
def test_chunk_after_prefix_equals_dense(shape, fused, monkeypatch):
    """A prefill chunk after cached keys: the split (prefix unmasked + causal square, merged by lse) and
    SDPA's masked call both equal dense causal attention, GQA included."""
    from longreach.kernels import dense

    if not fused:
        monkeypatch.setattr(dense, "fused_lse_available", lambda q: False)
    b, hq, hkv, tq, tk = shape
    q, k, v = qkv(b, hq, hkv, tq, tk, 16)
    assert dense.fused_lse_available(q) == fused
    out = dense.causal_attention(q, k, v, 16**-0.5)  # sdpa_dense's default scale
    assert (out - sdpa_dense(q, k, v)).abs().max().item() <= TOL


@pytest.fixture(params=["native", "torch"])
def gather_path(request, monkeypatch):
    """The gather kernel's two paths: the compiled fused kernel and the pure-PyTorch fallback."""
    if request.param == "native":
        assert native.load() is not None, "the compiled kernel must build here (g++ and torch headers)"
    # whichever path this machine measured faster, each is tested here (kernels.choice only picks between them)
    monkeypatch.setattr(gather.choice, "use_native", lambda q, n_kv, run: request.param == "native")
    return request.param


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("heads", ["one", "kv", "q"])
@pytest.mark.parametrize("padded", [False, True])
def test_gather_matches_reference_on_random_selections(shape, heads, padded, gather_path):
    b, hq, hkv, tq, tk, d, bq, bk = shape
    q, k, v = qkv(b, hq, hkv, tq, tk, d)
    n_heads = {"one": 1, "kv": hkv, "q": hq}[heads]
    key_mask = None
    if padded:
        key_mask = torch.ones(b, tk, dtype=torch.bool)
        key_mask[0, : min(5, tk - 1)] = False  # left padding in the first row
    for sinks, window, n_blocks in [(0, 1, 3), (4, 16, 2), (2, 9, 6), (0, 40, 0)]:
        sel = random_selection(b, n_heads, tq, tk, bq, bk, n_blocks, sinks, window, key_mask)
        ref = reference.attend(q, k, v, sel, d**-0.5)
        out = kernels.attend(q, k, v, sel, d**-0.5, "gather")
        assert (out - ref).abs().max().item() <= TOL, (sinks, window, n_blocks)


@pytest.mark.parametrize("tq", [700, 1])
def test_gather_tiles_long_key_sets_like_the_reference(tq, gather_path):
    """Far key sets and near bands longer than the fused kernel's 512-key tile, prefill and decode."""
    torch.manual_seed(1)
    q, k, v = qkv(1, 4, 2, tq, 1500, 16)
    for sinks, window, n_blocks in [(4, 600, 3), (0, 8, 40), (3, 1100, 30)]:
        sel = random_selection(1, 2, tq, 1500, 32, 16, n_blocks, sinks, window)
        ref = reference.attend(q, k, v, sel, 0.25)
        out = kernels.attend(q, k, v, sel, 0.25, "gather")
        assert (out - ref).abs().max().item() <= TOL, (sinks, window, n_blocks)


@pytest.mark.parametrize("tq", [37, 1])
def test_gather_reads_a_permuted_query_in_place(tq, gather_path):
    """transformers hands q as a (B, T, H, D) buffer viewed (B, H, T, D); the fused kernel reads those strides in
    place (no blocked copy) and writes (B, Tq, Hq, D): same result as a contiguous q, a short last block included."""
    q, k, v = qkv(2, 6, 2, tq, 50, 16)
    permuted = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert tq == 1 or not permuted.is_contiguous()  # one query: the view is contiguous anyway
    sel = random_selection(2, 2, tq, 50, 16, 8, 2, 2, 9)
    out = kernels.attend(permuted, k, v, sel, 0.25, "gather")
    assert out.shape == (2, tq, 6, 16)
    assert (out - reference.attend(q, k, v, sel, 0.25)).abs().max().item() <= TOL


@pytest.mark.usefixtures("gather_path")
def test_masked_everything_gives_zero_rows_not_nan():
    q, k, v = qkv(1, 2, 2, 8, 8, 8)
    key_mask = torch.zeros(1, 8, dtype=torch.bool)
    key_mask[0, 4:] = True
    sel = Selection.local(1, 8, 8, sinks=0, window=2, key_mask=key_mask, block=4)
    out = kernels.attend(q, k, v, sel, 0.3, "gather")
    assert torch.isfinite(out).all()
    assert out[0, :4].abs().max().item() == 0.0  # queries 0-3 see only padding
    assert (out - reference.attend(q, k, v, sel, 0.3)).abs().max().item() <= TOL


def test_bf16_inputs_are_computed_in_fp32_and_returned_in_bf16():
    q, k, v = qkv(1, 4, 2, 40, 40, 16)
    sel = random_selection(1, 2, 40, 40, 16, 16, 2, 2, 8)
    out = kernels.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), sel, 0.25, "gather")
    ref = reference.attend(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), sel, 0.25)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 2e-2


def test_unknown_kernel_is_refused_with_choices():
    from longreach.errors import SpecError

    with pytest.raises(SpecError, match="did you mean 'gather'"):
        kernels.resolve("gathr", torch.empty(0))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 4, 4, 96, 96, 16, 16, 16), (2, 6, 2, 80, 80, 16, 16, 16),
                                   (1, 4, 2, 1, 131, 16, 16, 16)])
def test_flex_matches_reference(shape):
    b, hq, hkv, tq, tk, d, bq, bk = shape
    q, k, v = qkv(b, hq, hkv, tq, tk, d)
    sel = random_selection(b, hkv, tq, tk, bq, bk, 3, 4, 16)
    out = kernels.attend(q, k, v, sel, d**-0.5, "flex")
    assert (out - reference.attend(q, k, v, sel, d**-0.5)).abs().max().item() <= TOL
    dense = Selection.dense(b, tq, tk, block=bq)
    assert (kernels.attend(q, k, v, dense, d**-0.5, "flex") - sdpa_dense(q, k, v)).abs().max().item() <= TOL


def test_native_kernel_falls_back_with_a_warning_when_it_cannot_build(monkeypatch):
    import torch.utils.cpp_extension as ext

    def broken(**kwargs):
        raise OSError("no compiler")

    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(ext, "load", broken)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert native.load() is None
    q, k, v = qkv(1, 4, 2, 40, 40, 8)
    sel = random_selection(1, 2, 40, 40, 8, 8, 2, 2, 8)
    assert not native.usable(q)
    assert (kernels.attend(q, k, v, sel, 0.3, "gather") - reference.attend(q, k, v, sel, 0.3)).abs().max() <= TOL


def test_native_build_folder_is_keyed_by_torch_and_kernel_source(monkeypatch, tmp_path):
    """Two checkouts of different kernel sources (an upgrade, a git worktree) build into different folders
    instead of rebuilding over each other's; an edited header alone counts (torch's own check skips headers)."""
    import torch.utils.cpp_extension as ext

    folders = []
    monkeypatch.setattr(ext, "load", lambda **kwargs: folders.append(kwargs["build_directory"]) or "module")
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_module", None)  # restored after the test: load() sets it
    edited = tmp_path / native.HEADERS[-1].name
    edited.write_bytes(native.HEADERS[-1].read_bytes() + b"\n// edited\n")
    try:
        for headers in (native.HEADERS, [*native.HEADERS[:-1], edited]):
            monkeypatch.setattr(native, "HEADERS", headers)
            monkeypatch.setattr(native, "_tried", False)
            native.source_hash.cache_clear()
            assert native.load() == "module"
    finally:
        native.source_hash.cache_clear()
    torch_folder = tmp_path / "kernels" / torch.__version__.replace("+", "_")
    assert [Path(f).parent for f in folders] == [torch_folder, torch_folder]
    assert folders[0] != folders[1] and all(Path(f).is_dir() for f in folders)


def fake_build(monkeypatch, tmp_path, calls: list) -> Path:
    """load() with torch's build replaced by a recorder of its arguments and of whether torch's lock file was
    there when it was called; returns the build folder it will use."""
    import torch.utils.cpp_extension as ext

    where = tmp_path / "kernels" / torch.__version__.replace("+", "_") / native.source_hash()
    where.mkdir(parents=True)
    monkeypatch.setattr(ext, "load", lambda **kw: calls.append({**kw, "lock": (where / "lock").exists()}) or "module")
    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_tried", False)
    return where


def test_a_build_killed_part_way_does_not_hang_the_next_one(monkeypatch, tmp_path):
    """torch's lock file, left behind by a build that was killed, is removed under our own lock (which the system
    releases with its process) instead of being waited on forever; the sources are built from copies in the build
    folder, so two checkouts of the same sources name the same paths and do not rebuild over each other."""
    calls: list = []
    where = fake_build(monkeypatch, tmp_path, calls)
    (where / "lock").touch()  # what torch's FileBaton leaves when its process dies mid-build
    assert native.load() == "module" and [call["lock"] for call in calls] == [False]
    staged = [Path(p) for p in calls[0]["sources"]]
    assert [p.parent for p in staged] == [where / "src"] * len(native.SOURCES)
    for original in (*native.SOURCES, *native.HEADERS):  # headers too: the sources include them by name
        assert (where / "src" / original.name).read_bytes() == original.read_bytes()
    assert native.staged_sources(where) == calls[0]["sources"]  # the same paths again: nothing to rebuild


def test_a_build_in_progress_is_waited_for(monkeypatch, tmp_path):
    import fcntl
    import threading

    calls: list = []
    where = fake_build(monkeypatch, tmp_path, calls)
    worker = threading.Thread(target=native.load)
    with open(where / "longreach.lock", "a") as holder:  # another process building: its own open file and flock
        fcntl.flock(holder, fcntl.LOCK_EX)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive() and not calls  # it waits rather than building over the other
        fcntl.flock(holder, fcntl.LOCK_UN)
    worker.join(10)
    assert not worker.is_alive() and len(calls) == 1


def test_native_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setenv("LONGREACH_NATIVE", "0")
    assert native.load() is None


@pytest.mark.parametrize("heads", ["kv", "q"])
def test_gather_takes_queries_in_transformers_layout(heads, gather_path):
    """transformers hands q as a (B, T, H, D) buffer transposed to (B, H, T, D): not contiguous. The kernel's
    folded view of it stays permuted when each KV group is one head (group=q), and must still be attended."""
    b, hq, hkv, tq, tk, d, bq, bk = 1, 4, 2, 160, 160, 16, 16, 16
    q, k, v = qkv(b, hq, hkv, tq, tk, d)
    q_hf = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_hf.is_contiguous()
    sel = random_selection(b, {"kv": hkv, "q": hq}[heads], tq, tk, bq, bk, 3, 4, 16)
    out = kernels.attend(q_hf, k, v, sel, d**-0.5, "gather")
    assert (out - reference.attend(q, k, v, sel, d**-0.5)).abs().max().item() <= TOL


def test_the_gather_path_is_chosen_by_measurement_once_per_machine(monkeypatch, tmp_path):
    from longreach.kernels import choice

    monkeypatch.setenv("LONGREACH_CACHE", str(tmp_path))
    monkeypatch.delenv("LONGREACH_NATIVE", raising=False)
    monkeypatch.setattr(choice, "_memo", {})
    calls = []

    def timings(n_q, n_kv, dim, decode, run):
        calls.append((n_q, decode))
        return {"native": 0.5, "torch": 0.2} if decode else {"native": 0.1, "torch": 0.3}

    monkeypatch.setattr(choice, "_timings", timings)
    assert choice.choose(9, 3, 64, False, gather.attend_with_lse)["path"] == "native"  # the faster one
    assert choice.choose(9, 3, 64, True, gather.attend_with_lse)["path"] == "torch"
    assert choice.choose(9, 3, 64, False, gather.attend_with_lse)["path"] == "native"
    assert calls == [(9, False), (9, True)], "measured once per shape and phase"
    monkeypatch.setattr(choice, "_memo", {})  # a new process reads the choice back from the cache folder
    assert choice.choose(9, 3, 64, True, gather.attend_with_lse)["path"] == "torch" and len(calls) == 2
    assert set(choice.chosen()) == {"9/3/64/prefill", "9/3/64/decode"}
    q = torch.randn(1, 9, 1, 64)
    assert choice.use_native(q, 3, gather.attend_with_lse) is False  # decode: the measured torch path runs
    monkeypatch.setenv("LONGREACH_NATIVE", "1")
    assert choice.choose(9, 3, 64, True, gather.attend_with_lse)["why"] == "LONGREACH_NATIVE=1"


def test_the_measurement_times_both_paths_on_the_same_selection():
    from longreach.kernels import choice

    seen = []

    def run(q, k, v, sel, scale, use_native):
        seen.append((use_native, q.shape, k.shape, sel.density()))

    times = choice._timings(4, 2, 16, True, run)
    assert set(times) == {"native", "torch"} and all(t >= 0 for t in times.values())
    assert {s[0] for s in seen} == {True, False} and len({s[1:3] for s in seen}) == 1
    assert seen[0][1] == (1, 4, 1, 16) and seen[0][2] == (1, 2, choice.DECODE_T, 16)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("params", [(0, 1, 3), (4, 16, 2), (2, 9, 6), (0, 40, 0), (30, 3, 5)])
def test_visible_total_in_closed_form_equals_the_per_query_count(shape, params):
    """Density accounting sums keys seen in closed form; the per-query layout count is the oracle."""
    b, hq, hkv, tq, tk, _d, bq, bk = shape
    sinks, window, n_blocks = params
    for heads in (1, hkv, hq):
        sel = random_selection(b, heads, tq, tk, bq, bk, n_blocks, sinks, window)
        assert sel.visible_total() == int(sel.visible_counts().sum()) == int(sel.to_mask().sum())


# ---- logit softcapping (Gemma 2) and learned sink logits (GPT-OSS) --------------------------------------------------


def eager_oracle(q, k, v, scale, mask=None, softcap=None, sinks=None):
    """Plain eager attention as Gemma 2 / GPT-OSS write it: scores, cap * tanh(s / cap), mask, a sink column joining
    the softmax and dropped after it. fp64, GQA by repeating KV heads; mask (B|1, Hq|1, Tq, Tk), default causal."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ kr.transpose(-1, -2) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is None:
        tq, tk = q.shape[2], k.shape[2]
        mask = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    return (p.nan_to_num(0.0) @ vr).transpose(1, 2).float()


EXTRAS = [(20.0, None), (None, "sinks"), (5.0, "sinks")]  # softcap small enough to bend the scores


def _extras(extra, hq):
    cap, with_sinks = extra
    return cap, (torch.randn(hq) * 2 if with_sinks else None)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("kernel", FAST_KERNELS)
def test_softcap_and_sinks_at_full_budget_equal_the_eager_oracle(shape, extra, kernel):
    b, hq, hkv, tq, tk, d, bq, _bk = shape
    q, k, v = qkv(b, hq, hkv, tq, tk, d)
    q = q * 4  # scores of several units: the cap and the sink both matter
    cap, sinks = _extras(extra, hq)
    out = kernels.attend(q, k, v, Selection.dense(b, tq, tk, block=bq), d**-0.5, kernel, softcap=cap, sinks=sinks)
    want = eager_oracle(q, k, v, d**-0.5, softcap=cap, sinks=sinks)
    assert (out - want).abs().max().item() <= TOL
    plain = eager_oracle(q, k, v, d**-0.5)
    assert (out - plain).abs().max().item() > 1e-3  # the feature changed the attention: not a silent no-op


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("extra", EXTRAS)
@pytest.mark.parametrize("heads", ["one", "kv", "q"])
def test_softcap_and_sinks_on_random_selections_match_the_oracle(shape, extra, heads, gather_path):
    """Split kernels merge far and near parts by lse: the sink joins once, the cap applies to every part. The
    compiled kernel cannot cap or sink: such calls run the PyTorch path whichever path this machine chose."""
    b, hq, hkv, tq, tk, d, bq, bk = shape
    q, k, v = qkv(b, hq, hkv, tq, tk, d)
    q = q * 4
    cap, sinks = _extras(extra, hq)
    n_heads = {"one": 1, "kv": hkv, "q": hq}[heads]
    key_mask = torch.ones(b, tk, dtype=torch.bool)
    key_mask[0, : min(5, tk - 1)] = False
    for sinks_n, window, n_blocks, km in [(0, 1, 3, None), (4, 16, 2, key_mask), (2, 9, 6, None)]:
        sel = random_selection(b, n_heads, tq, tk, bq, bk, n_blocks, sinks_n, window, km)
        mask = sel.to_mask().repeat_interleave(hq // n_heads, dim=1)
        want = eager_oracle(q, k, v, d**-0.5, mask, cap, sinks)
        for kernel in FAST_KERNELS:
            out = kernels.attend(q, k, v, sel, d**-0.5, kernel, softcap=cap, sinks=sinks)
            assert (out - want).abs().max().item() <= TOL, (kernel, sinks_n, window, n_blocks)


def test_a_sink_merged_by_lse_equals_one_softmax_with_the_sink():
    """with_sink after merge_parts == the sink inside one softmax (the LSE merge carries it exactly)."""
    from longreach.compat import attention_with_lse_math
    from longreach.kernels.lse import merge_parts, with_sink

    q, k, v = torch.randn(1, 3, 5, 8), torch.randn(1, 3, 12, 8), torch.randn(1, 3, 12, 8)
    sinks = torch.randn(3)
    every = torch.ones(1, 3, 5, dtype=torch.bool)
    parts = [(*attention_with_lse_math(q, k[:, :, a:z], v[:, :, a:z], None, 0.3), every) for a, z in ((0, 7), (7, 12))]
    out, lse = merge_parts(parts)
    got = with_sink(out.transpose(1, 2), lse.transpose(1, 2), sinks)
    want = eager_oracle(q, k, v, 0.3, torch.ones(5, 12, dtype=torch.bool), sinks=sinks)
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("dv", [8, 24])
@pytest.mark.parametrize("tq", [40, 1])
def test_value_heads_wider_or_narrower_than_key_heads(dv, tq, gather_path):
    """Multi-head latent attention: every kernel runs values of another width than q/k (zero-padded inside),
    against PyTorch's own masked attention (which takes unequal widths as they are), prefill and decode, GQA."""
    torch.manual_seed(3)
    q, k, _ = qkv(1, 6, 2, tq, 40, 16)
    v = torch.randn(1, 2, 40, dv)
    sel = random_selection(1, 2, tq, 40, 8, 8, 2, 2, 6)
    mask = sel.to_mask().repeat_interleave(3, dim=1)  # selection head h serves q heads 3h..3h+2
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask, scale=0.3).transpose(1, 2)
    for kernel in ("gather", "reference"):
        out = kernels.attend(q, k, v, sel, 0.3, kernel)
        assert out.shape == (1, tq, 6, dv)
        assert (out - want).abs().max().item() <= TOL, kernel


def test_the_paths_are_timed_in_turns_after_a_warm_up_of_each():
    """A slow spell of the machine must fall on every path, not on whichever is timed first: one untimed call of
    each, then REPEAT rounds in which each path runs once."""
    from longreach.kernels import choice

    order = []
    best = choice.best_seconds({"native": lambda: order.append("n"), "torch": lambda: order.append("t")})
    assert order == ["n", "t"] * (1 + choice.REPEAT)
    assert set(best) == {"native", "torch"} and all(0 <= s < 1 for s in best.values())
