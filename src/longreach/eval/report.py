"""Turn ``results.jsonl`` into what a user decides with: Markdown tables and an offline HTML report.

Per task, method and length: the score (mean with a 95% confidence interval — Wilson for
exact-match accuracy, Student t for recall and perplexity), how many answers were empty, attention density actually
used, prefill time and its ratio to the baseline's (``dense`` unless told) measured in the same sweep, decode time
per token, KV-cache size and peak RSS. Then, per task, each method set against the baseline on the same prompts:
the paired difference with its 95% interval (Newcombe's method 10 for right/wrong scores, a paired bootstrap
otherwise), McNemar's exact p, and a verdict worded by the interval (:func:`verdict`); where the rows sweep
depths, the same difference at each depth (:func:`depth_table`). Last, each method's effective
context length as RULER defines it (:func:`longreach.eval.stats.effective_length`). The statistics themselves
live in :mod:`longreach.eval.stats`. ``report.html`` embeds PNG plots (matplotlib) so it opens offline.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import LongreachError
from ..provenance import describe, machine_key
from . import sharing
from .results import BadLine, read_rows
from .stats import T95 as T95
from .stats import effective_length, mcnemar_exact, mean_ci, newcombe_paired, paired_bootstrap
from .stats import t_quantile as t_quantile
from .stats import wilson as wilson

BASELINE = "dense"
MARGIN = 5.0  # points: "within MARGIN points of dense" needs the paired interval's lower end above -MARGIN
THRESHOLD = 0.85  # effective context length: the mean score every length up to it keeps (RULER)
RESAMPLES = 2000  # paired bootstrap resamples (seed 0, so a report is reproducible)
EPS = 1e-9  # float noise allowed when an interval bound is compared with 0 or -MARGIN
PROMPT_FIELDS = ("model", "task", "length", "depth", "seed", "chat", "corpus")  # same values = same prompt


@dataclass
class ScoreCell:
    """The rows of one task x method x length, read back to be scored together (the runner's ``Cell`` is the
    unit of work that produced them)."""

    task: str
    metric: str
    method: str
    length: int
    rows: list[dict]

    def values(self, field: str) -> list[float]:
        return [r[field] for r in self.rows if isinstance(r.get(field), int | float)]

    def avg(self, field: str) -> float | None:
        vals = self.values(field)
        return sum(vals) / len(vals) if vals else None

    @property
    def score(self) -> tuple[float, float, float]:
        scores = self.values("score")
        binary = self.metric == "accuracy" and all(s in (0.0, 1.0) for s in scores)
        return mean_ci(scores, binary)


def group(rows: list[dict]) -> dict[tuple[str, str, int], ScoreCell]:
    cells: dict[tuple[str, str, int], ScoreCell] = {}
    for r in rows:
        key = (r["task"], r["method"], r["length"])
        if key not in cells:
            cells[key] = ScoreCell(r["task"], r.get("metric", "accuracy"), r["method"], r["length"], [])
        cells[key].rows.append(r)
    return cells


def task_cells(cells: dict, task: str, methods: list[str]) -> list[ScoreCell]:
    """The cells of ``task``, method by method in ``methods``' order, each method's lengths ascending."""
    lengths = sorted({c.length for c in cells.values() if c.task == task})
    return [cells[(task, m, n)] for m in methods for n in lengths if (task, m, n) in cells]


def ordered_methods(rows: list[dict], baseline: str = BASELINE) -> list[str]:
    """The baseline first, then methods in the order they first appear."""
    seen = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(seen, key=lambda m: (m != baseline, seen.index(m)))


def fmt_score(cell: ScoreCell) -> str:
    mean, lo, hi = cell.score
    if cell.metric == "ppl":
        return f"{mean:.2f} ± {(hi - lo) / 2:.2f}" if math.isfinite(hi) else f"{mean:.2f}"
    if math.isfinite(hi):
        return f"{mean:.0%} ({lo:.0%}–{hi:.0%})" if cell.metric == "accuracy" else f"{mean:.0%} ± {(hi - lo) / 2:.0%}"
    return f"{mean:.0%}"


MIXED = "†"  # marks a ratio whose rows came from more than one machine, commit or thread count
SHARED_MARK = "‡"  # marks a ratio with a row that shared the cores with other work (eval.sharing)


def speed_ratio(cells: dict, cell: ScoreCell, baseline: str = BASELINE) -> str:
    """The baseline's prefill time over this cell's, flagged when the two sides' rows were not all measured
    alike."""
    base = cells.get((cell.task, baseline, cell.length))
    t, t0 = cell.avg("prefill_s"), base.avg("prefill_s") if base else None
    if not (t and t0):
        return "–"
    mixed = len({machine_key(r) for r in cell.rows + base.rows}) > 1
    busy = any(sharing.shared(r) for r in cell.rows + base.rows)
    return f"{t0 / t:.2f}x{MIXED if mixed else ''}{SHARED_MARK if busy else ''}"


def provenance_lines(rows: list[dict]) -> list[str]:
    """Where the rows were measured: one line per distinct machine / code state, with its row count."""
    counts: dict[tuple, list] = {}
    for r in rows:
        entry = counts.setdefault(machine_key(r), [r, 0])
        entry[1] += 1
    lines = []
    for first, n in counts.values():
        prov = first.get("provenance")
        where = describe(prov) if isinstance(prov, dict) else (
            f"host {first.get('host')}, longreach {first.get('version')} (no provenance recorded: older row)")
        lines.append(f"- {n} rows: {where}")
    return lines


NEAR_TIE = 0.05  # an answer whose token led the runner-up by less than this (probability) hung on a near-tie
SELECT_SHOWN = 0.01  # the selector stage's share of prefill or decode time below which a cell gets no line


def markdown(rows: list[dict], margin: float = MARGIN, threshold: float = THRESHOLD,
             baseline: str = BASELINE) -> str:
    """The report's text: per task a table of every cell, then the paired comparison with ``baseline`` (dense
    unless told) and, where the rows sweep depths, the scores by depth; last the effective context lengths.
    ``margin`` (points) words the verdicts, ``threshold`` sets the effective length."""
    cells = group(rows)
    methods = ordered_methods(rows, baseline)
    models = sorted({r["model"] for r in rows})
    out = [f"Model: {', '.join(models)} · {len(rows)} samples · score = mean (95% CI) · "
           f"speed = {baseline} prefill time / method prefill time, same sweep", "", "Measured on:",
           *provenance_lines(rows)]
    if len({machine_key(r) for r in rows}) > 1:
        out += ["", f"{MIXED} this speed ratio divides times measured on different machines, commits or thread "
                "counts: compare it with care"]
    busy, recorded = sharing.shared_count(rows)
    if recorded < len(rows):
        out += ["", f"{len(rows) - recorded} of {len(rows)} rows do not record whether the cores were shared "
                "(written before longreach recorded it)"]
    if busy:
        out += ["", f"{SHARED_MARK} {busy} of {recorded} rows shared the cores with other work (more than "
                f"{sharing.SHARED:.0%} of the machine's CPU time went elsewhere during the row): a speed ratio "
                f"that includes one is not a speed result"]
    for task in dict.fromkeys(r["task"] for r in rows):
        metric = next(c.metric for c in cells.values() if c.task == task)
        what = {"accuracy": "accuracy", "recall": "recall", "ppl": "perplexity (lower is better)"}[metric]
        out += ["", f"### {task} — {what}", "",
                f"| method | length | n | score | no answer | density | prefill s | speed vs {baseline} "
                "| decode ms/tok | KV MiB | peak RSS MiB |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for cell in task_cells(cells, task, methods):
            dens = cell.avg("density")
            dec_s, dec_n = sum(cell.values("decode_s")), sum(cell.values("decode_tokens"))
            kv = cell.avg("kv_bytes")
            out.append(
                f"| {cell.method} | {cell.length} | {len(cell.rows)} | {fmt_score(cell)} | {no_answer(cell)} | "
                f"{'–' if dens is None else f'{dens:.3f}'} | {cell.avg('prefill_s'):.2f} | "
                f"{speed_ratio(cells, cell, baseline)} | {f'{1000 * dec_s / dec_n:.0f}' if dec_n else '–'} | "
                f"{'–' if kv is None else f'{kv / 2**20:.1f}'} | {cell.avg('peak_rss_mb') or 0:.0f} |")
        out += select_lines(cells, task, methods)
        out += paired_table(cells, task, methods, margin, baseline)
        out += near_tie_lines(cells, task, methods, baseline)
        out += depth_table(cells, task, methods, baseline)
    out += effective_table(cells, methods, threshold)
    return "\n".join(out)


def select_lines(cells: dict, task: str, methods: list[str]) -> list[str]:
    """Where rows recorded it, the selector stage's share of a method's time: a selector whose choice costs more
    than its kernels save shows here, beside its accuracy. Cells where it stayed under ``SELECT_SHOWN`` of both
    prefill and decode (dense, presses: their selector chooses nothing) get no line."""
    lines = []
    for cell in task_cells(cells, task, methods):
        timed = [r for r in cell.rows if isinstance(r.get("select_s"), int | float)]
        if not timed:
            continue
        select, prefill = sum(r["select_s"] for r in timed), sum(r.get("prefill_s") or 0.0 for r in timed)
        decode = [r for r in timed if isinstance(r.get("select_decode_s"), int | float) and r.get("decode_tokens")]
        dec_select, dec_s = sum(r["select_decode_s"] for r in decode), sum(r["decode_s"] for r in decode)
        tokens = sum(r["decode_tokens"] for r in decode)
        shares = (select / prefill if prefill else 0.0, dec_select / dec_s if dec_s else 0.0)
        if max(shares) < SELECT_SHOWN:
            continue
        per_token = (f"; decode {1000 * dec_select / tokens:.1f} ms per token ({shares[1]:.0%} of decode)"
                     if tokens and dec_s else "")
        lines.append(f"- {cell.method} at {cell.length}: prefill {select / len(timed):.2f} s per sample "
                     f"({shares[0]:.0%} of prefill){per_token}; {len(timed)} rows")
    if not lines:
        return []
    return ["", "Time in the selector stage (choosing keys, block summaries, index fits; rows' `select_s` and "
                f"`select_decode_s`, inside the prefill and decode times above; cells where it reached "
                f"{SELECT_SHOWN:.0%} of either):", "", *lines]


def no_answer(cell: ScoreCell) -> str:
    """How many generated rows have an empty answer: the model ended at once (its end token first), a failure
    apart from a wrong answer (an instruct model given a bare question without its chat template often does it,
    and a method can make it do it more often). "–" for perplexity, and for rows that did not record answers."""
    answers = [r["prediction"] for r in cell.rows if isinstance(r.get("prediction"), str)]
    if cell.metric == "ppl" or not answers:
        return "–"
    return str(sum(not a.strip() for a in answers))


def prompt_key(row: dict) -> tuple:
    return tuple(json.dumps(row.get(f), sort_keys=True) for f in PROMPT_FIELDS)


def scored(row: dict) -> bool:
    s = row.get("score")
    return isinstance(s, int | float) and math.isfinite(s)


@dataclass(frozen=True)
class Paired:
    """A method cell set against the baseline (dense unless told) on the same prompts. ``diff``, ``lo`` and ``hi``
    are method - baseline, as a proportion for accuracy and recall (shown in points) and in the metric's unit for
    perplexity."""

    n: int
    diff: float
    lo: float
    hi: float
    interval: str  # how the interval was computed: "Newcombe 10", "bootstrap" or "" (no pairs)
    p: float | None  # McNemar's exact p (right/wrong scores only)
    table: tuple[int, int, int, int] | None  # both right / only method / only the baseline / neither
    sha_differs: int  # candidate pairs left out because the two rows' prompt_sha differ
    unpaired: int  # method rows with no baseline row on the same prompt


def row_pairs(rows: list[dict], base_rows: list[dict]) -> tuple[list[tuple[dict, dict]], int, int]:
    """Each scored row of ``rows`` with the baseline's row on the same prompt (:data:`PROMPT_FIELDS` equal and,
    when both rows record ``prompt_sha``, equal hashes); and how many were left out for a differing hash, and for
    no baseline row."""
    base: dict[tuple, dict] = {}
    for r in base_rows:
        if scored(r):
            base.setdefault(prompt_key(r), r)
    pairs, seen, differs, unpaired = [], set(), 0, 0
    for r in rows:
        key = prompt_key(r)
        if not scored(r) or key in seen:  # a resumed run never duplicates a prompt; count each once anyway
            continue
        seen.add(key)
        o = base.get(key)
        if o is None:
            unpaired += 1
        elif r.get("prompt_sha") and o.get("prompt_sha") and r["prompt_sha"] != o["prompt_sha"]:
            differs += 1
        else:
            pairs.append((r, o))
    return pairs, differs, unpaired


def pair_rows(rows: list[dict], base_rows: list[dict], metric: str) -> Paired:
    """Pair ``rows`` with the baseline's on the same prompts (:func:`row_pairs`), then compare the pairs."""
    matched, differs, unpaired = row_pairs(rows, base_rows)
    pairs = [(float(r["score"]), float(o["score"])) for r, o in matched]
    if not pairs:
        return Paired(0, math.nan, -math.inf, math.inf, "", None, None, differs, unpaired)
    x, y = [m for m, _ in pairs], [d for _, d in pairs]
    if metric == "accuracy" and all(s in (0.0, 1.0) for s in x + y):
        a = sum(m == 1 and d == 1 for m, d in pairs)
        b = sum(m == 1 and d == 0 for m, d in pairs)
        c = sum(m == 0 and d == 1 for m, d in pairs)
        table = (a, b, c, len(pairs) - a - b - c)
        return Paired(len(pairs), *newcombe_paired(*table), "Newcombe 10", mcnemar_exact(b, c), table, differs,
                      unpaired)
    return Paired(len(pairs), *paired_bootstrap(x, y, resamples=RESAMPLES, seed=0), "bootstrap", None, None,
                  differs, unpaired)


