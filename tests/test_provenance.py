"""Provenance: every eval row, bench JSON and diagnose JSON names its code, versions, CPU and threads; the
report shows them and flags speed ratios that divide times from different machines or commits."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import longreach
from longreach.cli import app
from longreach.eval import build_report
from longreach.provenance import code_state, isa, provenance

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
FIELDS = {"commit", "dirty", "longreach", "torch", "transformers", "cpu", "isa", "threads"}


def check_provenance(prov: dict) -> None:
    """Each field against the machine, read independently of the provenance module."""
    assert set(prov) >= FIELDS
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert prov["commit"] == head.stdout.strip()
    assert isinstance(prov["dirty"], bool)
    assert prov["torch"] == torch.__version__ and prov["transformers"] == transformers.__version__
    assert prov["longreach"] == longreach.__version__
    assert prov["threads"] == torch.get_num_threads()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert prov["cpu"] in cpuinfo
    assert prov["isa"] in ("amx", "avx512", "avx2", "x86_64", "aarch64")
    if prov["isa"] == "avx512":
        assert " avx512f" in cpuinfo


@pytest.mark.parametrize(("flags", "expected"), [({"avx2", "fma"}, "avx2"), ({"avx2", "avx512f"}, "avx512"),
                                                 ({"avx2", "avx512f", "amx_tile"}, "amx")])
def test_isa_names_the_widest_extension(flags, expected):
    assert isa(flags) == expected


def test_the_dirty_flag_follows_the_library_code(tmp_path):
    """Read uncached, next to git's own answer (provenance() is read once per process, and a session may edit)."""
    commit, dirty = code_state()
    changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--",
                              "src", "pyproject.toml", "requirements"], capture_output=True, text=True)
    assert dirty == bool(changed.stdout.strip()) and commit == provenance()["commit"]


def test_bench_json_records_its_provenance(tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "attention", "--lengths", "256", "--heads", "4,2,16", "--methods",
                                 "quest:density=0.5", "--repeat", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    check_provenance(data["provenance"])
    assert data["provenance"]["cpu"] in data["hardware"]


@pytest.mark.model
def test_eval_rows_and_diagnose_json_record_their_provenance(tmp_path, tiny_lm_folder):
    evals = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(tiny_lm_folder), "--tasks", "passkey", "--lengths", "300",
                                 "--methods", "dense", "--samples", "1", "--out", str(evals), "--quiet"])
    assert result.exit_code == 0, result.output
    row = json.loads((evals / "results.jsonl").read_text().splitlines()[0])
    check_provenance(row["provenance"])
    assert row["provenance"]["cpu"] in build_report(evals).markdown
    diag = tmp_path / "diag"
    result = runner.invoke(app, ["diagnose", "--model", str(tiny_lm_folder), "--task", "passkey", "--length", "300",
                                 "--method", "quest:density=0.5", "--out", str(diag)])
    assert result.exit_code == 0, result.output
    check_provenance(json.loads((diag / "diagnose.json").read_text())["provenance"])


def rows_of(method: str, prefill_s: float, cpu: str, commit: str) -> list[dict]:
    prov = {"cpu": cpu, "isa": "avx2", "threads": 2, "commit": commit, "dirty": False, "torch": "2.13.0",
            "transformers": "5.24.0", "longreach": "0.1.0"}
    return [{"model": "m", "method": method, "task": "passkey", "metric": "accuracy", "length": 1024, "depth": 0.5,
             "seed": s, "chat": True, "corpus": "c", "score": 1.0, "prefill_s": prefill_s, "decode_s": 0.1,
             "decode_tokens": 4, "provenance": prov} for s in range(2)]


@pytest.mark.parametrize("same", [True, False])
def test_report_shows_provenance_and_flags_ratios_across_machines(tmp_path, same):
    rows = rows_of("dense", 2.0, "AMD EPYC", "abc") + rows_of("quest:density=0.1", 1.0,
                                                              "AMD EPYC" if same else "Intel Xeon", "abc")
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = build_report(tmp_path).markdown
    assert "AMD EPYC (avx2), 2 threads, torch 2.13.0" in text
    flagged = "| quest:density=0.1 | 1024 | 2 | 100% (34%–100%) | – | – | 1.00 | 2.00x† |" in text  # no answer, density
    plain = "| quest:density=0.1 | 1024 | 2 | 100% (34%–100%) | – | – | 1.00 | 2.00x |" in text
    assert (plain, flagged) == (same, not same)
    assert ("Intel Xeon" in text) == (not same)
