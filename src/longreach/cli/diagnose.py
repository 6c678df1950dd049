"""The diagnose command: how far each method's selection is from dense attention, layer by layer, and the
dense model's own attention rollout (``--rollout``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from longreach import LongreachError
from longreach.provenance import provenance

from .common import (
    CHAT_HELP,
    KERNEL_HELP,
    MODEL_HELP,
    chat_prompt,
    checked_specs,
    console,
    layer_indices,
    read_prompt,
    token_lengths,
    user_errors,
)


def check_prompt_options(input: Path | None, task: str | None, length: str) -> tuple[str | None, object, int]:
    """Validate --input / --task before any model loads: (prompt text or None, task or None, task length)."""
    from longreach.eval import parse_task

    if (input is None) == (task is None):
        raise LongreachError("give exactly one of --input FILE or --task TASK (e.g. --task passkey --length 8k)")
    if input is not None:
        return read_prompt(input), None, 0
    return None, parse_task(task), token_lengths(length)[0]


def prompt_ids(tok, text: str | None, task_obj, n_tokens: int, depth: float, chat: bool, seed: int = 0,
               prose=None):
    """The prompt's token ids (1, T): the file's text in the chat template, or the task's sample, as ``longreach
    eval`` builds it for that seed, depth and corpus (default Canterbury), so a prompt an eval row lost can be
    diagnosed."""
    from longreach.eval import Corpus

    if text is None:
        prose = prose if prose is not None else Corpus.load("canterbury")
        sample = task_obj.build(tok, prose, n_tokens, depth, seed, chat)
        text, templated = sample.prompt, sample.chat
    else:
        text, templated = chat_prompt(tok, text, chat)
    return tok(text, return_tensors="pt", add_special_tokens=not templated)["input_ids"]


def diagnose(
    model: str = typer.Option(..., help=MODEL_HELP),
    method: list[str] = typer.Option(None, help="method spec; repeat --method to compare several in one run"),
    input: Path = typer.Option(None, exists=True, dir_okay=False, help="text file with the prompt"),
    task: str = typer.Option(None, help="instead of --input: build the prompt from an eval task, e.g. passkey"),
    length: str = typer.Option("2k", help="prompt length in tokens for --task (e.g. 8k)"),
    depth: float = typer.Option(0.5, help="needle depth for --task"),
    seed: int = typer.Option(0, help="--task: the prompt's seed (an eval row's `seed`)"),
    corpus: str = typer.Option("canterbury", help="--task: the prose corpus (an eval row's `corpus`)"),
    inputs: str = typer.Option("dense", help="dense: replay every method on one dense forward's queries and keys; "
                               "method: each method runs its own forward and is replayed on what its earlier "
                               "layers produced (one forward per method)"),
    layers: str = typer.Option(None, help="layers to replay, e.g. 0,10,20 (default: all)"),
    queries: int = typer.Option(1024, min=1, help="queries (evenly spaced) that estimate mass recall"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help=CHAT_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    out: Path = typer.Option(Path("diagnose"), help="folder for diagnose.json and recall.png (and rollout.*)"),
    rollout: bool = typer.Option(False, "--rollout", help="attention rollout of the dense model (Abnar & Zuidema "
                                 "2020): rollout.json, rollout.png, rollout_last.png; --method becomes optional"),
    rollout_size: int = typer.Option(256, min=1, help="--rollout: pool the matrix to at most this many rows/columns"),
    rollout_max_tokens: int = typer.Option(16384, min=2, help="--rollout: refuse longer prompts (each layer costs "
                                           "one T² attention pass; q/k of every layer are kept)"),
) -> None:
    """Oracle gap per layer: dense mass recall, output error, density, selection vs attention time.

    Example: longreach diagnose --model smollm2-135m --method hip:density=0.1 --method quest:density=0.1
    --task passkey --length 8k

    A prompt an eval row lost, in the method's own run: longreach diagnose --model smollm2-135m --task passkey
    --length 4k --depth 0.25 --seed 1001 --corpus austen --no-chat --method quest:density=0.1 --inputs method

    Attention rollout only: longreach diagnose --model smollm2-135m --rollout --task passkey --length 1k
    """
    from longreach import load_model
    from longreach.diagnostics import INPUTS
    from longreach.eval import Corpus

    with user_errors():
        specs = checked_specs(method or [])
        if not specs and not rollout:
            raise LongreachError("nothing to do: give --method SPEC (oracle gap) and/or --rollout")
        if inputs not in INPUTS:
            raise LongreachError(f"--inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
        text, task_obj, n_tokens = check_prompt_options(input, task, length)
        prose = Corpus.load(corpus) if task_obj is not None else None  # an unknown corpus fails before the model
        wanted = layer_indices(layers)
        lm, tok = load_model(model)
        ids = prompt_ids(tok, text, task_obj, n_tokens, depth, chat, seed, prose)
        n_layers = getattr(lm.config, "num_hidden_layers", None)
        if wanted and n_layers is not None and max(wanted) >= n_layers:
            raise LongreachError(f"--layers: this model has layers 0..{n_layers - 1}, got {max(wanted)}")
        if rollout:
            write_rollout(lm, tok, ids, model, out, rollout_size, rollout_max_tokens, kernel)
    if specs:
        oracle_gap(lm, ids, specs, model, out, wanted, queries, kernel, inputs)


def write_rollout(lm, tok, ids, model: str, out: Path, size: int, max_tokens: int, kernel: str) -> None:
    """Rollout of the prompt: the last token's most-read positions printed, numbers and figures written."""
    from longreach.analysis import rollout
    from longreach.analysis.plots import rollout_heatmap, rollout_last_plot

    n_layers = getattr(lm.config, "num_hidden_layers", None)
    with Progress(TextColumn("rollout layers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as bar:
        task_id = bar.add_task("rollout", total=n_layers)
        r = rollout(lm, ids, size=size, max_tokens=max_tokens, kernel=kernel,
                    progress=lambda _layer: bar.advance(task_id))
    pieces = tok.convert_ids_to_tokens(ids[0].tolist())
    top = r.last.topk(min(8, r.tokens))
    table = Table(title=f"attention rollout of the last token, {r.tokens} tokens: the positions it reads most")
    for col in ("position", "token", "rollout"):
        table.add_column(col)
    for value, pos in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        table.add_row(str(pos), repr(pieces[pos]), f"{value:.4f}")
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    data = {"model": model, "provenance": provenance(), "tokens_text": pieces,
            "last_top": [[p, v] for p, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)],
            **r.to_dict()}
    (out / "rollout.json").write_text(json.dumps(data))
    rollout_heatmap(r, out / "rollout.png", f"{model}: ")
    rollout_last_plot(r, out / "rollout_last.png", f"{model}: ")
    cells = f"{r.matrix.shape[0]}x{r.matrix.shape[0]} cells of {r.block} token(s)"
    console.print(f"wrote {out / 'rollout.json'} ({cells}), {out / 'rollout.png'} and {out / 'rollout_last.png'}")


def oracle_gap(lm, ids, specs: list[str], model: str, out: Path, wanted: list[int] | None, queries: int,
               kernel: str, inputs: str = "dense") -> None:
    """Replay each method on every layer; print the tables, write diagnose.json and recall.png."""
    from longreach.diagnostics import diagnose as run_diagnosis
    from longreach.diagnostics import recall_heatmaps

    with user_errors():
        n_layers = getattr(lm.config, "num_hidden_layers", None)
        forwards = 1 if inputs == "dense" else len(specs)
        console.print(f"{ids.shape[1]} tokens; replaying {len(specs)} method(s) on each layer of "
                      + ("one dense forward" if inputs == "dense" else "each method's own forward"))
        total = (len(wanted) if wanted else n_layers) * forwards
        with Progress(TextColumn("layers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console) as bar:
            task_id = bar.add_task("layers", total=total)
            diag = run_diagnosis(lm, ids, specs, kernel=kernel, layers=wanted, max_queries=queries,
                                 progress=lambda _layer: bar.advance(task_id), inputs=inputs)
    table = Table(title=f"oracle gap per layer, {diag.tokens} tokens, recall over {min(queries, diag.tokens)} "
                        "queries (times: this machine, one run)")
    for col in ("layer", "method", "recall mean", "recall min head", "last query min head", "output error",
                "density", "select ms", "attend ms", "dense ms"):
        table.add_column(col)
    for r in diag.layers:
        table.add_row(str(r.layer), r.method, f"{sum(r.recall) / len(r.recall):.3f}", f"{min(r.recall):.3f}",
                      f"{min(r.last_recall):.3f}",
                      f"{sum(r.output_error) / len(r.output_error):.3f}", f"{r.density:.3f}",
                      f"{r.select_s * 1e3:.1f}", f"{r.attend_s * 1e3:.1f}", f"{r.dense_s * 1e3:.1f}")
    console.print(table)
    summary = Table(title="all layers")
    for col in ("method", "mass recall", "worst head", "last query", "last query worst head", "output error",
                "density", "select / attend", "sparse vs dense attention"):
        summary.add_column(col)
    for m in diag.methods:
        s = diag.summary(m)
        summary.add_row(m, f"{s['recall']:.3f}", f"{s['min_recall']:.3f}", f"{s['last_recall']:.3f}",
                        f"{s['min_last_recall']:.3f}", f"{s['output_error']:.3f}",
                        f"{s['density']:.3f}", f"{s['select_s'] / max(s['attend_s'], 1e-9):.2f}",
                        f"{s['dense_s'] / max(s['select_s'] + s['attend_s'], 1e-9):.2f}x")
    console.print(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps({"tokens": diag.tokens, "model": model, "provenance": provenance(),
                                                   "inputs": inputs, "methods": diag.methods,
                                                   "summary": {m: diag.summary(m) for m in diag.methods},
                                                   "layers": [r.__dict__ for r in diag.layers]}, indent=1))
    recall_heatmaps(diag, out / "recall.png")
    console.print(f"wrote {out / 'diagnose.json'} and {out / 'recall.png'}")
