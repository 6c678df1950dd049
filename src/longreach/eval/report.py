"""Turn ``results.jsonl`` into what a user decides with: a Markdown table and an offline HTML report.

Per task, method and length: the score (mean with a 95% confidence interval — Wilson for
exact-match accuracy, Student t for recall and perplexity), attention density actually used,
prefill time and its ratio to ``dense`` measured in the same sweep, decode time per token,
KV-cache size and peak RSS. ``report.html`` embeds PNG plots (matplotlib) so it opens offline.
"""

from __future__ import annotations

import html
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import LongreachError
from ..provenance import describe, machine_key
from .results import BadLine, read_rows

BASELINE = "dense"
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13,
       20: 2.09, 30: 2.04}


def t_quantile(df: int) -> float:
    """Two-sided 95% Student t quantile (table lookup, normal beyond 30 degrees of freedom)."""
    if df <= 0:
        return math.inf
    for k in sorted(T95):
        if df <= k:
            return T95[k]
    return 1.96


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sensible at 0/n and n/n, unlike mean +- 1.96 sd)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_ci(values: list[float], binary: bool) -> tuple[float, float, float]:
    """(mean, low, high) at 95%."""
    n = len(values)
    mean = sum(values) / n
    if binary:
        return (mean, *wilson(sum(values), n))
    if n < 2:
        return (mean, -math.inf, math.inf)
    half = t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return (mean, mean - half, mean + half)


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


def ordered_methods(rows: list[dict]) -> list[str]:
    """The baseline first, then methods in the order they first appear."""
    seen = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(seen, key=lambda m: (m != BASELINE, seen.index(m)))


def fmt_score(cell: ScoreCell) -> str:
    mean, lo, hi = cell.score
    if cell.metric == "ppl":
        return f"{mean:.2f} ± {(hi - lo) / 2:.2f}" if math.isfinite(hi) else f"{mean:.2f}"
    if math.isfinite(hi):
        return f"{mean:.0%} ({lo:.0%}–{hi:.0%})" if cell.metric == "accuracy" else f"{mean:.0%} ± {(hi - lo) / 2:.0%}"
    return f"{mean:.0%}"


MIXED = "†"  # marks a ratio whose rows came from more than one machine, commit or thread count


def speed_ratio(cells: dict, cell: ScoreCell) -> str:
    """Dense prefill time over this cell's, flagged when the two sides' rows were not all measured alike."""
    base = cells.get((cell.task, BASELINE, cell.length))
    t, t0 = cell.avg("prefill_s"), base.avg("prefill_s") if base else None
    if not (t and t0):
        return "–"
    mixed = len({machine_key(r) for r in cell.rows + base.rows}) > 1
    return f"{t0 / t:.2f}x{MIXED if mixed else ''}"


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


def markdown(rows: list[dict]) -> str:
    cells = group(rows)
    methods = ordered_methods(rows)
    models = sorted({r["model"] for r in rows})
    out = [f"Model: {', '.join(models)} · {len(rows)} samples · score = mean (95% CI) · "
           "speed = dense prefill time / method prefill time, same sweep", "", "Measured on:",
           *provenance_lines(rows)]
    if len({machine_key(r) for r in rows}) > 1:
        out += ["", f"{MIXED} this speed ratio divides times measured on different machines, commits or thread "
                "counts: compare it with care"]
    for task in dict.fromkeys(r["task"] for r in rows):
        metric = next(c.metric for c in cells.values() if c.task == task)
        what = {"accuracy": "accuracy", "recall": "recall", "ppl": "perplexity (lower is better)"}[metric]
        out += ["", f"### {task} — {what}", "",
                "| method | length | n | score | density | prefill s | speed vs dense | decode ms/tok | KV MiB "
                "| peak RSS MiB |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for method in methods:
            for length in sorted({c.length for c in cells.values() if c.task == task}):
                cell = cells.get((task, method, length))
                if cell is None:
                    continue
                dens = cell.avg("density")
                dec_s, dec_n = sum(cell.values("decode_s")), sum(cell.values("decode_tokens"))
                kv = cell.avg("kv_bytes")
                out.append(
                    f"| {method} | {length} | {len(cell.rows)} | {fmt_score(cell)} | "
                    f"{'–' if dens is None else f'{dens:.3f}'} | {cell.avg('prefill_s'):.2f} | "
                    f"{speed_ratio(cells, cell)} | {f'{1000 * dec_s / dec_n:.0f}' if dec_n else '–'} | "
                    f"{'–' if kv is None else f'{kv / 2**20:.1f}'} | {cell.avg('peak_rss_mb') or 0:.0f} |")
    return "\n".join(out)


@dataclass(frozen=True)
class Report:
    markdown: str
    html_path: Path
    bad_lines: list[BadLine]


def build_report(out: Path) -> Report:
    rows, bad = read_rows(out / "results.jsonl")
    if not rows:
        raise LongreachError(f"{out / 'results.jsonl'} holds no usable rows"
                             + (f" ({len(bad)} unreadable lines)" if bad else ""))
    text = markdown(rows)
    from .plots import figures

    path = out / "report.html"
    figs = figures(rows, ordered_methods(rows))
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
