"""Provenance: every eval row, bench JSON and diagnose JSON names its code, versions, CPU and threads; the
report shows them and flags speed ratios that divide times from different machines or commits, or whose rows
shared the cores with other work."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import longreach
from longreach.cli import app
from longreach.eval import build_report, sharing
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
    assert 0.0 <= row["others_cpu"] <= 1.0  # Linux: the share of the machine's CPU time outside this process
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


def test_proc_stat_is_read_as_busy_seconds_and_cpus():
    """user + nice + system + irq + softirq + steal, in ticks (idle and iowait are not busy; guest is inside user)."""
    text = ("cpu  100 20 30 5000 40 5 6 7 50 0\n"
            "cpu0 50 10 15 2500 20 2 3 3 25 0\ncpu1 50 10 15 2500 20 3 3 4 25 0\nintr 12345\nctxt 999\n")
    busy, cpus = sharing.parse_stat(text, 100)
    assert busy == pytest.approx((100 + 20 + 30 + 5 + 6 + 7) / 100) and cpus == 2


@pytest.mark.parametrize(("busy", "mine", "want"), [(3.0, 1.0, 0.5), (1.0, 1.0, 0.0), (2.0, 2.5, 0.0), (9.0, 0.0, 1.0)])
def test_others_share_is_the_machine_time_outside_this_process(busy, mine, want):
    """2 s of wall time on 2 CPUs is 4 CPU-seconds: what the machine spent busy beyond this process, as a share of
    that (clamped to 0..1: tick rounding can put this process's own time above the machine's)."""
    before = sharing.Snapshot(wall=10.0, mine=5.0, busy=100.0, cpus=2)
    after = sharing.Snapshot(wall=12.0, mine=5.0 + mine, busy=100.0 + busy, cpus=2)
    assert sharing.others_share(before, after) == pytest.approx(want)
    assert sharing.others_share(replace(before, busy=None), after) is None  # no /proc/stat: not recorded


def test_this_machine_reports_a_share():
    """On Linux a snapshot reads /proc/stat, so rows record a share; its CPU count is the one the OS reports."""
    snap = sharing.snapshot()
    assert snap.busy is not None and snap.busy > 0 and snap.cpus == os.cpu_count()


@pytest.mark.parametrize("busy", [None, 0.02, 0.4])
def test_report_marks_speed_ratios_whose_rows_shared_the_cores(tmp_path, busy):
    dense, quest = rows_of("dense", 2.0, "AMD EPYC", "abc"), rows_of("quest:density=0.1", 1.0, "AMD EPYC", "abc")
    if busy is not None:
        for row in dense + quest:
            row["others_cpu"] = 0.0
        quest[1]["others_cpu"] = busy
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dense + quest))
    text = build_report(tmp_path).markdown
    marked = "| 1.00 | 2.00x‡ |" in text
    assert marked == (busy == 0.4) and (("| 1.00 | 2.00x |" in text) == (busy != 0.4))
    assert ("1 of 4 rows shared the cores" in text) == (busy == 0.4)
    assert ("4 of 4 rows do not record whether the cores were shared" in text) == (busy is None)


def test_report_gives_the_selector_stages_share_where_rows_recorded_it(tmp_path):
    """Per cell: the mean select_s per sample, its share of prefill time, and per decode token. Dense (its selector
    takes under 1% of either phase), rows written before select_s was recorded, and rows that did not measure it
    (None) add no line; a zero prefill time divides nothing. Worked by hand: quest's rows select 0.25 s and 0.35 s
    of 1.0 s prefills (0.30 s per sample, 30%), and 0.02 s of 0.1 s decodes over 4 tokens each (5.0 ms, 20%)."""
    dense, quest = rows_of("dense", 2.0, "AMD EPYC", "abc"), rows_of("quest:density=0.1", 1.0, "AMD EPYC", "abc")
    old, lserve = rows_of("quest:density=0.2", 1.0, "AMD EPYC", "abc"), rows_of("lserve", 1.0, "AMD EPYC", "abc")
    instant = rows_of("loki", 0.0, "AMD EPYC", "abc")
    for row, select, per_decode in zip(dense + quest + instant, (0.001, 0.001, 0.25, 0.35, 0.0, 0.0),
                                       (0.0001, 0.0001, 0.02, 0.02, 0.0, 0.0), strict=True):
        row["select_s"], row["select_decode_s"] = select, per_decode
    for row in lserve:
        row["select_s"] = row["select_decode_s"] = None
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dense + quest + old + lserve
                                                    + instant))
    text = build_report(tmp_path).markdown
    lines = [line for line in text.splitlines() if line.startswith("- ") and " at 1024: prefill" in line]
    assert lines == ["- quest:density=0.1 at 1024: prefill 0.30 s per sample (30% of prefill); decode 5.0 ms per "
                     "token (20% of decode); 2 rows"]
