"""longreach tune: the acceptance rule against hand-computed paired tables, the screen's cut, the ranking, disjoint
tuning and reporting prompts, resuming after an interruption, the JSON, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from longreach.cli import app
from longreach.errors import InputError, SpecError
from longreach.eval import Corpus
from longreach.eval.report import Paired
from longreach.eval.results import read_rows, row_key
from longreach.eval.stats import mcnemar_exact, newcombe_paired
from longreach.eval.tune import Stage, TuneSettings, finalist_rounds, plan_tune, prompt_sets, stand, tune
from longreach.eval.tunerules import Rule, Screened, ScreenRule, Standing, cut, judge, kind_of, rank
from longreach.eval.tunescreen import screen

cli = CliRunner()
Z2 = 1.959963984540054 ** 2  # the two-sided 95% normal quantile, squared


def paired(a: int, b: int, c: int, d: int) -> Paired:
    """The report's paired record of a 2x2 table (a both right, b only the candidate, c only the baseline)."""
    return Paired(a + b + c + d, *newcombe_paired(a, b, c, d), "Newcombe 10", mcnemar_exact(b, c), (a, b, c, d), 0, 0)


# ---- the rule, by hand ----

def test_perfect_agreement_needs_35_prompts_for_a_lower_end_above_minus_10():
    """All n pairs agree (both right): Wilson's lower end of n/n is n / (n + z²), so the paired interval's lower end
    is -z² / (n + z²) (Newcombe 1998: phi is 0 when a margin is empty). Above -0.10 exactly when n > 9 z² = 34.57."""
    for n in (20, 34, 35, 50):
        p = paired(n, 0, 0, 0)
        assert p.lo == pytest.approx(-Z2 / (n + Z2), abs=1e-9)
        assert (judge(p, Rule(), final=True) is None) == (n >= 35)
    assert judge(paired(20, 0, 0, 0), Rule(), final=False) is None  # tuning prompts: the observed difference only
    assert "lower end" in judge(paired(34, 0, 0, 0), Rule(), final=True)


@pytest.mark.parametrize("table, lower, passes, why", [
    # 49 both right, 1 only dense: diff -2 points (allowed by max_drop=2); Wilson(49/50) lower end = 0.89505, phi = 0
    # (an empty margin), so lo = -0.02 - (0.98 - 0.89505) = -0.10495: the interval reaches below -10
    ((49, 0, 1, 0), -0.10495, False, "lower end -10.5"),
    # 48 both right, one discordant pair each way: diff 0; Wilson(49/50) = (0.89505, 0.99646), phi = -1/49:
    # lo = -sqrt(0.08495² + 2/49 · 0.08495 · 0.01646 + 0.01646²) = -0.08686
    ((48, 1, 1, 0), -0.08686, True, None),
    # 2 more wrong than dense out of 50: -4 points observed, more than max_drop
    ((48, 0, 2, 0), None, False, "observed -4.0 points"),
])
def test_the_rule_on_hand_computed_tables(table, lower, passes, why):
    p = paired(*table)
    assert p.diff == pytest.approx((table[1] - table[2]) / sum(table))
    if lower is not None:
        assert p.lo == pytest.approx(lower, abs=2e-5)
    got = judge(p, Rule(max_drop=2.0, min_lower=-10.0), final=True)
    assert (got is None) == passes
    if why:
        assert why in got


def test_the_observed_difference_bound_is_inclusive_and_unpaired_cells_fail():
    assert judge(paired(45, 0, 1, 4), Rule(max_drop=2.0), final=False) is None  # exactly -2.0 points
    assert judge(paired(44, 0, 1, 4), Rule(max_drop=2.0, tune_slack=0), final=False) is not None  # -2.04 points
    assert judge(Paired(0, math.nan, -math.inf, math.inf, "", None, None, 0, 3), Rule(), final=False) == \
        "no paired baseline rows"
    with pytest.raises(InputError, match="min-lower"):
        Rule(min_lower=5)


def test_tuning_slack_forgives_net_losses_up_to_its_count_on_tuning_prompts_only():
    """10 tuning prompts: one lost (-10 points) passes with the default slack of 1, not with 0; two lost and one won
    is one net loss (passes); two lost net fails; the reporting stage never forgives (-10 points fails max_drop)."""
    one_lost, two_one, two_lost = paired(8, 0, 1, 1), paired(7, 1, 2, 0), paired(8, 0, 2, 0)
    assert judge(one_lost, Rule(), final=False) is None
    why = judge(one_lost, Rule(tune_slack=0), final=False)
    assert why is not None and "(1 prompt lost net of those won, more than --tune-slack 0)" in why
    assert judge(two_one, Rule(), final=False) is None
    why = judge(two_lost, Rule(), final=False)
    assert why is not None and "2 prompts lost net of those won, more than --tune-slack 1" in why
    assert judge(two_lost, Rule(tune_slack=2), final=False) is None
    why = judge(one_lost, Rule(tune_slack=5), final=True)
    assert why is not None and "observed -10.0 points, more than 2 below" in why
    # a score without a right/wrong table (a bootstrap cell) has no prompts to count: max_drop alone decides
    scores = Paired(10, -0.05, -0.2, 0.1, "bootstrap", None, None, 0, 0)
    why = judge(scores, Rule(tune_slack=3), final=False)
    assert why is not None and "observed -5.0 points" in why


