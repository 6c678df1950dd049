"""The tune command: the fastest prefill spec and the smallest-cache press that keep dense's accuracy, judged on
held-back prompts (the work is in :mod:`longreach.eval.tune`)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import CHAT_HELP, CHUNK_HELP, KERNEL_HELP, MODEL_HELP, console, user_errors


def tune(
    model: str = typer.Option(..., help=MODEL_HELP),
    length: str = typer.Option(..., help="prompt length in tokens, e.g. 4k"),
    out: Path = typer.Option(..., help="JSON file to write; its rows are kept in a folder of the same name "
                             "(re-run to resume)"),
    tasks: str = typer.Option("passkey,niah", help="accuracy tasks, e.g. passkey,niah:variant=multikey"),
    max_drop: float = typer.Option(2.0, help="points: the observed difference from the baseline may be at most this "
                                   "far below it"),
    min_lower: float = typer.Option(-10.0, help="points: on the reporting prompts the paired 95% interval's lower "
                                    "end must be above this (n ≈ 50 cannot show more than about −7)"),
    min_speedup: float = typer.Option(1.0, help="a prefill spec must be faster than the baseline by more than this"),
    tune_slack: int = typer.Option(1, help="tuning prompts per task a candidate may lose net of those it wins and "
                                   "still reach the reporting prompts (one prompt is 100/n points, and a near-tie "
                                   "for dense can flip under a small change; docs/tuning.md)"),
    candidates: str = typer.Option(None, help="';'-separated select and press specs (default: a grid of methods "
                                   "× densities; see docs/tuning.md)"),
    positions: str = typer.Option(None, help="';'-separated position specs, tried against dense (default past the "
                                  "trained length: selfextend, string, gali, yarn, dynamic, linear; inside it: "
                                  "none, and one given is used only if more accurate than dense)"),
    screen_prompts: int = typer.Option(4, help="tuning prompts (in all, spread over the tasks) the screen runs on"),
    tune_samples: int = typer.Option(20, help="tuning prompts per task"),
    report_samples: int = typer.Option(50, help="reporting prompts per task"),
    tune_seed: int = typer.Option(100, help="first seed of the tuning prompts"),
    report_seed: int = typer.Option(1000, help="first seed of the reporting prompts (the ranges must not overlap)"),
    tune_corpus: str = typer.Option("canterbury", help="prose of the tuning prompts"),
    report_corpus: str = typer.Option("auto", help="prose of the reporting prompts; auto: austen or bible where "
                                      "they load, else the tuning corpus (recorded)"),
    finalists: int = typer.Option(2, help="at most this many of the best candidates per kind tried on the reporting "
                                  "prompts, one at a time in tuning order until one passes"),
    survivors: int = typer.Option(6, help="at most this many candidates per kind pass the screen"),
    min_recall: float = typer.Option(0.7, help="screen: select methods keeping less dense attention mass are dropped"),
    max_error: float = typer.Option(0.35, help="screen: select methods with a larger output error are dropped"),
    max_shift: float = typer.Option(0.5, help="screen: presses moving the next-token distribution further (total "
                                    "variation) are dropped"),
    work: Path = typer.Option(None, help="folder for the rows of every stage (default: OUT without .json)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help=CHAT_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    chunk: int = typer.Option(None, help=CHUNK_HELP),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Find the fastest prefill spec and the press with the smallest cache whose accuracy stays within --max-drop
    points of dense, on held-back prompts (and the position method past the trained length).

    Example: longreach tune --model smollm2-135m --length 4k --out tuned/smollm2-4k.json
    """
    from longreach.eval.tune import TuneSettings
    from longreach.eval.tune import tune as run_tune
    from longreach.eval.tunerules import Rule, ScreenRule

    with user_errors():
        settings = TuneSettings(
            tasks=tasks, candidates=candidates, positions=positions,
            rule=Rule(max_drop=max_drop, min_lower=min_lower, min_speedup=min_speedup, tune_slack=tune_slack),
            screen=ScreenRule(min_recall=min_recall, max_error=max_error, max_shift=max_shift, survivors=survivors),
            screen_prompts=screen_prompts, tune_samples=tune_samples, report_samples=report_samples,
            tune_seed=tune_seed, report_seed=report_seed, tune_corpus=tune_corpus, report_corpus=report_corpus,
            finalists=finalists, chat=chat, kernel=kernel, chunk=chunk)
        result = run_tune(model, length, out, settings, work=work,
                          log=(lambda _: None) if quiet else (lambda line: console.print(line, highlight=False)))
    for line in result.summary():
        print(line)
    console.print(f"[dim]wrote {result.path}; rows in {result.data['folders']['tuning']} and "
                  f"{result.data['folders']['reporting']}[/dim]")
