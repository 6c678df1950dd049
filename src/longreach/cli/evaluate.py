"""Accuracy sweeps: eval (resumable), report, the demo built on eval, and fetching the prose corpus."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from longreach import LongreachError
from longreach.eval.showcase import DEMO_METHODS, DEMO_NOTE

from .common import CHAT_HELP, CHUNK_HELP, KERNEL_HELP, MODEL_HELP, console, fail, user_errors


def eval_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    tasks: str = typer.Option("passkey,niah", help="task specs, e.g. passkey,niah:variant=multikey,kvret,ppl"),
    lengths: str = typer.Option("2k,4k", help="prompt lengths in tokens, e.g. 2k,4k,8k"),
    methods: str = typer.Option("dense,quest:density=0.1",
                                help="method specs; speed is reported against dense when it is in the sweep"),
    samples: int = typer.Option(5, help="samples per task x length (depths cycle over --depths)"),
    first_seed: int = typer.Option(0, help="seeds run from here: keep tuning and reporting prompts disjoint"),
    depths: str = typer.Option(None, help="needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)"),
    out: Path = typer.Option(..., help="folder for results.jsonl and the report (re-run to resume)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help=CHAT_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    corpus: str = typer.Option("canterbury", help="prose source: canterbury, austen, bible (Debian) or synthetic"),
    executor: str = typer.Option("local", help="local (in-process) or ray (cells spread over a Ray cluster)"),
    workers: int = typer.Option(2, help="Ray actors (each loads the model once)"),
    report: bool = typer.Option(True, "--report/--no-report", help="write the report at the end"),
    quiet: bool = typer.Option(False, "--quiet"),
    chunk: int = typer.Option(None, help=CHUNK_HELP),
    sort_documents: int = typer.Option(None, "--sort-documents", metavar="ROUNDS",
                                       help="attention sorting: before answering, reorder each prompt's documents "
                                       "by the attention they get (dense, ROUNDS prefills), most attended last; "
                                       "tasks with documents only (kvret:docs=1). Rows are labelled "
                                       "'METHOD · sort-documents=ROUNDS'"),
) -> None:
    """Sweep methods x tasks x lengths; one JSON line per sample in OUT/results.jsonl (resumable).

    Attention sorting vs dense, by gold position (docs/attention-sorting.md):
    longreach eval --model smollm2-135m --tasks kvret:docs=1 --methods dense --out runs/sort;
    then the same with --sort-documents 2, and longreach report runs/sort
    """
    _run_eval(model, tasks, lengths, methods, samples, depths, out, chat, kernel, corpus, executor, workers,
              report, quiet, chunk, first_seed, sort_documents)


def _run_eval(model: str, tasks: str, lengths: str, methods: str, samples: int, depths: str | None, out: Path,
              chat: bool = True, kernel: str = "auto", corpus: str = "canterbury", executor: str = "local",
              workers: int = 2, report: bool = True, quiet: bool = False, chunk: int | None = None,
              first_seed: int = 0, sort_rounds: int | None = None) -> None:
    """The sweep behind eval and demo: parse it, skip what OUT already holds, run the rest, then report."""
    from longreach.eval import Corpus, make_sweep, pending, run_local
    from longreach.eval.runner import preflight, record_sweep
    from longreach.models import load_tokenizer

    with user_errors():
        sweep = make_sweep(model, tasks, methods, lengths, depths=depths, samples=samples, chat=chat,
                         kernel=kernel, corpus=corpus, chunk=chunk, first_seed=first_seed, sort_rounds=sort_rounds)
        if executor not in ("local", "ray"):
            raise LongreachError(f"unknown executor '{executor}': use local or ray")
        if executor == "ray":
            from longreach.eval.distributed import check_ray

            check_ray()
        todo, bad, finished = pending(sweep, out)
    for line in bad:
        console.print(f"[yellow]warning:[/yellow] {out / 'results.jsonl'} {line} — its sample will be run again")
    total = sum(len(v) for v in todo.values())
    if not quiet:
        console.print(f"{len(sweep.cells())} cells, {finished} samples done, {total} to run → {out / 'results.jsonl'}")
    if total:
        with user_errors():
            prose = Corpus.load(sweep.corpus)
            preflight(sweep, todo, load_tokenizer(model), prose)
            record_sweep(sweep, out, sys.argv)
            if executor == "ray":
                from longreach.eval.distributed import run_ray

                run_ray(sweep, out, todo, workers=workers, quiet=quiet, console=console)
            else:
                from longreach import load_model

                if not quiet:
                    console.print(f"loading {model}")
                lm, tok = load_model(model)
                with _SweepProgress(todo, quiet) as progress:
                    run_local(sweep, out, todo, lm, tok, prose, progress=progress.advance)
    if report:
        _report(out, quiet)


class _SweepProgress:
    """Overall bar (with ETA) plus one bar for the cell being run."""

    def __init__(self, todo: dict, quiet: bool):
        self.todo, self.current = todo, None
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=console, disable=quiet)
        self.total = self.progress.add_task("all cells", total=sum(len(v) for v in todo.values()))
        self.cell_bar = None

    def advance(self, cell) -> None:
        if cell != self.current:
            if self.cell_bar is not None:
                self.progress.remove_task(self.cell_bar)
            self.current = cell
            self.cell_bar = self.progress.add_task(str(cell), total=len(self.todo[cell]))
        self.progress.advance(self.cell_bar)
        self.progress.advance(self.total)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)


def _report(out: Path, quiet: bool, margin: float = 5.0, threshold: float = 0.85, baseline: str | None = None
            ) -> None:
    """Print the Markdown table of OUT (to stdout, pipeable) and name the HTML report next to it."""
    from longreach.eval import build_report

    with user_errors():
        result = build_report(out, margin=margin, threshold=threshold, baseline=baseline)
    for line in result.bad_lines:
        console.print(f"[yellow]warning:[/yellow] {out / 'results.jsonl'} {line}")
    print(result.markdown)
    if not quiet:
        console.print(f"[dim]report: {result.html_path}[/dim]")


def report(
    out: Path = typer.Argument(..., help="an eval output folder (holding results.jsonl)"),
    margin: float = typer.Option(5.0, help="claim 'within X points of dense' only where the paired interval's "
                                 "lower end is above -X"),
    threshold: float = typer.Option(0.85, help="effective context length: the longest length scoring at least "
                                    "this (and every shorter one too)"),
    baseline: str = typer.Option(None, help="the method every other is paired with, as written in the rows "
                                 "(default: dense; past a model's trained length, where dense fails, e.g. "
                                 "'selfextend')"),
) -> None:
    """Markdown tables of an eval folder (mean ± 95% CI, density, speed vs the baseline; the paired difference
    from the baseline, dense unless told, with its interval and verdict, overall and at each depth; effective
    context length) and OUT/report.html with plots."""
    if not (out / "results.jsonl").is_file():
        fail(f"{out} has no results.jsonl; run 'longreach eval --out {out}' first")
    _report(out, quiet=False, margin=margin, threshold=threshold, baseline=baseline)


def demo(
    model: str = typer.Option("smollm2-135m"),
    lengths: str = typer.Option("8k", help="prompt lengths (8k: where the fast prefill method wins on CPU)"),
    methods: str = typer.Option(";".join(DEMO_METHODS),
                                help="';'-separated specs (include dense: speed and cache are relative to it)"),
    samples: int = typer.Option(1, help="samples per task x length"),
    out: Path = typer.Option(None, help="results folder (default: a fresh temporary folder)"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Dense vs a fast sparse prefill vs the tuned KV press on passkey + needle-in-prose: accuracy, speed, cache
    memory (~4 minutes on 2 cores)."""
    from longreach.eval.results import read_rows
    from longreach.eval.showcase import summarise

    folder = out or Path(tempfile.mkdtemp(prefix="longreach-demo-"))
    _run_eval(model, "passkey,niah", lengths, methods, samples, "0.5", folder, quiet=quiet, report=False)
    rows, _ = read_rows(folder / "results.jsonl")
    table = Table(title=f"{model}, passkey + needle in prose at {lengths} tokens — this machine, one run")
    for col in ("method", "what it does", "answered", "prefill s", "vs dense", "decode tok/s", "KV cache MiB",
                "smaller"):
        table.add_column(col)
    for line in summarise(rows):
        table.add_row(line.method, line.role, f"{line.correct}/{line.n}", f"{line.prefill_s:.1f}",
                      f"{line.speed:.2f}x" if line.speed else "-",
                      f"{line.decode_tok_s:.1f}" if line.decode_tok_s else "-",
                      f"{line.kv_mib:.0f}" if line.kv_mib else "-",
                      f"{line.cache_ratio:.2f}x" if line.cache_ratio else "-")
    console.print(table)
    console.print(f"A handful of prompts shows what each method does, not that it equals dense: the intervals are in "
                  f"docs/. Rows: {folder / 'results.jsonl'}; full table: longreach report {folder}")
    if methods == ";".join(DEMO_METHODS):
        console.print(DEMO_NOTE)


def corpus(action: str = typer.Argument("fetch", help="fetch: download and normalise the prose corpus now")) -> None:
    """Fetch the real-prose corpus (Canterbury texts from brotli 1.1.0's sdist) into the cache, once."""
    from longreach.eval import Corpus

    if action != "fetch":
        fail(f"unknown action '{action}': use 'longreach corpus fetch'")
    with user_errors():
        prose = Corpus.load("canterbury")
    for name, text in prose.documents.items():
        console.print(f"{name}: {len(text):,} characters")
    console.print(f"[dim]licence: {prose.licence}[/dim]")