def test_a_tuning_standing_forgiven_one_prompt_passes_and_says_so():
    """10 tuning prompts, the candidate lost one (9/10 against 10/10) and is 4x faster: it passes the tuning stage
    with the slack named in its verdict, and ranks as a finalist; without the slack it fails."""
    rows = rows_for("dense", [1] * 10, 2.0, 1000) + rows_for("x", [1] * 9 + [0], 0.5, 1000)
    st, (e,) = stand(rows, "x", "prefill", 0, "dense", Rule(), False, "tuning")
    assert st.passed and e["verdict"] == "pass (within --tune-slack: 1 lost net)" and e["diff_points"] == -10.0
    assert [s.spec for s in rank([st], "prefill")] == ["x"]
    st, (e,) = stand(rows, "x", "prefill", 0, "dense", Rule(tune_slack=0), False, "tuning")
    assert not st.passed and e["verdict"].startswith("fail: observed -10.0 points (1 prompt lost")
    st, (e,) = stand(rows, "x", "prefill", 0, "dense", Rule(), True, "reporting")  # the reporting stage: no slack
    assert not st.passed and e["verdict"].startswith("fail: observed -10.0 points, more than 2")
    with pytest.raises(InputError, match="tune-slack"):
        Rule(tune_slack=-1)


def test_finalists_run_one_round_at_a_time_until_one_of_their_kind_passes():
    """Prefill finalists a, b, c and press finalists x, y in tuning order: round 1 runs a and x; x passes, a fails,
    so round 2 runs b alone; b passes, and c never runs. Stacked on a position method that failed on the reporting
    prompts, a later finalist is not run (it would fail with it)."""
    def st(spec: str, kind: str, passed: bool = False, baseline: str = "dense") -> Standing:
        return Standing(spec, kind, 0, passed, baseline=baseline)

    finalists = {"position": [], "prefill": [st("a", "prefill"), st("b", "prefill"), st("c", "prefill")],
                 "press": [st("x", "press"), st("y", "press")]}
    reported = Stage()
    rounds = finalist_rounds(finalists, reported)
    assert set(next(rounds)) == {"a", "x"}
    reported.standings += [st("a", "prefill", False), st("x", "press", True)]
    assert set(next(rounds)) == {"b"}
    reported.standings.append(st("b", "prefill", True))
    assert list(rounds) == []
    finalists = {"position": [st("P", "position")], "prefill": [st("P+a", "prefill", baseline="P"),
                                                                st("P+b", "prefill", baseline="P")], "press": []}
    reported = Stage()
    rounds = finalist_rounds(finalists, reported)
    assert set(next(rounds)) == {"P", "P+a"}
    reported.standings += [st("P", "position", False), st("P+a", "prefill", False)]
    assert list(rounds) == []


def test_a_stage_keeps_each_row_once():
    stage = Stage()
    rows = rows_for("dense", [1, 0], 1.0, 10) + rows_for("x", [1, 1], 1.0, 10)
    stage.judge(rows, {"x": ("press", "dense", 0)}, Rule(), False, "tuning")
    stage.judge(rows_for("dense", [1, 0], 1.0, 10), {}, Rule(), False, "tuning")  # the baseline again
    assert len(stage.rows) == 4


def rows_for(method: str, outcomes: list[int], prefill_s: float, kv: int, task: str = "passkey") -> list[dict]:
    return [{"model": "m", "method": method, "task": task, "metric": "accuracy", "length": 4096, "depth": 0.5,
             "seed": 1000 + i, "chat": True, "corpus": "canterbury", "score": float(s), "prefill_s": prefill_s,
             "kv_bytes_prompt": kv, "prompt_sha": f"{task}{i}"} for i, s in enumerate(outcomes)]


