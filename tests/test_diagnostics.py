"""The oracle-gap diagnostics: mass recall and output error against dense, on tiny models and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from longreach import LongreachError, kernels, parse_spec
from longreach.cli import app
from longreach.diagnostics import diagnose, mass_recall
from longreach.methods import SelectContext
from longreach.selection import Selection


def test_mass_recall_is_one_for_dense_and_matches_a_brute_force_sum():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 90, 8), torch.randn(1, 2, 90, 8)
    dense = Selection.dense(1, 90, 90)
    assert torch.allclose(mass_recall(q, k, dense, 0.5), torch.ones(4))
    sel = parse_spec("quest:budget=40,block=16,window=16").selector.select(q, k, SelectContext())
    got = mass_recall(q, k, sel, 0.5)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.5
    s = s.masked_fill(torch.ones(90, 90, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    want = (s * sel.to_mask().repeat_interleave(2, 1)).sum(-1).mean(-1)[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert (got < 1).all() and (got > 0).all()


def test_last_query_recall_is_the_last_rows_mass_on_its_kept_keys():
    """The answer-writing query alone: a streaming window keeps little of its mass, a brute-force sum agrees."""
    model = tiny_model("llama")
    x = torch.randint(0, 128, (1, 96))
    seen = {}

    def spy(layer, q, k, v, scale, sliding, key_mask):
        seen.setdefault(layer, (q.clone(), k.clone(), scale))

    from longreach import apply

    with torch.no_grad(), apply(model, "dense") as handle:
        handle.observer = spy
        model(x)
    spec = "streaming:window=16,sinks=0"
    diag = diagnose(model, x, [spec])
    for r in diag.of(str(parse_spec(spec))):
        q, k, scale = seen[r.layer]
        logits = torch.einsum("hd,htd->ht", q[0, :, -1], k[0].repeat_interleave(2, 0)) * scale
        want = logits.softmax(-1)[:, -16:].sum(-1)  # the window: the last 16 keys
        assert torch.allclose(torch.tensor(r.last_recall), want, atol=1e-5)
        assert max(r.last_recall) < 1


def test_diagnose_on_the_methods_own_inputs_replays_it_where_its_earlier_layers_left_the_model():
    """inputs="method": each method's own forward. Its last-query recall at every layer equals a brute-force sum
    over the queries and keys a spy sees in that method's run (an independent replay); layer 0 sees the same
    inputs as dense, later layers do not, and a full budget reads exactly as on dense's inputs."""
    from longreach import apply

    model = tiny_model("llama")
    x = torch.randint(0, 128, (1, 96))
    spec = "streaming:window=16,sinks=0"
    seen = {}

    def spy(layer, q, k, v, scale, sliding, key_mask):
        seen.setdefault(layer, (q.clone(), k.clone(), scale))

    with torch.no_grad(), apply(model, spec) as handle:
        handle.observer = spy
        model(x)
    own = diagnose(model, x, [spec], inputs="method")
    on_dense = diagnose(model, x, [spec])
    for r in own.of(str(parse_spec(spec))):
        q, k, scale = seen[r.layer]
        logits = torch.einsum("hd,htd->ht", q[0, :, -1], k[0].repeat_interleave(2, 0)) * scale
        assert torch.allclose(torch.tensor(r.last_recall), logits.softmax(-1)[:, -16:].sum(-1), atol=1e-5)
    first_own, first_dense = own.layers[0], on_dense.layers[0]
    assert first_own.layer == first_dense.layer == 0
    assert first_own.recall == pytest.approx(first_dense.recall, abs=1e-6)
    assert any(a.recall != pytest.approx(b.recall, abs=1e-4) for a, b in zip(own.layers[1:], on_dense.layers[1:],
                                                                             strict=True))
    full = "quest:budget=100000,block=16"
    assert [r.recall for r in diagnose(model, x, [full], inputs="method").layers] == \
        [r.recall for r in diagnose(model, x, [full]).layers]


def test_diagnose_refuses_unknown_inputs():
    with pytest.raises(LongreachError, match="inputs must be one of dense, method"):
        diagnose(tiny_model("llama"), torch.randint(0, 128, (1, 32)), ["quest:budget=128"], inputs="own")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_diagnose_reports_every_controlled_layer_and_method(arch):
    model = tiny_model(arch)
    x = torch.randint(0, 128, (1, 160))
    specs = ["quest:budget=100000,block=16", "streaming:window=16,sinks=0", "hip:budget=64,block=16"]
    diag = diagnose(model, x, specs)
    sliding = getattr(model.config, "layer_types", None) or []
    controlled = [i for i in range(model.config.num_hidden_layers)
                  if not (sliding and sliding[i] == "sliding_attention")]
    assert sorted({r.layer for r in diag.layers}) == controlled
    full, window, hip = (diag.summary(str(parse_spec(s))) for s in specs)
    assert full["recall"] == pytest.approx(1.0) and full["output_error"] < 1e-5 and full["density"] == 1.0
    assert 0 < window["recall"] < 1 and window["output_error"] > 1e-3 and window["density"] < 0.2
    assert 0 < hip["recall"] < 1
    assert all(len(r.recall) == model.config.num_attention_heads for r in diag.layers)