def pair_cells(cells: dict, cell: ScoreCell, baseline: str = BASELINE) -> Paired:
    """``cell`` against the baseline's cell of the same task and length (:func:`pair_rows`)."""
    base = cells.get((cell.task, baseline, cell.length))
    return pair_rows(cell.rows, base.rows if base else [], cell.metric)


def verdict(p: Paired, metric: str, margin: float = MARGIN, baseline: str = BASELINE) -> str:
    """What the paired interval supports, in words.

    Scores in [0, 1] (accuracy, recall), with the interval [lo, hi] of method - baseline in points:
    "better" when lo > 0; "worse" when hi < 0 ("worse, but within X points of dense" when also lo > -X);
    else "within X points of dense" when lo > -X; else "no difference observed (n = …)". X = ``margin``; the
    words name ``baseline`` where these say dense.
    Perplexity (lower is better; a margin in points does not apply): "better" when hi < 0, "worse" when lo > 0,
    else "no difference observed (n = …)". No pairs: "no paired dense rows" (the baseline's name). Each
    comparison is strict by more than :data:`EPS`, so float noise on a boundary never tips a verdict towards the
    claim.
    """
    if p.n == 0:
        return f"no paired {baseline} rows"
    lo, hi = p.lo, p.hi  # a bound within EPS of a boundary counts as on it (0.8 - 0.9 is -0.09999999999999998)
    if metric == "ppl":
        return "better" if hi < -EPS else "worse" if lo > EPS else f"no difference observed (n = {p.n})"
    within = lo > -margin / 100 + EPS
    if lo > EPS:
        return "better"
    if hi < -EPS:
        return f"worse, but within {margin:g} points of {baseline}" if within else "worse"
    return f"within {margin:g} points of {baseline}" if within else f"no difference observed (n = {p.n})"