def test_a_standing_pairs_rows_by_prompt_and_measures_speed_and_cache():
    """50 prompts built by hand: 45 both right, 2 only the candidate, 1 only dense, 2 neither."""
    dense = [1] * 45 + [0, 0] + [1] + [0, 0]
    cand = [1] * 45 + [1, 1] + [0] + [0, 0]
    rows = rows_for("dense", dense, 2.0, 1000) + rows_for("x", cand, 0.5, 250)
    st, ev = stand(rows, "x", "press", 3, "dense", Rule(), True, "reporting")
    (e,) = ev
    assert e["table"] == [45, 2, 1, 2] and e["n"] == 50 and (e["correct"], e["baseline_correct"]) == (47, 46)
    assert e["diff_points"] == pytest.approx(2.0) and e["mcnemar_p"] == pytest.approx(1.0)  # 2 vs 1: p = 1
    assert st.passed and e["verdict"] == "pass" and st.baseline == "dense"
    assert st.speed_ratio == pytest.approx(4.0) and st.cache_ratio == pytest.approx(0.25)
    slow = rows_for("dense", dense, 1.0, 1000) + rows_for("y", dense, 1.0, 1000)
    st, _ = stand(slow, "y", "prefill", 0, "dense", Rule(min_speedup=1.0), True, "reporting")
    assert not st.passed and "min-speedup" in st.reasons[0]  # as accurate, but not faster: no prefill win


def test_speed_is_compared_on_rows_measured_alike_else_the_tuning_stage_speaks():
    """Dense measured at 2 threads (1.0 s) and the candidate at 1 thread (2.0 s, and 0.5 s on its two 2-thread rows):
    only the 2-thread rows compare, 1.0 / 0.5 = 2x. With no rows of both on one thread count the reporting stage
    takes the tuning stage's ratio and says so; with none from either, the prefill is refused as unmeasured."""
    from longreach.eval.tune import choose, comparable_medians

    def on(rows: list[dict], threads: int) -> list[dict]:
        return [{**r, "provenance": {"cpu": "c", "isa": "i", "threads": threads, "commit": "x", "dirty": False,
                                     "torch": "t"}} for r in rows]

    dense = on(rows_for("dense", [1] * 4, 1.0, 1000), 2)
    cand = on(rows_for("x", [1] * 4, 2.0, 1000), 1)
    cand[:2] = on([{**r, "prefill_s": 0.5} for r in cand[:2]], 2)
    assert comparable_medians(cand, dense, "prefill_s") == (0.5, 1.0)
    assert comparable_medians(cand[2:], dense, "prefill_s") == (None, None)
    st, _ = stand(dense + cand, "x", "prefill", 0, "dense", Rule(min_lower=-100.0), True, "reporting")
    assert st.passed and st.speed_ratio == pytest.approx(2.0) and st.speed_from == ""
    apart = dense + cand[2:] + on(rows_for("x", [1] * 4, 2.0, 1000), 1)[:2]
    st, ev = stand(apart, "x", "prefill", 0, "dense", Rule(min_lower=-100.0), True, "reporting", tuning_speed=3.0)
    assert st.passed and st.speed_ratio == 3.0 and st.speed_from == "tuning"
    assert choose("prefill", {"prefill": [st]}, [st], [st], [], ev)["speed_from"] == "tuning"
    st, _ = stand(apart, "x", "prefill", 0, "dense", Rule(min_lower=-100.0), True, "reporting")
    assert not st.passed and "unmeasured (no rows of both on one machine" in st.reasons[0]


def test_a_choice_says_how_many_of_its_rows_shared_the_cores():
    """Rows record the share of CPU time other work took (eval.sharing): the chosen spec's JSON counts those above
    the threshold on both sides, and the summary says its speed ratio is then not a speed result."""
    from longreach.eval.tune import choose, shared_note

    rows = rows_for("dense", [1] * 4, 2.0, 1000) + rows_for("x", [1] * 4, 1.0, 1000)
    for i, row in enumerate(rows):
        row["others_cpu"] = 0.5 if i in (1, 6) else 0.01
    st, ev = stand(rows, "x", "prefill", 0, "dense", Rule(), False, "tuning")  # n = 4 could not pass a final
    assert st.passed and (st.rows_shared, st.rows_recorded) == (2, 8)
    got = choose("prefill", {"prefill": [st]}, [st], [st], [], ev)
    assert got["rows_shared"] == {"shared": 2, "recorded": 8, "threshold": 0.1}
    assert shared_note(got) == " (2 of 8 rows shared the cores with other work: not a speed result)"
    quiet, _ = stand([{**r, "others_cpu": 0.0} for r in rows], "x", "prefill", 0, "dense", Rule(), False, "tuning")
    assert shared_note(choose("prefill", {"prefill": [quiet]}, [quiet], [quiet], [], ev)) == ""
    assert shared_note({"spec": "x"}) == ""  # a file written before rows recorded it


# ---- screen cut and ranking ----

