"""Commands that run one model on one prompt: list the methods, generate with one applied, plan its memory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from longreach import Documents, LongreachError

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
    input: Path = typer.Option(None, exists=True, dir_okay=False, help="text file with the prompt (or --documents)"),
    max_new_tokens: int = typer.Option(64, min=1),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    chat: bool = typer.Option(False, help="wrap the input in the model's chat template"),
    chunk: int = typer.Option(None, min=1, help=CHUNK_HELP),
    documents: Path = typer.Option(None, exists=True, dir_okay=False,
                                   help='instead of --input, a prompt made of documents: a JSON file {"documents": '
                                   '["...", ...], "prefix": "...", "question": "...", "separator": "\\n\\n"} '
                                   "(prompt = prefix + separator.join(documents) + question)"),
    sort_documents: int = typer.Option(None, "--sort-documents", metavar="ROUNDS", min=0,
                                       help="attention sorting of --documents before answering: ROUNDS dense "
                                       "prefills, each reordering the documents by the attention they get, most "
                                       "attended last; then the answer runs under --method"),
) -> None:
    """Continue a long prompt with a method applied; print text, timings and density.

    With documents, sorted by attention first (docs/attention-sorting.md):
    longreach generate --model smollm2-135m --documents docs.json --sort-documents 2 --method snapkv:density=0.25
    """
    from longreach import apply, cache_bytes, load_model, parse_spec
    from longreach import generate as timed_generate  # `generate` is this command
    from longreach.generation import eos_ids
    from longreach.models import trained_length
    from longreach.plan import reach_note

    with user_errors():
        spec = parse_spec(method)  # bad specs fail before the model loads
        if (input is None) == (documents is None):
            raise LongreachError("give the prompt as --input FILE or as --documents FILE (one of them)")
        if sort_documents is not None and documents is None:
            raise LongreachError("--sort-documents reorders documents: give the prompt as --documents FILE")
        docs = read_documents(documents) if documents is not None else None
        text = read_prompt(input) if input is not None else docs.prompt
        lm, tok = load_model(model)
        text, templated = chat_prompt(tok, text, chat)
        if docs is not None and sort_documents is not None:
            text = sorted_prompt(lm, tok, templated_documents(docs, text), sort_documents, templated, chunk, kernel)
        ids = tok(text, return_tensors="pt", add_special_tokens=not templated)
        if (note := reach_note(ids["input_ids"].shape[1], trained_length(lm), spec)) is not None:
            console.print(f"[yellow]warning:[/yellow] {note}")
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


def read_documents(path: Path) -> Documents:
    """``--documents``: a JSON object with a list of document strings, optionally a prefix, question, separator."""
    import json

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LongreachError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    bad = LongreachError(f'{path} must hold a JSON object {{"documents": ["...", ...]}} with optional "prefix", '
                         '"question" and "separator" strings')
    if not isinstance(data, dict) or not isinstance(data.get("documents"), list):
        raise bad
    strings = [*data["documents"], *(v for k, v in data.items() if k != "documents")]
    if set(data) - {"documents", "prefix", "question", "separator"} or not all(isinstance(t, str) for t in strings):
        raise bad
    return Documents(tuple(data["documents"]), data.get("prefix", ""), data.get("question", ""),
                     data.get("separator", "\n\n"))


def templated_documents(docs: Documents, text: str) -> Documents:
    """``docs`` inside ``text`` (its prompt wrapped by a chat template): the template's head joins the prefix and
    its tail the question, so sorting moves the documents only."""
    at = text.find(docs.prompt)
    if at < 0:
        raise LongreachError("the chat template changed the documents' text; run without --chat")
    return Documents(docs.documents, text[:at] + docs.prefix, docs.question + text[at + len(docs.prompt):],
                     docs.separator)


def sorted_prompt(lm, tok, docs: Documents, rounds: int, templated: bool, chunk: int | None, kernel: str) -> str:
    """Attention sorting, and a line saying what it did and cost."""
    from longreach import sort_documents

    result = sort_documents(lm, tok, docs.documents, docs.prefix, docs.question, separator=docs.separator,
                            rounds=rounds, add_special_tokens=not templated, chunk=chunk, kernel=kernel)
    console.print(f"[dim]attention sorting: {len(docs.documents)} documents, {rounds} rounds "
                  f"({sum(result.tokens)} prompt tokens prefilled, {result.seconds:.2f}s); order now "
                  f"{list(result.order)} (original indices, first to last)[/dim]")
    return result.prompt


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