def fmt_diff(x: float, metric: str) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{round(x, 2) + 0.0:+.2f}" if metric == "ppl" else f"{round(100 * x, 1) + 0.0:+.1f}"


def fmt_interval(p: Paired, metric: str) -> str:
    return f"[{fmt_diff(p.lo, metric)}, {fmt_diff(p.hi, metric)}]" if math.isfinite(p.lo + p.hi) else "–"


def paired_table(cells: dict, task: str, methods: list[str], margin: float, baseline: str = BASELINE) -> list[str]:
    """The paired comparison with the baseline for every other cell of ``task``."""
    mine = [c for c in task_cells(cells, task, methods) if c.method != baseline]
    if not mine:
        return []
    metric = mine[0].metric
    unit = "perplexity (lower is better)" if metric == "ppl" else "points"
    claim = ("" if metric == "ppl" else
             f"; \"within {margin:g} points of {baseline}\" only where the interval's lower end is above −{margin:g}")
    out = ["", f"Paired with {baseline} on the same prompts (task, length, depth, seed, chat and corpus equal, and "
           f"the prompt hash where both rows record it): method − {baseline} in {unit}, 95% CI by Newcombe's method "
           f"10 for right/wrong scores or a paired percentile bootstrap ({RESAMPLES} resamples, seed 0) otherwise; "
           f"McNemar's exact p on the discordant pairs{claim}.", "",
           f"| method | length | n paired | method − {baseline} | 95% CI | CI by | McNemar p | verdict |",
           "|---|---|---|---|---|---|---|---|"]
    for cell in mine:
        p = pair_cells(cells, cell, baseline)
        mcn = "–" if p.p is None else "< 0.001" if p.p < 0.001 else f"{p.p:.3f}"
        notes = [verdict(p, metric, margin, baseline)]
        if p.sha_differs:
            notes.append(f"{p.sha_differs} left out: prompt_sha differs from {baseline}'s")
        if p.unpaired and p.n:
            notes.append(f"{p.unpaired} without a {baseline} row on the same prompt")
        out.append(f"| {cell.method} | {cell.length} | {p.n} | {fmt_diff(p.diff, metric)} | {fmt_interval(p, metric)} "
                   f"| {p.interval or '–'} | {mcn} | {'; '.join(notes)} |")
    return out