def test_cut_drops_by_threshold_then_keeps_the_closest_to_dense():
    screened = [Screened("a", "prefill", 2, recall=0.95, output_error=0.10),
                Screened("b", "prefill", 2, recall=0.60, output_error=0.10),  # too little mass
                Screened("c", "prefill", 2, recall=0.90, output_error=0.40),  # too large an error
                Screened("d", "prefill", 2, recall=0.80, output_error=0.05),
                Screened("e", "prefill", 2, recall=0.80, output_error=0.20),
                Screened("p", "press", 2, shift=0.6), Screened("q", "press", 2, shift=0.1)]
    kept = cut(screened, ScreenRule(min_recall=0.7, max_error=0.35, max_shift=0.5, survivors=2))
    assert [s.spec for s in kept] == ["d", "a", "q"]
    why = {s.spec: s.reason for s in screened}
    assert why["b"].startswith("mass recall 0.600") and why["c"].startswith("output error 0.400")
    assert "rank 3 > --survivors 2" in why["e"] and why["p"].startswith("next-token shift 0.600")


def test_rank_orders_each_kind_by_what_it_buys():
    st = [Standing("slow", "prefill", 0, True, speed_ratio=1.5), Standing("fast", "prefill", 1, True, speed_ratio=2.5),
          Standing("failed", "prefill", 2, False, speed_ratio=9.0),
          Standing("half", "press", 3, True, cache_ratio=0.5), Standing("tenth", "press", 4, True, cache_ratio=0.1),
          Standing("pos-a", "position", 5, True, score=3), Standing("pos-b", "position", 6, True, score=7)]
    assert [s.spec for s in rank(st, "prefill")] == ["fast", "slow"]
    assert [s.spec for s in rank(st, "press")] == ["tenth", "half"]
    assert [s.spec for s in rank(st, "position")] == ["pos-b", "pos-a"]


@pytest.mark.parametrize("change, message", [
    (dict(report_seed=110), "overlap reporting seeds"),
    (dict(tasks="ppl"), "perplexity"),
    (dict(candidates="selfextend"), "--positions"),
    (dict(candidates="quest:density=0.1+snapkv:density=0.25"), "combines 2 methods"),
    (dict(candidates="dense"), "baseline"),
    (dict(positions="quest:density=0.1"), "position methods only"),
    (dict(screen_prompts=50, tune_samples=20), "--screen-prompts"),
])
def test_bad_input_is_refused_without_a_model(change, message):
    with pytest.raises((InputError, SpecError), match=message):
        plan_tune("smollm2-135m", "4k", TuneSettings(**change))
    assert kind_of("snapkv:density=0.25,pool=31") == "press" and kind_of("yarn") == "position"


# ---- with a tiny random model ----

CANDIDATES = ("streaming:window=4096;streaming:window=16,sinks=0;"  # every key vs a 16-key window
              "snapkv:density=0.5;streamingkv:budget=8")


def settings(**change) -> TuneSettings:
    base = dict(tasks="passkey", candidates=CANDIDATES, rule=Rule(min_speedup=0.0, min_lower=-100.0),
                screen=ScreenRule(max_shift=1.0), screen_prompts=1, tune_samples=2, report_samples=2, tune_seed=0,
                report_seed=100, tune_corpus="synthetic", report_corpus="synthetic", finalists=1)
    return TuneSettings(**{**base, **change})


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    torch.manual_seed(0)
    return tiny_model("llama", vocab_size=len(smol_tokenizer), max_position_embeddings=4096), smol_tokenizer


@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory):
    lm, tok = tiny
    out = tmp_path_factory.mktemp("tune") / "tiny-256.json"
    return tune("tiny", 256, out, settings(), lm=lm, tokenizer=tok, log=lambda _: None)


def test_screen_drops_a_clearly_bad_candidate(tiny, tmp_path):
    """Oracles: a selection of every key keeps all the dense mass with no output error, and a press that keeps
    every key leaves the next-token distribution exactly as dense's; a random model attends almost uniformly, so
    a 16-key window keeps about 16/i of query i's mass (far below 0.7), and a press keeping 8 keys moves it."""
    lm, tok = tiny
    s = settings(candidates="streaming:window=4096;streaming:window=16,sinks=0;snapkv:density=1.0;"
                            "streamingkv:budget=8", screen_prompts=2, tune_samples=2)
    plan = plan_tune("tiny", 256, s)
    found = {x.spec: x for x in screen(plan, s, lm, tok, Corpus.synthetic(), 256, tmp_path / "s.jsonl",
                                       lambda _: None)}
    full, narrow = found["streaming:window=4096"], found["streaming:sinks=0,window=16"]
    assert full.prompts == narrow.prompts == 2
    assert full.recall == pytest.approx(1.0) and full.output_error < 1e-5
    assert narrow.recall < 0.5 and narrow.output_error > 0.1
    assert found["snapkv:density=1.0"].shift < 1e-5 and found["snapkv:density=1.0"].agree == 1.0
    assert found["streamingkv:budget=8"].shift > 1e-4
    kept = cut(list(found.values()), ScreenRule(max_shift=1e-4))
    assert [k.spec for k in kept] == ["streaming:window=4096", "snapkv:density=1.0"]
    assert narrow.reason.startswith("mass recall") and found["streamingkv:budget=8"].reason.startswith("next-token")


