"""CLI: commands list methods, refuse bad input before loading a model, and the benchmark runs end to end."""

from __future__ import annotations

import json

import pytest
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
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = runner.invoke(app, ["bench", "attention", "--lengths", "256,512", "--heads", "4,2,16;8,2,32",
                                 "--repeat", "1", "--phases", "prefill,decode", "--plot", str(png),
                                 "--methods", "quest:density=0.5,block=32;streaming:window=64", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["roofline"]["matmul_gflops"] > 0 and report["roofline"]["read_gb_per_s"] > 0
    assert len(rows) == 2 * 2 * 2 * 2  # lengths x head shapes x phases x methods
    assert {(r["phase"], r["heads"]) for r in rows} == {(p, h) for p in ("prefill", "decode")
                                                        for h in ("4/2/16", "8/2/32")}
    assert all(r["speedup"] > 0 and 0 < r["density"] <= 1 and r["roofline_fraction"] > 0 for r in rows)
    decode = [r for r in rows if r["phase"] == "decode"]
    assert all(r["kv_bytes"] <= r["dense_bytes"] for r in decode)
    assert png.stat().st_size > 1000


def test_bench_attention_refuses_bad_options():
    bad_phase = runner.invoke(app, ["bench", "attention", "--phases", "both", "--lengths", "256"])
    assert bad_phase.exit_code == 2 and "prefill and/or decode" in bad_phase.output
    bad_spec = runner.invoke(app, ["bench", "attention", "--methods", "qeust", "--lengths", "256"])
    assert bad_spec.exit_code == 2 and "did you mean" in bad_spec.output


def test_bench_selection_reports_a_t_log_t_fit():
    result = runner.invoke(app, ["bench", "selection", "--method", "hip:budget=256,block=32", "--lengths",
                                 "512,1k,2k", "--heads", "2,1,16", "--repeat", "1"])
    assert result.exit_code == 0, result.output
    assert "log-log slope" in result.output and "T log T fit" in result.output


def test_fit_recovers_t_log_t_and_quadratic_slopes():
    import math

    from longreach.bench.attention import fit_t_log_t

    lengths = [4096, 8192, 16384, 32768, 65536]
    exact = fit_t_log_t(lengths, [3e-7 * t * math.log2(t) for t in lengths])
    assert exact.max_rel_residual < 1e-9 and 1.0 < exact.slope < 1.15
    quad = fit_t_log_t(lengths, [1e-9 * t * t for t in lengths])
    assert quad.slope == pytest.approx(2.0) and quad.max_rel_residual > 0.5


def test_bench_e2e_smoke(tiny_lm_folder, tmp_path):
    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    result = runner.invoke(app, ["bench", "e2e", "--model", str(tiny_lm_folder), "--lengths", "300,600",
                                 "--methods", "dense;quest:density=0.5,block=32;snapkv:density=0.5",
                                 "--new-tokens", "4", "--corpus", "synthetic", "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "llama.cpp column skipped" in result.output  # a HF folder is not a GGUF
    rows = json.loads(out.read_text())["rows"]
    assert [(r["length"], r["method"]) for r in rows] == [
        (n, m) for n in (300, 600)
        for m in ("transformers", "dense", "quest:density=0.5,block=32", "snapkv:density=0.5")]
    assert all(r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and r["decode_tokens"] == 3 for r in rows)
    by = {(r["length"], r["method"]): r for r in rows}
    assert by[(600, "snapkv:density=0.5")]["kv_bytes"] < by[(600, "dense")]["kv_bytes"]
    assert by[(600, "transformers")]["ttft_speedup"] == 1.0
    assert all(r["ttft_speedup"] > 0 for r in rows)
    assert png.stat().st_size > 1000


def test_bench_e2e_refuses_a_prompt_longer_than_the_text(tiny_lm_folder):
    result = runner.invoke(app, ["bench", "e2e", "--model", str(tiny_lm_folder), "--lengths", "1024k",
                                 "--corpus", "synthetic", "--no-peer"])
    assert result.exit_code == 2 and "fewer than" in result.output
