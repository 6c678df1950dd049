"""CLI: commands list methods, refuse bad input before loading a model, and the benchmark runs end to end."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from longreach.cli import app

runner = CliRunner()


def test_methods_lists_every_method_with_defaults():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("dense", "streaming", "quest", "moba"):
        assert name in result.output
    assert "block=64" in result.output


def test_generate_refuses_a_bad_spec_before_loading(tmp_path, monkeypatch):
    import longreach
    import longreach.models

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded for a bad spec")

    monkeypatch.setattr(longreach.models, "load_model", boom)
    monkeypatch.setattr(longreach, "load_model", boom)
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    result = runner.invoke(app, ["generate", "--model", "smollm2-135m", "--method", "qeust", "--input", str(prompt)])
    assert result.exit_code == 2
    assert "did you mean 'quest'" in result.output


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "attention", "--lengths", "256", "--heads", "4,2,16", "--repeat", "1",
                                 "--methods", "quest:density=0.5,block=32;streaming:window=64", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [r["spec"] for r in rows] == ["quest:density=0.5,block=32", "streaming:window=64"]
    assert all(r["speedup"] > 0 and 0 < r["density"] <= 1 for r in rows)