def test_the_json_holds_the_choices_and_the_evidence_behind_them(tuned):
    data = json.loads(tuned.path.read_text())
    assert data == tuned.data and data["schema"] == "longreach.tune/1" and not data["past_trained_length"]
    assert data["rule"]["max_drop"] == 2.0 and data["rule"]["min_lower"] == -100.0
    screened = {c["spec"]: c for c in data["screen"]["candidates"]}
    assert not screened["streaming:sinks=0,window=16"]["kept"]  # dropped by the screen, so never evaluated
    assert data["prefill"]["spec"] == "streaming:window=4096" and "passkey n = 2" in data["prefill"]["evidence"]
    assert any(line.startswith("prefill: streaming:window=4096") for line in tuned.summary())
    # the press with the smaller cache wins: 8 kept keys of a ~256-token prompt, in real bytes
    assert data["press"]["spec"] == "streamingkv:budget=8" and data["press"]["cache_ratio"] < 0.1
    assert data["prefill"]["cache_ratio"] == pytest.approx(1.0)  # a sparse prefill keeps every key
    assert set(data["provenance"]) >= {"commit", "torch", "threads"}
    assert data["chat"] and data["chat_applied"] is True  # SmolLM2's tokenizer has a chat template
    # the row folders, relative to the JSON's folder, lead to the rows from wherever the files are copied
    assert data["folders"] == {"screen": "tiny-256/screen.jsonl", "tuning": "tiny-256/tuning",
                               "reporting": "tiny-256/reporting"}
    rows, bad = read_rows(tuned.path.with_suffix("") / "reporting" / "results.jsonl")
    assert not bad
    for e in (e for e in data["evidence"] if e["stage"] == "reporting"):  # recount from the rows
        mine = {r["seed"]: r["score"] for r in rows if r["method"] == e["spec"]}
        base = {r["seed"]: r["score"] for r in rows if r["method"] == e["baseline"]}
        assert e["n"] == len(mine) == 2
        assert e["correct"] == sum(mine.values()) and e["baseline_correct"] == sum(base.values())


def test_a_second_finalist_runs_on_the_reporting_prompts_only_after_the_first_failed(tiny, tmp_path, monkeypatch):
    """The eval runner replaced by rows written here: both prefill candidates (every key: the screen keeps them)
    answer every tuning prompt and the faster one ranks first. On the reporting prompts the faster one loses 3 of
    4 and the slower one none: with --finalists 2 the slower is then run and chosen, the JSON naming both as
    reported; when the faster one passes, the slower is never run there."""
    import longreach.eval.tune as tune_module

    lm, tok = tiny
    fast, slow = "streaming:window=4096", "streaming:window=2048"
    asked: list[tuple[str, tuple[str, ...]]] = []

    def fake_stage(plan, settings, methods, folder, samples, first_seed, corpus, *rest):
        methods = list(dict.fromkeys(methods))  # as the runner's sweep takes them
        asked.append((folder.name, tuple(methods)))
        lost = {fast: losses} if folder.name == "reporting" else {}
        return [{"model": "tiny", "method": m, "task": "passkey", "metric": "accuracy", "length": plan.length,
                 "depth": 0.5, "seed": first_seed + i, "chat": True, "corpus": corpus.name,
                 "score": 0.0 if i < lost.get(m, 0) else 1.0, "prefill_s": {fast: 0.2, slow: 0.5}.get(m, 1.0),
                 "kv_bytes_prompt": 1000, "prompt_sha": f"{first_seed + i}"} for m in methods for i in range(samples)]

    monkeypatch.setattr(tune_module, "run_stage", fake_stage)
    s = settings(candidates=f"{fast};{slow}", finalists=2, report_samples=4)
    losses = 3
    data = tune("tiny", 256, tmp_path / "a.json", s, lm=lm, tokenizer=tok, log=lambda _: None).data
    assert [methods for stage, methods in asked if stage == "reporting"] == [("dense", fast), ("dense", slow)]
    assert data["prefill"]["spec"] == slow and data["prefill"]["reported"] == [fast, slow]
    assert data["prefill"]["finalists"] == [fast, slow]
    asked.clear()
    losses = 0
    data = tune("tiny", 256, tmp_path / "b.json", s, lm=lm, tokenizer=tok, log=lambda _: None).data
    assert [methods for stage, methods in asked if stage == "reporting"] == [("dense", fast)]
    assert data["prefill"]["spec"] == fast and data["prefill"]["reported"] == [fast]