def near_tie_lines(cells: dict, task: str, methods: list[str], baseline: str = BASELINE) -> list[str]:
    """For right/wrong cells whose rows record ``answer_lead``: of the prompts only one side answered, how many it
    answered on a near-tie (a lead under :data:`NEAR_TIE` at some answer token). A discordant pair won on a
    near-tie says little about the method: a small change to attention could have flipped it (docs/evaluation.md).
    A side whose winners did not all record it (rows written before the field) is named as not recorded rather than
    counted in part."""
    lines = []
    for cell in task_cells(cells, task, methods):
        base = cells.get((task, baseline, cell.length))
        if cell.method == baseline or base is None or cell.metric != "accuracy":
            continue
        pairs, _, _ = row_pairs(cell.rows, base.rows)
        only_base = [o for r, o in pairs if o["score"] == 1 and r["score"] == 0]
        only_method = [r for r, o in pairs if r["score"] == 1 and o["score"] == 0]
        sides = [(won, who) for won, who in ((only_base, baseline), (only_method, "the method")) if won]
        recorded = [all(isinstance(w.get("answer_lead"), int | float) for w in won) for won, _ in sides]
        if not any(recorded):
            continue
        told = [f"{sum(w['answer_lead'] < NEAR_TIE for w in won)} of the {len(won)} only {who} answered" if ok
                else f"the {len(won)} only {who} answered: not recorded (rows without answer_lead)"
                for (won, who), ok in zip(sides, recorded, strict=True)]
        lines.append(f"- {cell.method} at {cell.length}: near-ties among the prompts one side lost: "
                     f"{'; '.join(told)}")
    if not lines:
        return []
    return ["", f"Near-ties (the winner's answer led the runner-up token by less than {NEAR_TIE:g} in probability "
                "at some token of its answer, rows' `answer_lead`; cells with discordant prompts where a side's "
                "winners recorded it):",
            "", *lines]


