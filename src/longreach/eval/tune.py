"""``longreach tune``: which spec, at which budget, keeps my accuracy on my model and length, and how fast is it?

Three stages, each resumable from its folder next to the output JSON:

1. **screen** (``WORK/screen.jsonl``) — on a few tuning prompts, every select candidate is replayed on the real
   queries and keys of one dense forward (:func:`longreach.diagnostics.diagnose`: mass recall, output error) and
   every press runs the prompt (how far it moves the next-token distribution from dense's). Clearly bad
   candidates are dropped with the reason (:func:`tunerules.cut`). Past the trained length the screen runs at the
   trained length: there is no dense reference beyond it.
2. **tune** (``WORK/tuning/results.jsonl``) — the survivors and the baseline on the tuning prompts (seeds from
   ``tune_seed``, corpus ``tune_corpus``), through the eval runner. Past the trained length the position methods
   run first, against dense; the most accurate becomes the baseline the others are composed with and judged
   against. Inside the trained length position methods run only when given (``--positions``), and one becomes
   the baseline only if it was more accurate than dense (a model can miss what lies far from the question even
   inside its window); else the others run alone. Per kind, the ``finalists`` best that pass the
   observed-difference rule (or lost at most ``tune_slack`` prompts net) go on. A prefill candidate that passes
   on accuracy but whose rows and the baseline's were not recorded alike (machine, threads, commit: a resumed
   or copied run) is timed again beside the baseline on a few tuning prompts (``WORK/timing``).
3. **report** (``WORK/reporting/results.jsonl``) — the finalists and the baseline on disjoint reporting prompts
   (other seeds, another corpus where one loads), one finalist per kind at a time in tuning order
   (:func:`finalist_rounds`). The chosen spec of each kind is the first finalist that passes the full rule
   (:func:`tunerules.judge`) there.

The JSON holds the choices, their measured speed and cache ratios, the evidence table of every stage, the screen,
both prompt sets (seeds, corpora, prompt hashes) and the provenance.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..errors import InputError, LongreachError
from ..models import trained_length
from ..provenance import machine_key
from ..spec import parse_spec
from . import sharing
from .corpus import Corpus
from .report import pair_rows
from .results import read_rows, row_key
from .runner import make_sweep, parse_lengths, pending, record_sweep, run_local
from .tasks import parse_tasks
from .tunerules import (
    Rule,
    Screened,
    ScreenRule,
    Standing,
    compose,
    cut,
    default_positions,
    default_prefill,
    default_press,
    forgiven,
    judge,
    kind_of,
    rank,
)
from .tunescreen import screen

SCHEMA = "longreach.tune/1"
REPORT_CORPORA = ("austen", "bible")  # tried in order by --report-corpus auto; else the tuning corpus
WEAK_BASELINE = 0.5  # a baseline scoring below this on a task's tuning prompts can show little loss there
Log = Callable[[str], None]


@dataclass(frozen=True)
class TuneSettings:
    """Everything ``tune`` takes besides the model, the length and the output file (the CLI's options)."""

    tasks: str = "passkey,niah"
    candidates: str | None = None  # ';'-separated select / press specs (default: tunerules' grid)
    positions: str | None = None  # ';'-separated position specs (default: the grid past the trained length)
    rule: Rule = field(default_factory=Rule)
    screen: ScreenRule = field(default_factory=ScreenRule)
    screen_prompts: int = 4  # in all, spread over the tasks
    screen_queries: int = 256  # evenly spaced queries that estimate mass recall
    tune_samples: int = 20  # per task
    report_samples: int = 50  # per task
    tune_seed: int = 100
    report_seed: int = 1000
    tune_corpus: str = "canterbury"
    report_corpus: str = "auto"  # auto: the first of REPORT_CORPORA that loads, else the tuning corpus
    finalists: int = 2
    chat: bool = True
    kernel: str = "auto"
    chunk: int | None = None


@dataclass(frozen=True)
class TunePlan:
    """Validated input: nothing here needs a model."""

    model: str
    length: int
    tasks: str  # canonical, ';'-separated
    prefill: list[str]
    press: list[str]
    positions: list[str] | None  # None: the default grid, sized once the trained length is known
    screen_per_task: int


@dataclass
class TuneResult:
    data: dict  # what the JSON holds
    path: Path

    def choice(self, kind: str) -> str | None:
        return (self.data.get(kind) or {}).get("spec")

    def summary(self) -> list[str]:
        """Lines for stdout: each kind's choice with its ratio and its paired evidence, or why none passed."""
        lines = []
        for kind in ("position", "prefill", "press"):
            got = self.data.get(kind)
            if got is None:
                continue
            if got["spec"] is None:
                lines.append(f"{kind}: none passed — {got['reason']}")
                continue
            ratio = (f", {got['speed_ratio']:.2f}x the baseline's prefill speed{speed_note(got)}{shared_note(got)}"
                     if kind == "prefill"
                     else f", cache {got['cache_ratio']:.2f} of the baseline's" if kind == "press" else "")
            lines.append(f"{kind}: {got['spec']}{ratio} ({got['evidence']})")
        return lines + [f"note: {note}" for note in self.data.get("tuning_notes", [])]


def beside(out: Path, path: Path) -> str:
    """A row folder as the JSON names it: relative to the JSON's own folder when inside it, so a committed tune
    still finds its rows in another checkout; absolute otherwise."""
    try:
        return str(path.resolve().relative_to(out.resolve().parent))
    except ValueError:
        return str(path.resolve())


def speed_note(choice: dict) -> str:
    """Where a chosen prefill's ratio came from the tuning prompts (the reporting rows were not measured alike)."""
    return {"tuning": " (from the tuning prompts' rows)",
            "timing": " (from rows timed again alike on tuning prompts)"}.get(choice.get("speed_from"), "")


def shared_note(choice: dict) -> str:
    """Why a speed ratio may not be a speed result: its rows shared the cores with other work."""
    got = choice.get("rows_shared")  # absent in files written before rows recorded it
    if not got or not got["shared"]:
        return ""
    return (f" ({got['shared']} of {got['recorded']} rows shared the cores with other work: not a speed "
            "result)")


def plan_tune(model: str, length: int | str, settings: TuneSettings) -> TunePlan:
    """Check every input before a model loads or a corpus downloads; errors say what to change."""
    from ..configurable import split_items

    lengths = parse_lengths(str(length))
    if len(lengths) != 1:
        raise InputError(f"tune takes one --length, got {length}; run it once per length")
    n_tokens = lengths[0]
    tasks = parse_tasks(settings.tasks)
    for task in tasks:
        if task.metric == "ppl":
            raise InputError(f"tune judges by points of accuracy; '{task.spec()}' is a perplexity task: use "
                             "passkey, niah, vt, cwe, fwe or kvret")
    s = settings
    for name, value in (("--tune-samples", s.tune_samples), ("--report-samples", s.report_samples),
                        ("--screen-prompts", s.screen_prompts), ("--finalists", s.finalists),
                        ("--survivors", s.screen.survivors), ("--screen-queries", s.screen_queries)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if min(s.tune_seed, s.report_seed) < 0:
        raise InputError("seeds must be >= 0")
    tune_seeds = range(s.tune_seed, s.tune_seed + s.tune_samples)
    report_seeds = range(s.report_seed, s.report_seed + s.report_samples)
    if max(tune_seeds.start, report_seeds.start) < min(tune_seeds.stop, report_seeds.stop):
        raise InputError(f"tuning seeds {tune_seeds.start}..{tune_seeds.stop - 1} overlap reporting seeds "
                         f"{report_seeds.start}..{report_seeds.stop - 1}: the two prompt sets must be disjoint; "
                         "move --report-seed past the tuning range")
    per_task = math.ceil(s.screen_prompts / len(tasks))
    if per_task > s.tune_samples:
        raise InputError(f"--screen-prompts {s.screen_prompts} needs {per_task} tuning prompts per task, more than "
                         f"--tune-samples {s.tune_samples}")
    if s.report_corpus not in ("auto", "canterbury", "austen", "bible", "synthetic"):
        raise InputError(f"unknown --report-corpus '{s.report_corpus}': use auto, canterbury, austen, bible or "
                         "synthetic")
    # the runner's own checks (kernel, corpus, chunk) before any work
    make_sweep(model, settings.tasks, "dense", str(n_tokens), kernel=s.kernel, corpus=s.tune_corpus, chunk=s.chunk)
    given = [str(parse_spec(c)) for c in split_items(s.candidates)] if s.candidates else None
    prefill = [c for c in given if kind_of(c) == "prefill"] if given else default_prefill()
    press = [c for c in given if kind_of(c) == "press"] if given else default_press()
    if given and any(kind_of(c) == "position" for c in given):
        raise InputError("position methods go in --positions (tried past the model's trained length by default, "
                         "inside it when given)")
    positions = None
    if s.positions:
        positions = [str(parse_spec(c)) for c in split_items(s.positions)]
        wrong = [c for c in positions if kind_of(c) != "position"]
        if wrong:
            raise InputError(f"--positions takes position methods only, got {', '.join(wrong)}")
    for found in (prefill, press, positions or []):
        if len(set(found)) != len(found):
            raise InputError("a candidate is given twice")
    if not prefill and not press:
        raise InputError("no prefill (select) or press candidates to tune")
    return TunePlan(model, n_tokens, ";".join(t.spec() for t in tasks), prefill, press, positions, per_task)


def load_corpora(settings: TuneSettings, log: Log) -> tuple[Corpus, Corpus, str]:
    """The tuning corpus and the reporting one (another corpus where one loads), and a note on what was used."""
    tuning = Corpus.load(settings.tune_corpus)
    if settings.report_corpus != "auto":
        return tuning, Corpus.load(settings.report_corpus), "as asked"
    for name in REPORT_CORPORA:
        if name == tuning.name:
            continue
        try:
            return tuning, Corpus.load(name), f"auto: {name}, a corpus the tuning prompts do not use"
        except (LongreachError, OSError) as err:  # no apt, no network, a changed package: try the next
            log(f"reporting corpus {name} did not load ({err}); trying the next")
    note = (f"auto: no other corpus loaded; the reporting prompts use {tuning.name} too (other seeds, other "
            "passages)")
    log(f"warning: {note}")
    return tuning, tuning, note


# ---- stages 2 and 3: eval through the runner ----

def run_stage(plan: TunePlan, settings: TuneSettings, methods: list[str], folder: Path, samples: int,
              first_seed: int, corpus: Corpus, model, tokenizer, log: Log) -> list[dict]:
    """Run what ``folder`` does not hold yet (the eval runner resumes), return this stage's rows."""
    sweep = make_sweep(plan.model, plan.tasks, ";".join(dict.fromkeys(methods)), str(plan.length), samples=samples,
                       chat=settings.chat, kernel=settings.kernel, corpus=corpus.name, chunk=settings.chunk,
                       first_seed=first_seed)
    todo, bad, finished = pending(sweep, folder)
    for line in bad:
        log(f"warning: {folder / 'results.jsonl'} {line} — its sample will be run again")
    left = sum(len(v) for v in todo.values())
    log(f"{folder}: {len(sweep.methods)} methods, {finished} samples done, {left} to run")
    if left:
        record_sweep(sweep, folder, None)
        last: list = [None]

        def progress(cell) -> None:
            if cell != last[0]:
                last[0] = cell
                log(f"  {cell}")

        run_local(sweep, folder, todo, model, tokenizer, corpus, progress=progress)
    keys = {sweep.key(c, d, s) for c in sweep.cells() for d, s in sweep.points(c.task)}
    return [r for r in read_rows(folder / "results.jsonl")[0] if row_key(r) in keys]


def _median(rows: list[dict], field: str) -> float | None:
    """The median over rows: a row slowed by another job on the machine moves a mean, not a median (at 4k, dense
    rows run beside a test suite took the mean prefill ratio of a press, whose prefill is dense, to 1.42x; the
    medians were 9.92 and 10.0 s)."""
    vals = [r[field] for r in rows if isinstance(r.get(field), int | float)]
    return statistics.median(vals) if vals else None


def comparable_medians(mine: list[dict], base: list[dict], field: str) -> tuple[float | None, float | None]:
    """Medians of ``field`` on each side over the rows of one machine, thread count and commit
    (:func:`provenance.machine_key`): the key both sides have most rows of. (None, None) when they share none: a
    baseline measured at 2 threads months before beside a candidate at 1 thread beside another job is no ratio."""
    mine_n, base_n = Counter(map(machine_key, mine)), Counter(map(machine_key, base))
    shared = mine_n.keys() & base_n.keys()
    if not shared:
        return None, None
    key = max(shared, key=lambda k: (min(mine_n[k], base_n[k]), str(k)))
    return (_median([r for r in mine if machine_key(r) == key], field),
            _median([r for r in base if machine_key(r) == key], field))


def stand(rows: list[dict], spec: str, kind: str, order: int, baseline: str, rule: Rule, final: bool,
          stage: str, tuning_speed: float | None = None, timing: list[dict] = ()) -> tuple[Standing, list[dict]]:
    """One candidate against the baseline on the same prompts, task by task: its standing and evidence rows.
    The prefill speed ratio comes from comparable rows (:func:`comparable_medians`); where this stage has none,
    the ``timing`` rows (both run again alike, :func:`unmeasured`) or else ``tuning_speed`` (the tuning stage's ratio
    for the same spec) stand in, and the standing says which."""
    evidence, reasons = [], []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for task in tasks:
        mine = [r for r in rows if r["method"] == spec and r["task"] == task]
        base = [r for r in rows if r["method"] == baseline and r["task"] == task]
        metric = (mine or base or [{}])[0].get("metric", "accuracy")
        p = pair_rows(mine, base, metric)
        why = judge(p, rule, final)
        if why:
            reasons.append(f"{task}: {why}")
        a, b, c, _ = p.table or (0, 0, 0, 0)
        evidence.append({
            "stage": stage, "kind": kind, "spec": spec, "baseline": baseline, "task": task, "n": p.n,
            "correct": a + b if p.table else round(sum(r["score"] for r in mine), 3),
            "baseline_correct": a + c if p.table else round(sum(r["score"] for r in base), 3),
            "diff_points": _points(p.diff), "lower": _points(p.lo), "upper": _points(p.hi),
            "interval": p.interval or None, "mcnemar_p": p.p, "table": list(p.table) if p.table else None,
            "verdict": f"fail: {why}" if why else "pass" + (f" (within --tune-slack: {lost} lost net)"
                                                              if (lost := forgiven(p, rule, final)) else "")})
    mine_all = [r for r in rows if r["method"] == spec]
    base_all = [r for r in rows if r["method"] == baseline]
    t, t0 = comparable_medians(mine_all, base_all, "prefill_s")
    kv, kv0 = _median(mine_all, "kv_bytes_prompt"), _median(base_all, "kv_bytes_prompt")  # bytes: any machine
    speed, speed_from = (t0 / t, "") if t and t0 else (None, "")
    if speed is None and timing:
        t, t0 = comparable_medians([r for r in timing if r["method"] == spec],
                                   [r for r in timing if r["method"] == baseline], "prefill_s")
        speed, speed_from = (t0 / t, "timing") if t and t0 else (None, "")
    if speed is None and tuning_speed:
        speed, speed_from = tuning_speed, "tuning"
    standing = Standing(spec, kind, order, not reasons, reasons, sum(r["score"] for r in mine_all), speed,
                        speed_from, kv / kv0 if kv is not None and kv0 else None, baseline,
                        *sharing.shared_count(mine_all + base_all))
    if kind == "prefill" and not (standing.speed_ratio or 0.0) > rule.min_speedup:
        standing.reasons.append(slow_reason(standing.speed_ratio, rule))
        standing.passed = False
    return standing, evidence


UNMEASURED = "unmeasured (no rows of both on one machine, thread count and commit)"
TIMING_SAMPLES = 3  # tuning prompts per task that time a prefill candidate and its baseline again, alike


def slow_reason(speed_ratio: float | None, rule: Rule) -> str:
    """Why a prefill candidate fails the speed part of the rule (its ratio is not above --min-speedup)."""
    speed_text = UNMEASURED if speed_ratio is None else f"{speed_ratio:.2f}x"
    return f"prefill speed vs the baseline {speed_text}, not above --min-speedup {rule.min_speedup:g}"


def unmeasured(rows: list[dict], runs: dict[str, tuple[str, str, int]], rule: Rule) -> list[str]:
    """The prefill candidates that pass on these rows' accuracy but whose speed against the baseline is unmeasured:
    their rows and the baseline's were recorded on different machines, thread counts or commits (a tune resumed
    after an upgrade, or a baseline's rows copied from another run). Timing them again beats refusing them."""
    found = []
    for spec, (kind, baseline, order) in runs.items():
        if kind != "prefill":
            continue
        st, _ = stand(rows, spec, kind, order, baseline, rule, False, "tuning")
        if st.reasons == [slow_reason(None, rule)]:  # unmeasured speed is its only fault
            found.append(spec)
    return found


def _points(x: float) -> float | None:
    """Points kept to 4 decimals: shown to 1, they round once, as the report rounds them (2 decimals then 1 turned
    −8.4528 into −8.4 against the report's −8.5)."""
    return round(100 * x, 4) if math.isfinite(x) else None


def _fmt(points: float | None) -> str:
    return "–" if points is None else f"{points:+.1f}"


# ---- the whole tune ----

def refusal(model, spec: str, kernel: str) -> str | None:
    """Why ``apply`` refuses ``spec`` on this model (a method's own model check, or a stack that cannot work), or
    None: checked before any candidate runs, at no more cost than attaching and removing it."""
    from .. import apply

    try:
        with apply(model, spec, kernel=kernel):
            pass
    except LongreachError as err:
        return str(err)
    return None


def runnable(model, specs: list[str], given: bool, kernel: str, log: Log) -> list[str]:
    """The specs this model can run: one the user gave that cannot is an error, a default one is left out."""
    out = []
    for spec in specs:
        why = refusal(model, spec, kernel)
        if why and given:
            raise InputError(f"candidate {spec} cannot run on this model: {why}")
        if why:
            log(f"left out {spec}: {why}")
        else:
            out.append(spec)
    return out


@dataclass
class Stage:
    """What a stage runs with, and what it found."""

    standings: list[Standing] = field(default_factory=list)
    evidence: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def judge(self, rows: list[dict], runs: dict[str, tuple[str, str, int]], rule: Rule, final: bool,
              name: str, tuned: Stage | None = None, timing: list[dict] = ()) -> None:
        """``runs``: spec as run -> (kind, baseline, grid order). A row already held (a baseline judged with
        an earlier batch) is kept once. ``tuned``: the tuning stage, whose speed ratio stands in where this
        stage's rows of a spec and its baseline were not measured alike; ``timing``: rows run again alike for
        that (:func:`unmeasured`), tried first."""
        held = {row_key(r) for r in self.rows}
        self.rows += [r for r in rows if row_key(r) not in held]
        speeds = {s.spec: s.speed_ratio for s in tuned.standings} if tuned else {}
        for spec, (kind, baseline, order) in runs.items():
            st, ev = stand(rows, spec, kind, order, baseline, rule, final, name, speeds.get(spec), timing)
            self.standings.append(st)
            self.evidence += ev


def tune(model: str, length: int | str, out: Path, settings: TuneSettings | None = None, *, work: Path | None = None,
         lm=None, tokenizer=None, log: Log = print) -> TuneResult:
    """Screen, tune and report (see the module docstring); writes ``out`` (JSON) and returns what it holds.

    ``work`` (default: ``out`` without its suffix) keeps every stage's rows, so a re-run resumes. ``lm`` and
    ``tokenizer``: an already loaded model (else ``model`` is loaded)."""
    from .. import load_model

    settings = settings or TuneSettings()
    plan = plan_tune(model, length, settings)
    out = Path(out)
    if out.suffix != ".json":
        raise InputError(f"--out is the JSON file to write, e.g. tuned/{Path(model).name}-{plan.length}.json")
    work = Path(work) if work is not None else out.with_suffix("")
    if work.exists() and not work.is_dir():
        raise InputError(f"{work} exists and is not a folder; give --work FOLDER for the tuning rows")
    tune_corpus, report_corpus, corpus_note = load_corpora(settings, log)
    if lm is None:
        log(f"loading {model}")
        lm, tokenizer = load_model(model)
    trained = trained_length(lm)
    past = trained is not None and plan.length > trained
    given = bool(settings.candidates)
    positions = runnable(lm, plan.positions or (default_positions(plan.length, trained) if past else []),
                         bool(plan.positions), settings.kernel, log)
    plan = replace(plan, prefill=runnable(lm, plan.prefill, given, settings.kernel, log),
                   press=runnable(lm, plan.press, given, settings.kernel, log))
    screen_length = min(plan.length, trained) if trained else plan.length
    screened = screen(plan, settings, lm, tokenizer, tune_corpus, screen_length, work / "screen.jsonl", log)
    survivors = cut(screened, settings.screen)
    order = {s: i for i, s in enumerate(positions + plan.prefill + plan.press)}
    tuning, reporting, timing = work / "tuning", work / "reporting", work / "timing"
    rule = settings.rule

    def run(methods: list[str], folder: Path, final: bool) -> list[dict]:
        samples, seed, corpus = ((settings.report_samples, settings.report_seed, report_corpus) if final else
                                 (settings.tune_samples, settings.tune_seed, tune_corpus))
        return run_stage(plan, settings, methods, folder, samples, seed, corpus, lm, tokenizer, log)

    tuned = Stage()
    ranked: list[Standing] = []  # position methods that passed, most accurate first
    if past or positions:
        tuned.judge(run(["dense", *positions], tuning, False),
                    {p: ("position", "dense", order[p]) for p in positions}, rule, False, "tuning")
        if not past:
            require_gain(tuned.standings, tuned.rows)
        ranked = rank(tuned.standings, "position")
    # past the trained length a candidate runs under a position method or not at all; inside it, under the chosen
    # one where it can be stacked with it, else alone against dense (None)
    bases = [s.spec for s in ranked] if past else [*(s.spec for s in ranked[:1]), None]
    runs, unstackable = pair_with_positions(lm, survivors, bases, order, settings.kernel)
    if runs:
        baselines = list(dict.fromkeys(b for _, b, _ in runs.values()))
        rows = run([*baselines, *runs], tuning, False)
        again = unmeasured(rows, runs, rule)
        timed: list[dict] = []
        if again:
            samples = min(TIMING_SAMPLES, settings.tune_samples)
            log(f"{', '.join(again)}: passed on accuracy, but the prefill speed against the baseline is "
                f"{UNMEASURED}; timing both again on {samples} tuning prompts per task in {timing}")
            timed = run_stage(plan, settings, [*dict.fromkeys(runs[s][1] for s in again), *again], timing,
                              samples, settings.tune_seed, tune_corpus, lm, tokenizer, log)
        tuned.judge(rows, runs, rule, False, "tuning", timing=timed)
    finalists = {kind: rank(tuned.standings, kind)[: 1 if kind == "position" else settings.finalists]
                 for kind in ("position", "prefill", "press")}
    notes = weak_baselines(tuned.rows, list(dict.fromkeys(["dense", *(b for _, b, _ in runs.values())])))
    for note in notes:
        log(f"warning: {note}")

    reported = Stage()
    for final_runs in finalist_rounds(finalists, reported):
        baselines = ["dense", *dict.fromkeys(b for _, b, _ in final_runs.values())]
        reported.judge(run([*baselines, *final_runs], reporting, True), final_runs, rule, True, "reporting", tuned)
        drop_rejected_stacks(reported.standings)

    data = describe(plan, settings, trained, screen_length, screened, tuned, reported, unstackable,
                    prompt_sets(plan, settings, tuned.rows, reported.rows, tune_corpus.name, report_corpus.name,
                                corpus_note, screen_length),
                    {name: beside(out, path) for name, path in
                     (("screen", work / "screen.jsonl"), ("tuning", tuning), ("reporting", reporting),
                      *((("timing", timing),) if timing.exists() else ()))})
    if past or positions:
        data["position"] = (choose("position", finalists, reported.standings, tuned.standings, screened,
                                   reported.evidence) if past or ranked else
                            {"spec": None, "finalists": [],
                             "reason": "no position method was more accurate than dense on the tuning prompts "
                                       "without losing more than the rule allows on a task (inside the trained "
                                       "length one is used only where it helps)"})
    for kind in ("prefill", "press"):
        data[kind] = choose(kind, finalists, reported.standings, tuned.standings, screened, reported.evidence,
                            blocked=past and not ranked)
    data["tuning_notes"] = notes
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out)
    return TuneResult(data, out)


def finalist_rounds(finalists: dict[str, list[Standing]], reported: Stage
                    ) -> Iterator[dict[str, tuple[str, str, int]]]:
    """The finalists to run on the reporting prompts, one per kind per round, in tuning order: a kind whose
    finalist passed (``reported``, updated between rounds) gets no further round, nor does a candidate stacked on
    a position method that failed there (it would fail with it). The choice is the one running every finalist at
    once would give (the first in tuning order that passes), without the reporting runs of those behind it."""
    for r in range(max((len(fs) for fs in finalists.values()), default=0)):
        settled = {s.kind for s in reported.standings if s.passed}
        rejected = {s.spec for s in reported.standings if s.kind == "position" and not s.passed}
        batch = {f.spec: (f.kind, f.baseline, f.order) for kind, fs in finalists.items()
                 if kind not in settled for f in fs[r:r + 1] if f.baseline not in rejected}
        if batch:
            yield batch


def weak_baselines(rows: list[dict], baselines: list[str]) -> list[str]:
    """Tasks whose tuning prompts the baseline mostly failed: a candidate cannot lose there what the baseline never
    had, so the tuning stage passes nearly anything on that task and ranks by speed or cache alone. Said, not
    refused: the reporting prompts still judge every finalist."""
    notes = []
    for baseline in baselines:
        for task in dict.fromkeys(r["task"] for r in rows if r["method"] == baseline):
            scores = [r["score"] for r in rows if r["method"] == baseline and r["task"] == task]
            if scores and sum(scores) / len(scores) < WEAK_BASELINE:
                notes.append(f"{baseline} scored {sum(scores):g}/{len(scores)} on the tuning prompts of {task}: a "
                             f"candidate can lose at most that much there, so the tuning stage barely tells "
                             f"candidates apart on it and the reporting prompts decide; to tune on prompts the model "
                             f"answers, change --tune-corpus or --tune-seed, or raise --tune-samples")
    return notes


def require_gain(standings: list[Standing], rows: list[dict]) -> None:
    """Inside the trained length dense is a valid answer, and a position method costs prefill time: one that
    passed the rule but is not more accurate than dense on the tuning prompts (all tasks together) fails."""
    dense = sum(r["score"] for r in rows if r["method"] == "dense")
    for s in standings:
        if s.kind == "position" and s.passed and not s.score > dense:
            s.passed = False
            s.reasons.append(f"not more accurate than dense on the tuning prompts ({s.score:g} against {dense:g} "
                             "right); inside the trained length a position method must be")


def drop_rejected_stacks(standings: list[Standing]) -> None:
    """A candidate stacked on a position method that failed on the reporting prompts fails too: the stack would
    recommend a method the evidence turned down."""
    rejected = {s.spec for s in standings if s.kind == "position" and not s.passed}
    for s in standings:
        if s.kind != "position" and s.passed and s.baseline in rejected:
            s.passed = False
            s.reasons.append(f"its position method {s.baseline} did not pass on the reporting prompts")


def pair_with_positions(model, survivors: list[Screened], positions: list[str | None], order: dict[str, int],
                        kernel: str) -> tuple[dict[str, tuple[str, str, int]], dict[str, str]]:
    """Each screen survivor as it will run: under the first of ``positions`` it can be stacked with (a re-mapping
    one cannot carry a press; None: alone), judged against that position method alone (None: against dense).
    Returns spec as run -> (kind, baseline, grid order), and survivor -> why it has no position method."""
    runs, unstackable = {}, {}
    for s in survivors:
        for position in positions:
            spec = compose(position, s.spec)
            if position is None or refusal(model, spec, kernel) is None:
                runs[spec] = (s.kind, compose(position, "dense"), order[s.spec])
                break
        else:
            unstackable[s.spec] = ("no position method that passed could be stacked with it" if positions else
                                   "no position method passed on the tuning prompts")
    return runs, unstackable


def describe(plan: TunePlan, settings: TuneSettings, trained: int | None, screen_length: int,
             screened: list[Screened], tuned: Stage, reported: Stage, unstackable: dict[str, str], prompts: dict,
             folders: dict) -> dict:
    """The JSON (without the choices): inputs, rule, screen, prompt sets, standings, evidence, provenance."""
    from ..provenance import provenance

    rule = settings.rule
    return {
        "schema": SCHEMA, "model": plan.model, "length": plan.length, "tasks": plan.tasks.split(";"),
        "chat": settings.chat, "chat_applied": chat_applied(tuned.rows + reported.rows),
        "kernel": settings.kernel, "trained_length": trained,
        "past_trained_length": trained is not None and plan.length > trained,
        "rule": {**asdict(rule), "level": 0.95, "unit": "points (percent of prompts)",
                 "tuning": "on every task, observed candidate - baseline difference >= -max_drop (a right/wrong "
                           "task also passes with at most tune_slack prompts lost net of those won) (prefill: "
                           "faster than the baseline by more than min_speedup)",
                 "reporting": "observed difference >= -max_drop (no slack) and the 95% interval's lower end > "
                              "min_lower on every task (prefill: faster, as above)",
                 "interval": "Newcombe's method 10 (right/wrong scores), paired percentile bootstrap otherwise",
                 "finalists": settings.finalists},
        "screen": {"length": screen_length, "rule": asdict(settings.screen), "queries": settings.screen_queries,
                   "candidates": [asdict(s) for s in screened], "unstackable": unstackable},
        "prompts": prompts,
        "standings": {"tuning": [asdict(s) for s in tuned.standings],
                      "reporting": [asdict(s) for s in reported.standings]},
        "evidence": tuned.evidence + reported.evidence,
        "folders": folders,
        "provenance": provenance(),
    }


def chat_applied(rows: list[dict]) -> bool | str | None:
    """Whether the rows' prompts went through a chat template: ``chat`` only asks for one, and a tokenizer without
    a template (Gemma-3-270M's GGUF) leaves the prompt plain. "mixed" if the rows differ; None without rows."""
    applied = {bool(r.get("chat_applied")) for r in rows}
    return None if not applied else applied.pop() if len(applied) == 1 else "mixed"


def prompt_sets(plan: TunePlan, settings: TuneSettings, tune_rows: list[dict], report_rows: list[dict],
                tune_corpus: str, report_corpus: str, note: str, screen_length: int) -> dict:
    """Both prompt sets as run: seeds, corpus and the hash of every prompt; and whether they are disjoint."""

    def described(rows: list[dict], first: int, samples: int, corpus: str) -> dict:
        return {"seeds": [first, first + samples - 1], "samples_per_task": samples, "corpus": corpus,
                "prompt_sha": sorted({r["prompt_sha"] for r in rows if r.get("prompt_sha")})}

    tuning = described(tune_rows, settings.tune_seed, settings.tune_samples, tune_corpus)
    reporting = described(report_rows, settings.report_seed, settings.report_samples, report_corpus)
    return {"tuning": tuning, "reporting": reporting,
            "screen": {"seeds": [settings.tune_seed, settings.tune_seed + plan.screen_per_task - 1],
                       "per_task": plan.screen_per_task, "length": screen_length, "corpus": tune_corpus,
                       "note": "the first tuning seeds of each task (at the trained length when past it)"},
            "disjoint": not set(tuning["prompt_sha"]) & set(reporting["prompt_sha"]),
            "corpus_note": note,
            **({"passkey_note": "passkey's filler is the same text in every corpus: its prompts differ by seed only"}
               if any(task.split(":")[0] == "passkey" for task in plan.tasks.split(";")) else {})}


def choose(kind: str, finalists: dict, final: list[Standing], standings: list[Standing], screened: list[Screened],
           evidence: list[dict], blocked: bool = False) -> dict:
    """The first finalist of ``kind`` that passed on the reporting prompts, or why there is none. ``finalists``
    lists every finalist, ``reported`` those that ran there (the rest waited behind one that passed, or were
    stacked on a position method that failed)."""
    if blocked:
        return {"spec": None, "reason": "no position method passed on the tuning prompts, so nothing past the "
                                        "trained length was tuned"}
    passed = [s for s in final if s.kind == kind and s.passed]
    reported = [s.spec for s in final if s.kind == kind]  # run on the reporting prompts (finalist_rounds)
    if passed:
        s = passed[0]
        return {"spec": s.spec, "baseline": s.baseline, "speed_ratio": s.speed_ratio,
                "speed_from": s.speed_from or "reporting", "cache_ratio": s.cache_ratio,
                "rows_shared": {"shared": s.rows_shared, "recorded": s.rows_recorded, "threshold": sharing.SHARED},
                "evidence": "passed on the reporting prompts: " + "; ".join(
                    f"{e['task']} n = {e['n']}, {_fmt(e['diff_points'])} points "
                    f"[{_fmt(e['lower'])}, {_fmt(e['upper'])}]"
                    for e in evidence if e["stage"] == "reporting" and e["spec"] == s.spec),
                "finalists": [f.spec for f in finalists[kind]], "reported": reported}
    if any(s.kind == kind for s in final):
        why = "; ".join(f"{s.spec}: {', '.join(s.reasons)}" for s in final if s.kind == kind)
        reason = f"no finalist passed on the reporting prompts ({why})"
    elif any(s.kind == kind for s in standings):
        reason = "no candidate passed on the tuning prompts"
    elif any(s.kind == kind and s.kept for s in screened):
        reason = "no screen survivor could be stacked with a position method that passed (screen.unstackable)"
    elif any(s.kind == kind for s in screened):
        reason = "every candidate was dropped by the screen"
    else:
        reason = "no candidates of this kind were given"
    return {"spec": None, "reason": reason, "finalists": [f.spec for f in finalists[kind]], "reported": reported}