def test_a_baseline_that_fails_most_tuning_prompts_is_said(tuned):
    """The tiny random model answers nothing, so dense's 0 of 2 passkeys is noted in the JSON and the summary;
    by hand: 4/10 is below half and noted, 5/10 and a task of the candidate alone are not."""
    from longreach.eval.tune import weak_baselines

    notes = tuned.data["tuning_notes"]
    assert [n.split(":")[0] for n in notes] == ["dense scored 0/2 on the tuning prompts of passkey"]
    assert [line for line in tuned.summary() if line.startswith("note: ")] == [f"note: {n}" for n in notes]
    rows = ([{"method": "dense", "task": "a", "score": float(i < 4)} for i in range(10)]
            + [{"method": "dense", "task": "b", "score": float(i < 5)} for i in range(10)]
            + [{"method": "yarn", "task": "c", "score": 0.0}])
    assert [n.split(":")[0] for n in weak_baselines(rows, ["dense"])] == ["dense scored 4/10 on the tuning prompts "
                                                                          "of a"]


def test_tuning_and_reporting_prompts_are_disjoint(tuned):
    prompts = tuned.data["prompts"]
    folder = tuned.path.with_suffix("")
    seeds, shas = {}, {}
    for stage in ("tuning", "reporting"):
        rows, _ = read_rows(folder / stage / "results.jsonl")
        seeds[stage] = {r["seed"] for r in rows}
        shas[stage] = {r["prompt_sha"] for r in rows}
        assert sorted(shas[stage]) == prompts[stage]["prompt_sha"]
    assert seeds == {"tuning": {0, 1}, "reporting": {100, 101}}
    assert not shas["tuning"] & shas["reporting"] and prompts["disjoint"]
    assert prompts["tuning"]["seeds"] == [0, 1] and prompts["reporting"]["seeds"] == [100, 101]
    assert "passkey_note" in prompts  # a passkey tune says its filler is one text in every corpus; others do not
    niah = settings(tasks="niah:wording=2")
    assert "passkey_note" not in prompt_sets(plan_tune("tiny", 256, niah), niah, [], [], "c", "c", "", 256)


class Interrupted(Exception):
    pass


def test_an_interrupted_tune_resumes_without_duplicating_rows(tiny, tuned, tmp_path):
    lm, tok = tiny
    out = tmp_path / "tiny-256.json"

    def stop_at_the_first_press(line: str) -> None:  # dies once the tuning stage has written some rows
        if "snapkv" in line and "·" in line:
            raise Interrupted

    with pytest.raises(Interrupted):
        tune("tiny", 256, out, settings(), lm=lm, tokenizer=tok, log=stop_at_the_first_press)
    partial, _ = read_rows(tmp_path / "tiny-256" / "tuning" / "results.jsonl")
    assert 0 < len(partial) < 8 and not out.exists()
    again = tune("tiny", 256, out, settings(), lm=lm, tokenizer=tok, log=lambda _: None)
    for stage, expected in (("tuning", 8), ("reporting", 6)):  # 4 and 3 methods x 2 prompts
        rows, bad = read_rows(tmp_path / "tiny-256" / stage / "results.jsonl")
        assert not bad and len(rows) == len({row_key(r) for r in rows}) == expected
    screen_lines = (tmp_path / "tiny-256" / "screen.jsonl").read_text().splitlines()
    assert len(screen_lines) == 4  # one prompt x 4 candidates, each once
    assert (again.choice("prefill"), again.choice("press")) == (tuned.choice("prefill"), tuned.choice("press"))
    before = (tmp_path / "tiny-256" / "tuning" / "results.jsonl").read_text()
    tune("tiny", 256, out, settings(), lm=lm, tokenizer=tok, log=lambda _: None)  # nothing left to run
    assert (tmp_path / "tiny-256" / "tuning" / "results.jsonl").read_text() == before


