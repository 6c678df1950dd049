"""The sweep runner: resume after a kill gives the same rows as one uninterrupted run, corrupt lines are
reported (never silently dropped), bad specs fail before any model loads, reports hold honest statistics."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import longreach
from longreach.cli import app
from longreach.errors import InputError, SpecError
from longreach.eval import Corpus, build_report, make_sweep, pending, run_local
from longreach.eval.report import mean_ci, wilson
from longreach.eval.results import ResultsWriter, read_rows, row_key
from longreach.eval.runner import run_cells

cli = CliRunner()
SWEEP = dict(tasks="passkey,niah:variant=multivalue,kvret,ppl:buckets=4", methods="dense,streaming:window=64",
             lengths="256,384", samples=2, corpus="synthetic")


@pytest.fixture(scope="module")
def tiny(tiny_lm_folder):
    return longreach.load_model(tiny_lm_folder)


def sweep_for(folder, **overrides):
    return make_sweep(str(folder), **{**SWEEP, **overrides})


def drop_volatile(row):
    return {k: v for k, v in row.items() if k not in ("prefill_s", "decode_s", "peak_rss_mb", "time", "others_cpu",
                                                  "select_s", "select_decode_s")}


def test_resume_after_a_kill_gives_the_rows_of_an_uninterrupted_run(tmp_path, tiny, tiny_lm_folder):
    model, tok = tiny
    sweep = sweep_for(tiny_lm_folder)
    corpus = Corpus.synthetic()
    whole = tmp_path / "whole"
    todo, bad, done = pending(sweep, whole)
    assert (bad, done) == ([], 0) and sum(map(len, todo.values())) == 2 * 4 * 2 * 2
    assert run_local(sweep, whole, todo, model, tok, corpus) == 32

    killed = tmp_path / "killed"
    killed.mkdir()
    with ResultsWriter(killed / "results.jsonl") as writer:  # the first 11 rows land, then the process dies...
        for i, row in enumerate(run_cells(sweep, todo, model, tok, corpus)):
            writer.append(row)
            if i == 10:
                break
    with open(killed / "results.jsonl", "a") as fh:  # ...halfway through writing the 12th
        fh.write(json.dumps(row)[:57])
    todo2, bad2, done2 = pending(sweep, killed)
    assert done2 == 11 and len(bad2) == 1 and "truncated" in bad2[0].reason and bad2[0].line == 12
    run_local(sweep, killed, todo2, model, tok, corpus)

    rows_a, _ = read_rows(whole / "results.jsonl")
    rows_b, bad_b = read_rows(killed / "results.jsonl")
    assert len(bad_b) == 1  # the torn line stays visible, closed by a newline, never glued to a new row
    assert len(rows_b) == len({row_key(r) for r in rows_b}) == 32  # nothing lost, nothing duplicated
    by_key = {row_key(r): drop_volatile(r) for r in rows_a}
    assert {row_key(r): drop_volatile(r) for r in rows_b} == by_key
    assert pending(sweep, killed)[0] == {}  # a third run has nothing left to do


def test_rows_record_what_users_need(tmp_path, tiny, tiny_lm_folder):
    model, tok = tiny
    sweep = sweep_for(tiny_lm_folder, lengths="256", samples=1)
    todo, _, _ = pending(sweep, tmp_path)
    run_local(sweep, tmp_path, todo, model, tok, Corpus.synthetic())
    rows, _ = read_rows(tmp_path / "results.jsonl")
    needed = {"task", "length", "depth", "method", "seed", "prediction", "gold", "score", "prefill_s", "decode_s",
              "density", "kv_bytes", "peak_rss_mb", "version", "model", "tokens", "chat", "prompt_sha", "select_s",
              "select_decode_s"}
    for row in rows:
        assert needed <= set(row), needed - set(row)
        assert row["version"] == longreach.__version__ and row["model"] == str(tiny_lm_folder)
        assert row["kv_bytes"] > 0 and row["peak_rss_mb"] > 0 and row["prefill_s"] > 0
        assert (row["density"] == 1.0) == (row["method"] == "dense")
        assert 0.0 <= row["select_s"] <= row["prefill_s"]  # the selector stage is part of the prefill
        if not row["task"].startswith("ppl"):  # a lead where the answer scored (tests/test_generation.py)
            assert (row["answer_lead"] is None) == (row["score"] == 0)
            assert row["answer_lead"] is None or 0.0 <= row["answer_lead"] <= 1.0
    ppl = [r for r in rows if r["task"].startswith("ppl")]
    assert len(ppl) == 2 and all(len(r["loss_buckets"]) == 4 and r["score"] > 1 for r in ppl)


def test_full_window_perplexity_equals_dense(tmp_path, tiny, tiny_lm_folder):
    model, tok = tiny
    sweep = make_sweep(str(tiny_lm_folder), "ppl", "dense,streaming:window=4096", "256", samples=1, corpus="synthetic")
    todo, _, _ = pending(sweep, tmp_path)
    run_local(sweep, tmp_path, todo, model, tok, Corpus.synthetic())
    rows = {r["method"]: r for r in read_rows(tmp_path / "results.jsonl")[0]}
    assert rows["dense"]["loss"] == pytest.approx(rows["streaming:window=4096"]["loss"], abs=1e-5)


def test_corrupt_lines_are_reported_and_their_samples_rerun(tmp_path, tiny_lm_folder, monkeypatch):
    out = tmp_path / "run"
    args = ["eval", "--model", str(tiny_lm_folder), "--tasks", "passkey", "--methods", "dense", "--lengths", "256",
            "--samples", "2", "--corpus", "synthetic", "--out", str(out), "--quiet"]
    first = cli.invoke(app, args)
    assert first.exit_code == 0, first.output
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n{not json\n" + '{"model": "x"}\n')
    again = cli.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "line 2: not valid JSON" in again.output and "line 3: missing fields" in again.output
    rows, bad = read_rows(out / "results.jsonl")
    assert len(rows) == 2 and len(bad) == 2 and (out / "report.html").exists()
    report = cli.invoke(app, ["report", str(out)])
    assert report.exit_code == 0 and "line 2: not valid JSON" in report.output
    assert "| dense | 256 | 2 |" in report.output


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--tasks", "passkey,nia", "did you mean 'niah'"),
    ("--tasks", "niah:variant=double", "variant must be one of"),
    ("--methods", "dense,qeust:density=0.1", "did you mean 'quest'"),
    ("--methods", "quest:density=2", "density must be in"),
    ("--lengths", "2k,lots", "'lots' is not a length"),
    ("--lengths", "8", "out of range"),
    ("--depths", "0.5,2", "depths must be numbers in [0, 1]"),
    ("--samples", "0", "--samples must be >= 1"),
    ("--executor", "slurm", "unknown executor"),
    ("--kernel", "cuda", "unknown kernel"),
    # shorter than the instructions: found by building a prompt with the bundled tokenizer
    pytest.param("--lengths", "64", "task passkey at length 64", marks=pytest.mark.model),
])
def test_bad_specs_fail_before_any_model_is_loaded(tmp_path, monkeypatch, option, value, message):
    import longreach.models

    def boom(*a, **k):
        raise AssertionError("no model may be loaded for a bad sweep")

    monkeypatch.setattr(longreach.models, "load_model", boom)
    monkeypatch.setattr(longreach, "load_model", boom)
    args = {"--model": "smollm2-135m", "--tasks": "passkey", "--methods": "dense", "--lengths": "2k",
            "--out": str(tmp_path / "o"), option: value}
    result = cli.invoke(app, ["eval", *[x for kv in args.items() for x in kv]])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()  # nothing written either


def test_an_out_folder_of_another_model_is_refused(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps(
        {"model": "other", "method": "dense", "task": "passkey", "length": 256, "depth": 0.0, "seed": 0,
         "chat": True, "corpus": "synthetic", "score": 1.0}) + "\n")
    sweep = make_sweep("smollm2-135m", "passkey", "dense", "256", corpus="synthetic")
    with pytest.raises(InputError, match="another model"):
        pending(sweep, tmp_path)
    with pytest.raises(SpecError):
        make_sweep("smollm2-135m", "passkey", "dense+streaming+quest", "256")


def test_confidence_intervals():
    low, high = wilson(5, 5)
    assert low == pytest.approx(0.566, abs=1e-3) and high == 1.0
    low, high = wilson(0, 5)
    assert low == 0.0 and high == pytest.approx(0.434, abs=1e-3)
    mean, lo, hi = mean_ci([0.5, 0.7, 0.9], binary=False)
    assert mean - lo == pytest.approx(hi - mean)
    assert mean == pytest.approx(0.7) and hi - mean == pytest.approx(4.30 * 0.2 / 3**0.5, rel=1e-3)


def test_report_table_and_html(tmp_path):
    rows = []
    for method, scores, t, dens in (("dense", [1, 1, 1, 0], 2.0, 1.0), ("quest:density=0.1", [1, 0, 0, 0], 1.0, 0.1)):
        for i, s in enumerate(scores):
            rows.append({"model": "m", "method": method, "task": "niah", "metric": "accuracy", "length": 2048,
                         "depth": [0.0, 1.0][i % 2], "seed": i, "chat": True, "corpus": "c", "score": float(s),
                         "prefill_s": t, "decode_s": 0.1, "decode_tokens": 5, "density": dens, "kv_bytes": 2**20,
                         "peak_rss_mb": 900, "prediction": "12345" if s else ["", " ", "99"][i % 3]})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_report(tmp_path)
    # no answer: dense's one miss (i = 3) answered ""; quest's misses (i = 1, 2, 3) were " ", "99" and ""
    assert "| dense | 2048 | 4 | 75% (30%–95%) | 1 | 1.000 | 2.00 | 1.00x | 20 | 1.0 | 900 |" in report.markdown
    assert "| quest:density=0.1 | 2048 | 4 | 25% (5%–70%) | 2 | 0.100 | 1.00 | 2.00x |" in report.markdown
    # paired with dense: both right 1, only dense right 2, neither 1 -> Newcombe [-78.9, +13.5], McNemar 2 * 0.5**2
    assert ("| quest:density=0.1 | 2048 | 4 | -50.0 | [-78.9, +13.5] | Newcombe 10 | 0.500 | "
            "no difference observed (n = 4) |") in report.markdown
    assert "| dense | < 2048 |" in report.markdown and "| quest:density=0.1 | < 2048 |" in report.markdown  # 75% < 85%
    assert "| dense | ≥ 2048 |" in build_report(tmp_path, threshold=0.75).markdown
    assert "| dense | 2048 | 2/2 | 1/2 |" in report.markdown  # by depth: seeds 0, 2 at depth 0; 1, 3 at depth 1
    assert "| quest:density=0.1 | 2048 | 1/2, -50.0 [" in report.markdown
    page = report.html_path.read_text()
    assert page.count("data:image/png;base64,") >= 2 and page.count("<table>") == 4  # scores, paired, by depth,
    # effective length
    assert (tmp_path / "plots").is_dir() and any((tmp_path / "plots").glob("*.png"))


def test_demo_is_dense_beside_a_fast_prefill_and_a_press(tmp_path, tiny_lm_folder):
    """The demo path end to end (real Canterbury prose; a tiny model keeps it fast): its summary says what each
    method cost, from the rows it wrote."""
    from longreach.eval.showcase import DEMO_METHODS, summarise

    result = cli.invoke(app, ["demo", "--model", str(tiny_lm_folder), "--lengths", "300", "--out", str(tmp_path),
                              "--quiet"], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows, bad = read_rows(tmp_path / "results.jsonl")
    assert not bad and len(rows) == 6 and {r["corpus"] for r in rows} == {"canterbury"}
    lines = {line.method: line for line in summarise(rows)}
    assert list(lines) == list(DEMO_METHODS)
    dense, fast, press = (lines[m] for m in DEMO_METHODS)
    assert (dense.role, fast.role, press.role) == ("baseline", "sparse prefill: faster", "KV press: smaller cache")
    assert dense.n == fast.n == press.n == 2 and dense.speed == pytest.approx(1.0)
    assert fast.cache_ratio == pytest.approx(1.0)  # sparse prefill keeps every key
    assert 8 < press.cache_ratio < 12  # density=0.1 of the prompt's keys, in real bytes
    for line in lines.values():
        assert f"{line.correct}/2" in result.output and line.method in result.output
    assert "no sparse prefill passed" in " ".join(result.output.split())  # the note on the default specs


def test_first_seed_gives_a_disjoint_set_of_prompts():
    tune = make_sweep("smollm2-135m", "passkey", "dense", "256", samples=3, corpus="synthetic")
    report = make_sweep("smollm2-135m", "passkey", "dense", "256", samples=3, corpus="synthetic", first_seed=100)
    task = tune.tasks[0]
    assert [s for _, s in tune.points(task)] == [0, 1, 2]
    assert [s for _, s in report.points(task)] == [100, 101, 102]
    assert [d for d, _ in report.points(task)] == [d for d, _ in tune.points(task)]  # same depths, other prompts
    with pytest.raises(InputError, match="first-seed"):
        make_sweep("smollm2-135m", "passkey", "dense", "256", first_seed=-1)


def test_one_proc_reader_serves_available_resident_and_peak_memory(tmp_path):
    from longreach.plan import available_bytes, peak_resident_bytes, proc_kib, reset_peak_resident, resident_bytes

    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n")
    assert proc_kib(str(status), "VmHWM") == 2048 and proc_kib(str(status), "VmRSS") == 1024
    assert proc_kib(str(status), "VmSwap") is None and proc_kib(str(tmp_path / "absent"), "VmRSS") is None
    reset_peak_resident()
    now = resident_bytes()  # read first: the high-water mark can only be >= it afterwards (0 off Linux)
    assert peak_resident_bytes() >= now >= 0 and peak_resident_bytes() > 0
    assert available_bytes() is None or available_bytes() > 0
