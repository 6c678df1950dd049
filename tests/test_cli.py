"""CLI: commands list methods, refuse bad input before loading a model, and the benchmark runs end to end."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import typer
from typer.testing import CliRunner

from longreach.cli import app

runner = CliRunner()


def _table_rows(output: str) -> list[list[str]]:
    """The body cells of the rich tables in ``output``; a row wrapped over several lines is joined back."""
    rows: list[list[str]] = []
    for line in output.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
    return rows


def test_methods_lists_every_method_with_defaults():
    """One row per registered method, in name order, with its kind, summary and every dataclass field
    (name=default, in declaration order)."""
    import dataclasses

    from longreach.methods import method_class, method_names

    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    rows = _table_rows(result.output)
    names = [r[0] for r in rows]
    assert names == method_names() == sorted(names)
    assert {"dense", "streaming", "quest", "moba", "snapkv", "selfextend", "string", "mspoe", "gali", "linear",
            "dynamic", "yarn", "llama3", "longrope"} <= set(names)  # the documented families are all there
    for name, kind, summary, params in rows:
        cls = method_class(name)
        assert kind == cls.kind and summary == " ".join(cls.summary.split())
        fields = dataclasses.fields(cls)
        assert params == (", ".join(f"{f.name}={f.default}" for f in fields) or "-"), name
    quest = dict(pair.split("=") for pair in rows[names.index("quest")][3].split(", "))
    assert quest["block"] == "64" and quest["sinks"] == "4" and quest["density"] == "None"


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


def _streaming_density(length: int, phase: str, sinks: int, window: int) -> float:
    """StreamingLLM's share of the causal pairs: query p sees its last ``window`` keys plus the first ``sinks``."""
    queries = range(length) if phase == "prefill" else [length - 1]
    seen = sum(min(p + 1, window) + min(sinks, max(0, p + 1 - window)) for p in queries)
    return seen / sum(p + 1 for p in queries)