def fmt_depth_cell(rows: list[dict], metric: str) -> str:
    """Right/samples for right/wrong scores, else the mean score and n."""
    got = [float(r["score"]) for r in rows if scored(r)]
    if not got:
        return "–"
    if metric == "accuracy" and all(g in (0.0, 1.0) for g in got):
        return f"{sum(got):g}/{len(got)}"
    return f"{sum(got) / len(got):.2f} (n = {len(got)})"


def depth_table(cells: dict, task: str, methods: list[str], baseline: str = BASELINE) -> list[str]:
    """Where the needle (or the gold pair, or gold document) sits, for a task whose rows sweep more than one depth:
    each method's score at each depth and, for every other method, its paired difference from the baseline there
    (lost in the middle is read off this table). The interval is given for right/wrong scores only: a bootstrap
    over the few pairs of one depth would print a near-zero width that reads as certainty. Tasks with documents
    also show where attention sorting left the gold document, and the sorting passes' time."""
    mine = [c for c in cells.values() if c.task == task]
    depths = sorted({r["depth"] for c in mine for r in c.rows if isinstance(r.get("depth"), int | float)})
    documents = any("gold_document" in r for c in mine for r in c.rows)
    if not depths or (len(depths) < 2 and not documents):
        return []
    metric = mine[0].metric
    what = "the gold document's position" if documents else "depth"
    unit = "in the metric's unit" if metric == "ppl" else "in points"
    out = ["", f"By {what} (0 = the start of the context, 1 = its end): score at each depth (right/samples, or "
           f"the mean score and n); for each method other than {baseline}, its paired difference from {baseline} "
           f"at that depth {unit}, with its 95% interval (Newcombe 10) for right/wrong scores and alone otherwise; "
           f"\"no pair\": {baseline} has no row on those prompts."
           + (" After attention sorting: where the gold document ended, on the same scale (mean), and the sorting "
              "passes' time per sample (not in prefill s)." if documents else ""), "",
           "| method | length | " + " | ".join(f"depth {d:g}" for d in depths)
           + (" | gold ends at | sort s |" if documents else " |"),
           "|---" * (len(depths) + 2 + 2 * documents) + "|"]
    for method in methods:
        for length in sorted({c.length for c in mine}):
            cell = cells.get((task, method, length))
            if cell is None:
                continue
            base = cells.get((task, baseline, length))
            cols = []
            for d in depths:
                rows = [r for r in cell.rows if r.get("depth") == d]
                text = fmt_depth_cell(rows, metric)
                if method != baseline and rows:
                    p = pair_rows(rows, base.rows if base else [], metric)  # depth is part of the prompt key
                    if not p.n:
                        text += ", no pair"
                    elif p.interval == "Newcombe 10":
                        text += f", {fmt_diff(p.diff, metric)} {fmt_interval(p, metric)}"
                    else:
                        text += f", {fmt_diff(p.diff, metric)} (n = {p.n})"
                cols.append(text)
            line = f"| {method} | {length} | {' | '.join(cols)} |"
            if documents:
                ends = [r["gold_document_sorted"] / max(1, r["documents"] - 1) for r in cell.rows
                        if isinstance(r.get("gold_document_sorted"), int) and isinstance(r.get("documents"), int)]
                sort_s = cell.avg("sort_s")
                line += f" {f'{sum(ends) / len(ends):.2f}' if ends else '–'} | " \
                        f"{'–' if sort_s is None else f'{sort_s:.2f}'} |"
            out.append(line)
    return out


