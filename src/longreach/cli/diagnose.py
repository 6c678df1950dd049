"""The diagnose command: how far each method's selection is from dense attention, layer by layer."""

from __future__ import annotations

import json
from pathlib import Path

import typer
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


def diagnose(
    model: str = typer.Option(..., help=MODEL_HELP),
    method: list[str] = typer.Option(..., help="method spec; repeat --method to compare several in one run"),
    input: Path = typer.Option(None, exists=True, dir_okay=False, help="text file with the prompt"),
    task: str = typer.Option(None, help="instead of --input: build the prompt from an eval task, e.g. passkey"),
    length: str = typer.Option("2k", help="prompt length in tokens for --task (e.g. 8k)"),
    depth: float = typer.Option(0.5, help="needle depth for --task"),
    layers: str = typer.Option(None, help="layers to replay, e.g. 0,10,20 (default: all)"),
    queries: int = typer.Option(1024, min=1, help="queries (evenly spaced) that estimate mass recall"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help=CHAT_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    out: Path = typer.Option(Path("diagnose"), help="folder for diagnose.json and recall.png"),
) -> None:
    """Oracle gap per layer: dense mass recall, output error, density, selection vs attention time.

    Example: longreach diagnose --model smollm2-135m --method hip:density=0.1 --method quest:density=0.1
    --task passkey --length 8k
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from longreach import load_model
    from longreach.diagnostics import diagnose as run_diagnosis
    from longreach.diagnostics import recall_heatmaps
    from longreach.eval import Corpus, parse_task

    with user_errors():
        specs = checked_specs(method)
        if (input is None) == (task is None):
            raise LongreachError("give exactly one of --input FILE or --task TASK (e.g. --task passkey --length 8k)")
        wanted = layer_indices(layers)
        if input is not None:
            text = read_prompt(input)
        else:
            task_obj, n_tokens = parse_task(task), token_lengths(length)[0]
        lm, tok = load_model(model)
        if input is None:
            sample = task_obj.build(tok, Corpus.load("canterbury"), n_tokens, depth, 0, chat)
            text, templated = sample.prompt, sample.chat
        else:
            text, templated = chat_prompt(tok, text, chat)
        ids = tok(text, return_tensors="pt", add_special_tokens=not templated)["input_ids"]
        n_layers = getattr(lm.config, "num_hidden_layers", None)
        if wanted and n_layers is not None and max(wanted) >= n_layers:
            raise LongreachError(f"--layers: this model has layers 0..{n_layers - 1}, got {max(wanted)}")
        console.print(f"{ids.shape[1]} tokens; replaying {len(specs)} method(s) on each layer")
        total = len(wanted) if wanted else n_layers
        with Progress(TextColumn("layers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console) as bar:
            task_id = bar.add_task("layers", total=total)
            diag = run_diagnosis(lm, ids, specs, kernel=kernel, layers=wanted, max_queries=queries,
                                 progress=lambda _layer: bar.advance(task_id))
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
                                                   "methods": diag.methods,
                                                   "summary": {m: diag.summary(m) for m in diag.methods},
                                                   "layers": [r.__dict__ for r in diag.layers]}, indent=1))
    recall_heatmaps(diag, out / "recall.png")
    console.print(f"wrote {out / 'diagnose.json'} and {out / 'recall.png'}")