def _quest_density_bounds(length: int, phase: str, density: float, block: int, sinks: int) -> tuple[float, float]:
    """The share of causal pairs a block top-k method with ``density=`` may read, from its documented budget:
    a query block may read ``floor(density x causal keys of its last query)`` keys, sinks and the local window
    (one block) included and always read, the rest as whole key blocks chosen behind the window. Fewest: every
    chosen block also covers the sinks and as much of a query's window as it can; most: the whole budget."""
    queries = range(length) if phase == "prefill" else [length - 1]
    low = high = 0
    for p in queries:
        last = min(p // block * block + block - 1, length - 1) if phase == "prefill" else p
        budget = math.floor(density * (last + 1))
        behind = sum(1 for start in range(0, length, block) if start <= last - block and start + block > sinks)
        take = max(0, min((budget - sinks - block) // block, behind))
        shared = sinks + block - 1 - p % block  # keys a chosen block may share with the sinks and p's window
        low += min(p + 1, min(p + 1, block + sinks) + max(0, take * block - shared))
        high += min(p + 1, max(budget, sinks + block))
    causal = sum(p + 1 for p in queries)
    return low / causal, high / causal


def test_bench_attention_smoke(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = runner.invoke(app, ["bench", "attention", "--lengths", "256,512", "--heads", "4,2,16;8,2,32",
                                 "--repeat", "1", "--phases", "prefill,decode", "--plot", str(png),
                                 "--methods", "quest:density=0.5,block=32;streaming:window=64", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows, peak = report["rows"], report["roofline"]
    assert [(r["heads"], r["length"], r["phase"], r["spec"]) for r in rows] == [
        (h, t, p, m) for h in ("4/2/16", "8/2/32") for t in (256, 512) for p in ("prefill", "decode")
        for m in ("quest:density=0.5,block=32", "streaming:window=64")]
    assert all(r["kernel"] == "gather" for r in rows)
    # the gather path each shape and phase ran on, as this machine measured it (forced paths say so instead)
    choice = report["kernel_choice"]
    assert set(choice) == {f"{h}/{p}" for h in ("4/2/16", "8/2/32") for p in ("prefill", "decode")}
    for made in choice.values():
        assert made["path"] in ("native", "torch")
        if made["why"].startswith("measured"):
            assert made["path"] == min(("native", "torch"), key=lambda p: made[p])
    for r in rows:
        q_heads, kv_heads, dim = (int(x) for x in r["heads"].split("/"))
        t, density = r["length"], r["density"]
        if r["spec"].startswith("streaming"):  # a fixed pattern: its density is known exactly
            assert density == pytest.approx(_streaming_density(t, r["phase"], 4, 64), abs=1e-12)
        else:  # quest: within what its budget allows, and near the requested 0.5
            low, high = _quest_density_bounds(t, r["phase"], 0.5, 32, 4)
            assert low <= density <= high and abs(density - 0.5) < 0.15
            if r["phase"] == "decode":
                assert density <= 0.5
        # the documented arithmetic: ratios, attended FLOPs / bytes, and the fraction of the measured roofline
        assert r["speedup"] == pytest.approx(r["dense_s"] / (r["select_s"] + r["attend_s"]), rel=1e-9)
        assert r["speedups"] == [pytest.approx(r["speedup"], rel=1e-9)]  # one repeat: its ratio is the median's
        pairs = q_heads * (t * (t + 1) / 2 if r["phase"] == "prefill" else t)
        assert r["dense_flops"] == 4 * dim * pairs and r["dense_bytes"] == 2 * kv_heads * t * dim * 4
        assert r["flops"] == pytest.approx(r["dense_flops"] * density, rel=1e-9)
        assert r["kv_bytes"] == pytest.approx(r["dense_bytes"] * density, rel=1e-9)
        if r["phase"] == "decode":
            rate, ceiling = r["kv_bytes"] / r["attend_s"], peak["read_gb_per_s"] * 1e9
            dense_rate = r["dense_bytes"] / r["dense_s"]
        else:
            rate, ceiling = r["flops"] / r["attend_s"], peak["matmul_gflops"] * 1e9
            dense_rate = r["dense_flops"] / r["dense_s"]
        assert r["roofline_fraction"] == pytest.approx(rate / ceiling, rel=1e-6)
        assert r["dense_roofline_fraction"] == pytest.approx(dense_rate / ceiling, rel=1e-6)
    # the printed table shows the same rows, in the same order, with the same densities and speedups
    printed = _table_rows(result.output)
    assert [(c[0], c[1], c[2], c[5], c[9]) for c in printed] == [
        (r["phase"], r["heads"], str(r["length"]), f"{r['density']:.3f}", f"{r['speedup']:.2f}x") for r in rows]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


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
    from statistics import median

    out, png = tmp_path / "e2e.json", tmp_path / "e2e.png"
    result = runner.invoke(app, ["bench", "e2e", "--model", str(tiny_lm_folder), "--lengths", "300",
                                 "--methods", "dense;quest:density=0.5,block=32;snapkv:density=0.5",
                                 "--new-tokens", "4", "--corpus", "synthetic", "--repeats", "2",
                                 "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "llama.cpp column skipped" in result.output  # a HF folder is not a GGUF
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["method"] for r in rows] == ["transformers", "dense", "quest:density=0.5,block=32", "snapkv:density=0.5"]
    assert all(r["decode_tokens"] == 3 and r["length"] == 300 for r in rows)  # 4 new tokens: 1 + 3 decode steps
    assert all(r["machine"] == report["hardware"] for r in rows) and "threads" in report["hardware"]
    assert "not a GGUF" in report["peer_note"]
    config = json.loads((tiny_lm_folder / "config.json").read_text())
    per_token = (2 * config["num_hidden_layers"] * config["num_key_value_heads"]  # K and V, float32
                 * config["hidden_size"] // config["num_attention_heads"] * 4)
    weights = sum(p.numel() * 4 for p in tiny_model_from(tiny_lm_folder).parameters())
    by = {(r["length"], r["method"]): r for r in rows}
    for n in (300,):
        base = by[(n, "transformers")]
        assert base["kv_bytes"] == (n + 3) * per_token  # transformers' cache: prompt + decoded, exactly
        # longreach's growing cache, reserved for the whole generation: exactly what transformers' holds
        assert by[(n, "dense")]["kv_bytes"] == (n + 3) * per_token
        assert by[(n, "quest:density=0.5,block=32")]["kv_bytes"] == by[(n, "dense")]["kv_bytes"]  # drops none
        # the press keeps half of the prompt before its held-back last token, then room for that token and the
        # 3 decoded ones: no spare
        kept = (n - 1) // 2 + 1
        assert by[(n, "snapkv:density=0.5")]["kv_bytes"] == (kept + 3) * per_token
        # a decode step reads the weights and the KV it attends: all of it for dense, about half for quest 50%
        assert by[(n, "dense")]["decode_bytes"] == weights + by[(n, "dense")]["kv_bytes"]
        quest_kv = by[(n, "quest:density=0.5,block=32")]["decode_bytes"] - weights
        assert 0.3 * by[(n, "dense")]["kv_bytes"] < quest_kv < 0.8 * by[(n, "dense")]["kv_bytes"]
        for r in (by[(n, m)] for m in ("transformers", "dense", "quest:density=0.5,block=32", "snapkv:density=0.5")):
            assert len(r["ttft_runs"]) == len(r["decode_runs"]) == len(r["rss_runs"]) == 2  # one per fresh process
            assert r["ttft_s"] == median(r["ttft_runs"]) and r["decode_tok_s"] == median(r["decode_runs"])
            assert math.isfinite(r["decode_tok_s"]) and r["decode_tok_s"] > 0 and r["ttft_s"] > 0
            assert r["ttft_speedup"] == pytest.approx(base["ttft_s"] / r["ttft_s"], rel=1e-9)
            assert r["decode_speedup"] == pytest.approx(r["decode_tok_s"] / base["decode_tok_s"], rel=1e-9)
            # the bandwidth measured right after each run: the bound is their median, the share the median of each
            # run's tokens/s against its own bound
            assert len(r["bandwidth_runs"]) == 2 and all(bw > 1e8 for bw in r["bandwidth_runs"])
            if r["decode_bytes"]:
                assert r["decode_bound_tok_s"] == pytest.approx(median(r["bandwidth_runs"]) / r["decode_bytes"])
                pairs = zip(r["decode_runs"], r["bandwidth_runs"], strict=True)
                shares = [t / (bw / r["decode_bytes"]) for t, bw in pairs]
                assert r["decode_bound_share"] == pytest.approx(median(shares))
    # the printed table: the same rows, medians with their spread, speedups and KV MiB
    printed = _table_rows(result.output)
    assert [(c[0], c[1], c[4], c[5], c[8]) for c in printed] == [
        (str(r["length"]), r["method"], f"{r['ttft_speedup']:.2f}x", f"{r['decode_speedup']:.2f}x",
         f"{r['kv_bytes'] / 2**20:.1f}") for r in rows]
    assert all(c[2].startswith(f"{r['ttft_s']:.2f} (") for c, r in zip(printed, rows, strict=True))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_bench_e2e_refuses_a_prompt_longer_than_the_text(tiny_lm_folder):
    result = runner.invoke(app, ["bench", "e2e", "--model", str(tiny_lm_folder), "--lengths", "1024k",
                                 "--corpus", "synthetic", "--no-peer"])
    assert result.exit_code == 2 and "fewer than" in result.output


# every command, as a user types it; the test below checks this list against what the app registers
COMMANDS = [("methods",), ("generate",), ("plan",), ("diagnose",), ("eval",), ("report",), ("demo",), ("corpus",),
            ("bench", "attention"), ("bench", "e2e"), ("bench", "selection"), ("heads", "profile"), ("heads", "show"),
            ("heads", "posdim"),
            ("models", "check"), ("tune",), ("serve",), ("lookback", "ratios"), ("lookback", "dataset"),
            ("lookback", "fit")]


def _help(module: str, *command: str) -> tuple[int, str]:
    """``python -m MODULE COMMAND --help`` in a fresh interpreter: exit code and output without colour codes."""
    done = subprocess.run([sys.executable, "-m", module, *command, "--help"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200"})
    return done.returncode, re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)


def _leaf_commands(group: typer.core.TyperGroup, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for name, cmd in group.commands.items():
        out |= _leaf_commands(cmd, (*prefix, name)) if isinstance(cmd, typer.core.TyperGroup) else {(*prefix, name)}
    return out


@pytest.mark.slow
def test_python_m_longreach_helps_for_every_command():
    """A fresh ``python -m longreach`` sees every command: unlike CliRunner on an imported app, it only finds
    what was registered before the app ran (the old single module ran it before the heads commands existed)."""
    assert _leaf_commands(typer.main.get_command(app)) == set(COMMANDS)
    commands = [(), ("bench",), ("heads",), *COMMANDS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: _help("longreach", *c), commands))
    for command, (code, output) in zip(commands, results, strict=True):
        assert code == 0, (command, output)
        assert " ".join(("Usage: python -m longreach", *command)) + " [OPTIONS]" in output, (command, output)


@pytest.mark.slow
def test_python_m_longreach_cli_lists_the_heads_commands():
    code, output = _help("longreach.cli", "heads")
    assert code == 0, output
    assert "Usage: python -m longreach.cli heads [OPTIONS]" in output
    assert re.search(r"^│ profile ", output, re.M) and re.search(r"^│ show ", output, re.M), output


def test_bench_attention_user_path_rows(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "attention", "--lengths", "256,512", "--heads", "4,2,16", "--repeat", "1",
                                 "--methods", "quest:density=0.5,block=32;moba:density=0.5,block=32", "--user-path",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["user_path"]
    assert [(r["length"], r["spec"], r["heads"]) for r in rows] == [
        (t, m, "4/2/16") for t in (256, 512) for m in ("quest:density=0.5,block=32", "moba:density=0.5,block=32")]
    for r in rows:
        assert r["overhead"] == pytest.approx(r["runtime_s"] / r["operator_s"] - 1)
    assert "the user's path" in result.output


def tiny_model_from(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder)


def test_models_check_writes_the_matrix_it_prints(tmp_path):
    """The command, as a user runs it on a subset: its page is the library's matrix for the same cells."""
    from longreach.conformance import markdown, run_matrix

    out = tmp_path / "models.md"
    result = runner.invoke(app, ["models", "check", "--families", "llama,gemma2", "--methods", "dense,quest,homer",
                                 "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "5 ✓, 1 refused, 0 ✗ over 6 cells" in result.output
    page = out.read_text()
    assert page.rstrip("\n") == markdown(run_matrix(["llama", "gemma2"], ["dense", "quest", "homer"])).rstrip("\n")
    assert "| `homer` | ✓ | refused [1](#r1) |" in page and "use a position method instead" in page
    bad = runner.invoke(app, ["models", "check", "--families", "llama,nosuch", "--quiet"])
    assert bad.exit_code != 0 and "unknown families nosuch" in bad.output


def test_heads_posdim_writes_the_library_dims(tiny_lm_folder, tmp_path):
    from longreach import load_model
    from longreach.eval import Corpus
    from longreach.heads.posdim import find_position_dims
    from longreach.position.posdim import PositionDims

    out = tmp_path / "dims.json"
    result = runner.invoke(app, ["heads", "posdim", "--model", str(tiny_lm_folder), "--length", "200", "--corpus",
                                 "synthetic", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = PositionDims.load(out)
    lm, tok = load_model(str(tiny_lm_folder))
    want = find_position_dims(lm, tok, "".join(Corpus.synthetic().passage(0, 400)), 200, 4)
    assert saved.layers == want.layers == 2 and saved.head_dim == want.head_dim
    import torch

    assert torch.allclose(torch.tensor(saved.scores), torch.tensor(want.scores), atol=1e-4)  # saved to 4 decimals
    assert f"layer  0: dim {saved.best(0)[0]} " in result.output
    assert runner.invoke(app, ["heads", "posdim", "--model", str(tiny_lm_folder), "--out", str(tmp_path)]
                         ).exit_code != 0  # a folder as --out is refused


def test_report_pairs_with_the_baseline_it_is_given(tmp_path):
    rows = [{"model": "m", "method": method, "task": "passkey", "metric": "accuracy", "length": 16384, "depth": d,
             "seed": i, "chat": True, "corpus": "c", "score": float(score), "prefill_s": 1.0}
            for method, scores in (("selfextend", [1, 1, 1, 1]), ("homer", [1, 0, 1, 0]))
            for i, (d, score) in enumerate(zip((0.0, 0.0, 1.0, 1.0), scores, strict=True))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = runner.invoke(app, ["report", str(tmp_path), "--baseline", "selfextend"])
    assert result.exit_code == 0, result.output
    assert "| homer | 16384 | 4 | -50.0 |" in result.output and "1/2, -50.0 [" in result.output
    bad = runner.invoke(app, ["report", str(tmp_path), "--baseline", "dense"])
    assert bad.exit_code != 0 and "baseline 'dense' has no rows" in bad.output and "selfextend, homer" in bad.output