def effective_lengths(cells: dict, threshold: float = THRESHOLD) -> dict[str, dict[str, tuple[int | None, list[int]]]]:
    """Per method and per task with a score in [0, 1] (perplexity has no threshold): the effective length (see
    :func:`longreach.eval.stats.effective_length`) and the lengths it was judged on. With more than one such task
    in the report, "all tasks" too: the mean of the task means at each length where the method ran every one of
    the report's tasks (a method missing a task gets none, so the column compares like with like)."""
    means: dict[str, dict[str, dict[int, float]]] = {}
    for c in cells.values():
        if c.metric != "ppl" and c.values("score"):
            means.setdefault(c.method, {}).setdefault(c.task, {})[c.length] = c.score[0]
    every = {t for tasks in means.values() for t in tasks}
    result: dict[str, dict[str, tuple[int | None, list[int]]]] = {}
    for method, tasks in means.items():
        result[method] = {t: (effective_length(s, threshold), sorted(s)) for t, s in tasks.items()}
        if len(every) > 1 and set(tasks) == every:
            common = sorted(set.intersection(*(set(s) for s in tasks.values())))
            overall = {n: sum(s[n] for s in tasks.values()) / len(tasks) for n in common}
            result[method]["all tasks"] = (effective_length(overall, threshold), common)
    return result