def test_diagnose_restores_the_model():
    model = tiny_model("llama")
    x = torch.randint(0, 128, (1, 64))
    with torch.no_grad():
        before = model(x).logits
    diagnose(model, x, ["quest:budget=32,block=16"], layers=[0])
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    assert model.config._attn_implementation == "sdpa"


def test_kernels_agree_on_diagnosed_selection():
    """diagnose measures the kernel it is given; gather and reference must agree on what it replays."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 120, 8), torch.randn(1, 2, 120, 8), torch.randn(1, 2, 120, 8)
    sel = parse_spec("vslash:budget=48,block=16").selector.select(q, k, SelectContext())
    assert (kernels.attend(q, k, v, sel, 0.3, "gather") - kernels.attend(q, k, v, sel, 0.3, "reference")).abs().max() \
        < 1e-5


def test_cli_diagnose_writes_table_json_and_heatmap(tiny_lm_folder, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "diag"
    result = CliRunner().invoke(app, ["diagnose", "--model", str(tiny_lm_folder), "--method", "quest:budget=128",
                                      "--method", "hip:budget=128", "--input", str(prompt), "--no-chat",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "diagnose.json").read_text())
    assert set(data["summary"]) == {"quest:budget=128", "hip:budget=128"}
    assert all(0 < s["recall"] <= 1 for s in data["summary"].values())
    assert (out / "recall.png").stat().st_size > 1000
    assert "oracle gap per layer" in result.output
    assert data["inputs"] == "dense"


def test_cli_diagnose_replays_each_method_on_its_own_forward(tiny_lm_folder, tmp_path):
    out = tmp_path / "diag"
    result = CliRunner().invoke(app, ["diagnose", "--model", str(tiny_lm_folder), "--method", "quest:budget=128",
                                      "--method", "streaming:window=32", "--task", "passkey", "--length", "512",
                                      "--seed", "7", "--corpus", "synthetic", "--no-chat", "--inputs", "method",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "diagnose.json").read_text())
    assert data["inputs"] == "method" and set(data["summary"]) == {"quest:budget=128", "streaming:window=32"}
    assert "each method's own forward" in result.output


@pytest.mark.parametrize("args, message", [
    (["--method", "qeust", "--task", "passkey"], "did you mean 'quest'"),
    (["--method", "quest", "--task", "passkey", "--input", "README.md"], "exactly one of"),
    (["--method", "quest", "--task", "passkey", "--layers", "a"], "not a layer index"),
    (["--method", "quest", "--task", "pasky"], "pasky"),
    (["--method", "quest", "--task", "passkey", "--inputs", "own"], "--inputs must be one of dense, method"),
    (["--method", "quest", "--task", "passkey", "--corpus", "austin"], "unknown corpus 'austin'"),
])
def test_cli_diagnose_refuses_bad_input_before_loading(monkeypatch, args, message):
    import longreach

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(longreach, "load_model", boom)
    result = CliRunner().invoke(app, ["diagnose", "--model", "smollm2-135m", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_sampled_mass_recall_uses_evenly_spaced_queries_including_the_last():
    from longreach.diagnostics import query_sample

    assert query_sample(10, None).tolist() == list(range(10))
    picked = query_sample(1000, 7)
    assert picked[0] == 0 and picked[-1] == 999 and len(picked) == 7
    torch.manual_seed(2)
    q, k = torch.randn(1, 4, 400, 8), torch.randn(1, 2, 400, 8)
    sel = parse_spec("quest:budget=80,block=16,window=16").selector.select(q, k, SelectContext())
    full, sampled = mass_recall(q, k, sel, 0.5), mass_recall(q, k, sel, 0.5, max_queries=400)
    assert torch.allclose(full, sampled)
    assert (mass_recall(q, k, sel, 0.5, max_queries=100) - full).abs().max() < 0.1


def test_best_of_keeps_the_fastest_run_and_the_last_result(monkeypatch):
    """The one timer of diagnostics and benchmarks: a warm-up run is not timed, the minimum is kept."""
    from longreach import diagnostics

    ticks = iter([0.0, 5.0, 10.0, 12.0, 20.0, 23.0])  # runs of 5 s, 2 s, 3 s
    monkeypatch.setattr(diagnostics.time, "perf_counter", lambda: next(ticks))
    calls = []
    out, seconds = diagnostics.best_of(lambda: calls.append(1) or len(calls), repeat=3, warm_up=True)
    assert (out, seconds, len(calls)) == (4, 2.0, 4)
    with pytest.raises(ValueError, match="repeat"):
        diagnostics.best_of(lambda: None, repeat=0)


def test_heatmaps_without_matplotlib_say_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from longreach.diagnostics import Diagnosis, recall_heatmaps
    from longreach.plotting import PlotsUnavailable, pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert pyplot() is None
    with pytest.raises(PlotsUnavailable, match=r"pip install 'longreach\[plots\]'"):
        recall_heatmaps(Diagnosis(8, ["dense"]), tmp_path / "recall.png")
    with pytest.raises(ImportError):  # still what callers caught before
        recall_heatmaps(Diagnosis(8, ["dense"]), tmp_path / "recall.png")