def test_a_baseline_recorded_elsewhere_is_timed_again_beside_the_candidates(tiny, tmp_path):
    """Dense's tuning rows recorded at another commit (a tune resumed after an upgrade, or rows copied in) share no
    machine key with the candidates', so no speed ratio compares them; rather than refuse every prefill candidate
    as unmeasured, tune times dense and them again on a few tuning prompts in WORK/timing and takes the ratio of
    those medians. Oracle: the medians recomputed from the timing rows themselves."""
    import statistics

    from longreach.eval.tune import unmeasured

    lm, tok = tiny
    out, work = tmp_path / "t.json", tmp_path / "t"
    tune("tiny", 256, out, settings(), lm=lm, tokenizer=tok, log=lambda _: None)
    assert not (work / "timing").exists()  # measured alike the first time: nothing to time again
    path = work / "tuning" / "results.jsonl"
    rows, _ = read_rows(path)
    moved = [{**r, "provenance": {**r["provenance"], "commit": "elsewhere"}} if r["method"] == "dense" else r
             for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in moved))
    prefill = [s["spec"] for s in json.loads(out.read_text())["standings"]["tuning"] if s["kind"] == "prefill"]
    runs = {spec: ("prefill", "dense", i) for i, spec in enumerate(prefill)}
    assert prefill and unmeasured(moved, runs, Rule(min_speedup=0.0, min_lower=-100.0)) == prefill
    log: list[str] = []
    data = tune("tiny", 256, out, settings(), lm=lm, tokenizer=tok, log=log.append).data
    assert any("timing both again" in line for line in log)
    timed, bad = read_rows(work / "timing" / "results.jsonl")
    assert not bad and {r["method"] for r in timed} == {"dense", *prefill} and data["folders"]["timing"] == "t/timing"
    for st in (s for s in data["standings"]["tuning"] if s["kind"] == "prefill"):
        mine = statistics.median(r["prefill_s"] for r in timed if r["method"] == st["spec"])
        base = statistics.median(r["prefill_s"] for r in timed if r["method"] == "dense")
        assert st["speed_from"] == "timing" and st["speed_ratio"] == pytest.approx(base / mine)
        assert not any("unmeasured" in why for why in st["reasons"])
    assert read_rows(path)[0] == moved  # the tuning rows are left as they were


def test_past_the_trained_length_it_picks_a_position_method(smol_tokenizer, tmp_path):
    """Trained to 256 tokens, asked for 320: the screen runs at 256, the position methods against dense, the
    candidates under a position method they can be stacked with (Self-Extend re-maps by cache index, so a press
    goes with a rope scaling) and are judged against that position method alone."""
    torch.manual_seed(0)
    lm = tiny_model("llama", vocab_size=len(smol_tokenizer), max_position_embeddings=256)
    got = tune("tiny", 320, tmp_path / "t.json", settings(positions="selfextend:window=64;yarn", report_samples=1,
                                                          candidates="streaming:window=4096;snapkv:density=0.5"),
               lm=lm, tokenizer=smol_tokenizer, log=lambda _: None).data
    assert got["past_trained_length"] and got["trained_length"] == 256 and got["screen"]["length"] == 256
    position, prefill, press = got["position"], got["prefill"], got["press"]
    assert position["spec"] in ("selfextend:window=64", "yarn") and position["baseline"] == "dense"
    assert prefill["spec"] == f"{prefill['baseline']}+streaming:window=4096"
    assert press["spec"] == "yarn+snapkv:density=0.5" and press["baseline"] == "yarn"
    assert {e["baseline"] for e in got["evidence"] if e["kind"] == "position"} == {"dense"}


def test_inside_the_trained_length_position_methods_run_only_when_given_and_must_beat_dense(tiny, tmp_path):
    """A random model finds no passkey under any method, so no position method beats dense: none is chosen, the
    candidates run alone against dense, and the position rows are still in the evidence."""
    lm, tok = tiny
    got = tune("tiny", 256, tmp_path / "t.json", settings(positions="selfextend:group=2,window=64;yarn",
                                                          candidates="streaming:window=4096;snapkv:density=0.5"),
               lm=lm, tokenizer=tok, log=lambda _: None).data
    assert not got["past_trained_length"]
    assert got["position"]["spec"] is None and "more accurate than dense" in got["position"]["reason"]
    assert {e["spec"] for e in got["evidence"] if e["kind"] == "position"} == {"selfextend:group=2,window=64",
                                                                            "yarn"}
    assert got["prefill"]["baseline"] == got["press"]["baseline"] == "dense"
    assert got["press"]["spec"] == "snapkv:density=0.5"
    tied = [s for s in got["standings"]["tuning"] if s["kind"] == "position"]
    assert tied and all(not s["passed"] and "not more accurate than dense" in s["reasons"][-1] for s in tied)
    assert "position" not in tune("tiny", 256, tmp_path / "u.json", settings(), lm=lm, tokenizer=tok,
                                  log=lambda _: None).data  # not asked: no position stage


def rescore(monkeypatch, right) -> None:
    """Rows from real runs, with each score replaced by ``right(row)``: the tune's decisions on known tables."""
    import longreach.eval.tune as tune_module

    real = tune_module.run_stage

    def rescored(*args, **kwargs):
        rows = real(*args, **kwargs)
        for r in rows:
            r["score"] = 1.0 if right(r) else 0.0
        return rows

    monkeypatch.setattr(tune_module, "run_stage", rescored)