def fmt_length(found: int | None, lengths: list[int]) -> str:
    if not lengths:
        return "–"
    if found is None:
        return f"< {lengths[0]}"
    return f"≥ {found}" if found == lengths[-1] else str(found)


def effective_table(cells: dict, methods: list[str], threshold: float) -> list[str]:
    found = effective_lengths(cells, threshold)
    if not found:
        return []
    columns = list(dict.fromkeys(c.task for c in cells.values() if c.metric != "ppl"))
    if len(columns) > 1:
        columns.append("all tasks")
    out = ["", "### Effective context length", "",
           f"RULER's definition: the longest evaluated length whose mean score, and the mean score at every shorter "
           f"evaluated length, is at least {threshold:.0%}. \"≥ L\": every length run passed (longer ones were not "
           f"run); \"< L\": the shortest length run, L, already fell below. Perplexity tasks have no threshold.", "",
           "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method in methods:
        if method in found:
            out.append(f"| {method} | " + " | ".join(fmt_length(*found[method].get(t, (None, [])))
                                                     for t in columns) + " |")
    return out


@dataclass(frozen=True)
class Report:
    markdown: str
    html_path: Path
    bad_lines: list[BadLine]


def build_report(out: Path, margin: float = MARGIN, threshold: float = THRESHOLD,
                 baseline: str | None = None) -> Report:
    """Read ``out/results.jsonl``, write ``out/report.html`` (and ``out/plots/``), return the Markdown. ``margin``:
    the points a "within X points of the baseline" verdict allows; ``threshold``: the score the effective context
    length keeps; ``baseline``: the method every other is paired with. Unset, it is dense, and a folder without
    dense rows gets "no paired dense rows"; named, it must have rows (past a model's trained length, where dense
    fails, a position method such as ``selfextend``)."""
    rows, bad = read_rows(out / "results.jsonl")
    if not rows:
        raise LongreachError(f"{out / 'results.jsonl'} holds no usable rows"
                             + (f" ({len(bad)} unreadable lines)" if bad else ""))
    methods = ordered_methods(rows, baseline or BASELINE)
    if baseline is not None and baseline not in methods:
        raise LongreachError(f"baseline {baseline!r} has no rows in {out / 'results.jsonl'}; its methods are: "
                             + ", ".join(methods))
    text = markdown(rows, margin=margin, threshold=threshold, baseline=baseline or BASELINE)
    from .plots import figures

    path = out / "report.html"
    figs = figures(rows, methods)
    save_pngs(figs, out / "plots")
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(text, figs, bad))
    tmp.replace(path)
    return Report(text, path, bad)


def save_pngs(figs: list[tuple[str, str]], folder: Path) -> None:
    """The report's plots as files too, for docs that link them."""
    import base64
    import re

    if figs:
        folder.mkdir(parents=True, exist_ok=True)
    for title, png in figs:
        slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
        (folder / f"{slug}.png").write_bytes(base64.b64decode(png))


def render_html(text: str, figures: list[tuple[str, str]], bad: list[BadLine]) -> str:
    """Markdown tables to HTML tables (our own simple format), then the plots as data: URIs."""
    body, table = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            tag = "th" if not table else "td"
            if not table:
                body.append("<table>")
                table = True
            body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("</table>")
            table = False
        if line.startswith("### "):
            body.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if table:
        body.append("</table>")
    if bad:
        body.append("<h3>Unreadable lines in results.jsonl</h3><ul>"
                    + "".join(f"<li>{html.escape(str(b))}</li>" for b in bad) + "</ul>")
    for title, png in figures:
        body.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>longreach report</title><style>{style}"
            f"</style></head><body><h2>longreach evaluation</h2>{''.join(body)}</body></html>\n")
