"""Commands that run one model on one prompt: list the methods, generate with one applied, plan its memory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import (
    CHUNK_HELP,
    KERNEL_HELP,
    MODEL_HELP,
    chat_prompt,
    console,
    fail,
    read_prompt,
    token_lengths,
    user_errors,
)


def methods() -> None:
    """List methods with their parameters and defaults."""
    from longreach import method_class, method_names

    table = Table(title="longreach methods")
    for col in ("name", "kind", "what it does", "parameters (default)"):
        table.add_column(col)
    for name in method_names():
        cls = method_class(name)
        params = ", ".join(f"{n}={d}" for n, _, d, _ in cls.params()) or "-"
        table.add_row(name, cls.kind, cls.summary, params)
    console.print(table)
    console.print("Compose with '+', e.g. [bold]quest:density=0.1,block=64[/bold]. Sinks and the local window "
                  "count toward budget=/density=.")


def generate(
    model: str = typer.Option(..., help=MODEL_HELP),
    method: str = typer.Option("dense", help="method spec, e.g. quest:density=0.1"),
    input: Path = typer.Option(..., exists=True, dir_okay=False, help="text file with the prompt"),
    max_new_tokens: int = typer.Option(64, min=1),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    chat: bool = typer.Option(False, help="wrap the input in the model's chat template"),
    chunk: int = typer.Option(None, min=1, help=CHUNK_HELP),
) -> None:
    """Continue a long prompt with a method applied; print text, timings and density."""
    from longreach import apply, cache_bytes, load_model, parse_spec
    from longreach import generate as timed_generate  # `generate` is this command
    from longreach.generation import eos_ids

    with user_errors():
        spec = parse_spec(method)  # bad specs fail before the model loads
        text = read_prompt(input)
        lm, tok = load_model(model)
        text, templated = chat_prompt(tok, text, chat)
        ids = tok(text, return_tensors="pt", add_special_tokens=not templated)
        trained = getattr(getattr(lm.config, "text_config", None) or lm.config, "max_position_embeddings", None)
        if trained and ids["input_ids"].shape[1] > trained and not spec.of_kind("position"):
            console.print(f"[yellow]warning:[/yellow] {ids['input_ids'].shape[1]} prompt tokens is past the "
                          f"{trained} this model was trained on; add a position method (e.g. selfextend+...)")
        with apply(lm, method, kernel=kernel) as handle:
            run = timed_generate(lm, ids, max_new_tokens, eos_ids(lm, tok), chunk=chunk)
    console.print(tok.decode(run.tokens, skip_special_tokens=True), markup=False)
    n_in, prefill = ids["input_ids"].shape[1], run.prefill_s
    console.print(
        f"\n[dim]{n_in} prompt tokens, prefill {prefill:.2f}s ({n_in / prefill:.0f} tok/s), "
        f"decode {len(run.tokens) - 1} tokens in {run.decode_s:.2f}s, density prefill {handle.density('prefill'):.3f}"
        + (f" decode {handle.density('decode'):.3f}" if handle.density("decode") is not None else "")
        + (f", KV cache {cache_bytes(run.cache) / 2**20:.1f} MiB" if cache_bytes(run.cache) is not None else "")
        + "[/dim]"
    )


def plan(
    model: str = typer.Option(..., help=MODEL_HELP),
    length: str = typer.Option(..., help="prompt length in tokens, e.g. 32768 or 32k"),
    method: str = typer.Option("dense", help="method spec, e.g. selfextend or yarn:factor=4+snapkv:density=0.25"),
    chunk: int = typer.Option(None, min=1, help="prefill chunk in tokens (as given to generate/eval --chunk)"),
    memory_gib: float = typer.Option(None, help="memory to plan for (default: MemAvailable now)"),
) -> None:
    """Expected memory of a long prompt (weights, KV cache, peak activations); exit 2 if it would not fit."""
    from longreach import load_model, parse_spec
    from longreach.plan import GiB, plan_memory, resident_bytes

    with user_errors():
        spec = parse_spec(method)
        tokens = token_lengths(length)[0]
        lm, _ = load_model(model)
        budget = int(memory_gib * GiB) if memory_gib is not None else None
        result = plan_memory(lm, spec, tokens, chunk, budget, runtime=resident_bytes())
    table = Table(title=f"longreach plan: {model} · {spec} · {tokens} tokens")
    table.add_column("")
    table.add_column("bytes", justify="right")
    for name, value in result.rows():
        table.add_row(name, value)
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if not result.fits:
        fail(f"does not fit: expected peak {result.total / GiB:.2f} GiB > {result.available / GiB:.2f} GiB available; "
             "try --chunk 2048 (smaller activations), a press (smaller cache) or a shorter input")
    console.print("[green]fits[/green]")