def test_inside_the_trained_length_a_position_method_that_beats_dense_becomes_the_baseline(tiny, tmp_path,
                                                                                       monkeypatch):
    """Every spec with Self-Extend or YaRN in it is right, and the press alone; dense is wrong. Self-Extend (first
    in grid order of the two tied) is chosen; the select candidate runs under it and is judged against it; the
    press cannot follow a re-mapping method, so it runs alone against dense, not under YaRN, which was not
    chosen."""
    rescore(monkeypatch, lambda r: "selfextend" in r["method"] or r["method"].startswith("yarn")
            or r["method"] == "snapkv:density=0.5")
    lm, tok = tiny
    got = tune("tiny", 256, tmp_path / "t.json", settings(positions="selfextend:group=2,window=64;yarn",
                                                          candidates="streaming:window=4096;snapkv:density=0.5"),
               lm=lm, tokenizer=tok, log=lambda _: None).data
    se = "selfextend:group=2,window=64"
    assert got["position"]["spec"] == se and got["position"]["baseline"] == "dense"
    assert got["prefill"]["spec"] == f"{se}+streaming:window=4096" and got["prefill"]["baseline"] == se
    assert got["press"]["spec"] == "snapkv:density=0.5" and got["press"]["baseline"] == "dense"
    reporting = {e["spec"]: e for e in got["evidence"] if e["stage"] == "reporting"}
    assert reporting[se]["correct"] == 2 and reporting[se]["baseline_correct"] == 0
    assert not any(e["spec"].startswith("yarn+") for e in got["evidence"])


def test_a_stack_on_a_position_method_rejected_on_the_reporting_prompts_is_not_chosen(tiny, tmp_path, monkeypatch):
    """Self-Extend and the stack under it are right on the tuning prompts (seeds 0-1) and wrong on the reporting
    ones (100-101), where dense is right: Self-Extend fails there, and the stack, though no worse than
    Self-Extend alone, is not recommended."""
    rescore(monkeypatch, lambda r: ("selfextend" in r["method"]) == (r["seed"] < 100))
    lm, tok = tiny
    got = tune("tiny", 256, tmp_path / "t.json", settings(positions="selfextend:group=2,window=64",
                                                          candidates="streaming:window=4096"),
               lm=lm, tokenizer=tok, log=lambda _: None).data
    assert got["position"]["spec"] is None and "more than 2 below" in got["position"]["reason"]
    assert got["prefill"]["spec"] is None
    assert "selfextend:group=2,window=64 did not pass on the reporting prompts" in got["prefill"]["reason"]


def test_cli_says_when_no_candidate_passes(tiny_lm_folder, tmp_path):
    """One reporting prompt cannot put the interval's lower end above -10 points: nothing is claimed, and the
    output says so instead of falling back to dense silently."""
    out = tmp_path / "t.json"
    result = cli.invoke(app, ["tune", "--model", str(tiny_lm_folder), "--length", "256", "--out", str(out),
                              "--tasks", "passkey", "--candidates", "streaming:window=4096;snapkv:density=0.5",
                              "--screen-prompts", "1", "--tune-samples", "1", "--report-samples", "1",
                              "--tune-seed", "0", "--report-seed", "100", "--tune-corpus", "synthetic",
                              "--report-corpus", "synthetic", "--min-speedup", "0", "--tune-slack", "2", "--quiet"],
                        terminal_width=200)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["rule"]["tune_slack"] == 2
    for kind in ("prefill", "press"):
        assert data[kind]["spec"] is None and "lower end" in data[kind]["reason"]
        assert f"{kind}: none passed" in result.output
    assert "position" not in data and data["rule"]["min_lower"] == -10.0


def test_cli_refuses_bad_input_before_loading_a_model(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("longreach.load_model", boom)
    result = cli.invoke(app, ["tune", "--model", "smollm2-135m", "--length", "4k", "--out", str(tmp_path / "t.json"),
                              "--tune-seed", "1000"], terminal_width=200)
    assert result.exit_code == 2 and "overlap reporting seeds" in result.output
    result = cli.invoke(app, ["tune", "--model", "smollm2-135m", "--length", "4k", "--out", str(tmp_path / "t.txt")],
                        terminal_width=200)
    assert result.exit_code == 2 and "JSON file" in result.output
    result = cli.invoke(app, ["tune", "--model", "smollm2-135m", "--length", "4k", "--out", str(tmp_path / "t.json"),
                              "--tune-slack", "-1"], terminal_width=200)
    assert result.exit_code == 2 and "tune-slack" in result.output


def test_points_in_the_json_round_once_as_the_report_does():
    """A Newcombe lower end of -8.4528 points reads -8.5 in the report; the tune's evidence must read the same
    (storing 2 decimals, then showing 1, gave -8.4)."""
    from longreach.eval.tune import _fmt, _points

    assert _fmt(_points(-0.084528)) == f"{-8.4528:+.1f}" == "-8.5"
