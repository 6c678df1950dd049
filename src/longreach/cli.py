"""Command line: thin commands over the public API (nothing lives only here)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import LongreachError

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Training-free long-context inference for Hugging Face causal LMs.\n\n"
         "Examples:\n\n  longreach methods\n\n"
         "  longreach generate --model smollm2-135m --method quest:density=0.1 --input doc.txt\n\n"
         "  longreach demo\n\n  longreach bench attention --lengths 4k,8k,16k --density 0.1",
)
bench_app = typer.Typer(help="Benchmarks (ratios measured in one run).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
console = Console(width=max(Console().width, 140))  # tables stay readable when piped


def parse_length(text: str) -> int:
    text = text.strip().lower()
    try:
        return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a length; use e.g. 2048 or 4k") from None


def _fail(err: LongreachError) -> None:
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2)


@app.command()
def methods() -> None:
    """List methods with their parameters and defaults."""
    from .methods import method_class, method_names

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


@app.command()
def generate(
    model: str = typer.Option(..., help="bundled name (smollm2-135m, gemma3-270m), HF folder or .gguf file"),
    method: str = typer.Option("dense", help="method spec, e.g. quest:density=0.1"),
    input: Path = typer.Option(..., exists=True, dir_okay=False, help="text file with the prompt"),
    max_new_tokens: int = typer.Option(64, min=1),
    kernel: str = typer.Option("auto", help="auto, gather, flex or reference"),
    chat: bool = typer.Option(False, help="wrap the input in the model's chat template"),
) -> None:
    """Continue a long prompt with a method applied; print text, timings and density."""
    import torch

    from . import apply, load_model, parse_spec

    try:
        parse_spec(method)  # bad specs fail before the model loads
        text = input.read_text()
        if not text.strip():
            raise LongreachError(f"{input} is empty; give a text file with the prompt")
        lm, tok = load_model(model)
        if chat and tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=not chat)
        with apply(lm, method, kernel=kernel) as handle, torch.no_grad():
            start = time.perf_counter()
            out = lm(**ids, use_cache=True, logits_to_keep=1)
            prefill = time.perf_counter() - start
            token = out.logits[:, -1:].argmax(-1)
            past, mask, new = out.past_key_values, ids["attention_mask"], [token]
            start = time.perf_counter()
            for _ in range(max_new_tokens - 1):
                if tok.eos_token_id is not None and int(token) == tok.eos_token_id:
                    break
                mask = torch.cat([mask, mask.new_ones(1, 1)], dim=-1)
                step = lm(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True)
                past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
                new.append(token)
            decode = time.perf_counter() - start
    except LongreachError as err:
        _fail(err)
    console.print(tok.decode(torch.cat(new, dim=-1)[0], skip_special_tokens=True), markup=False)
    n_in = ids["input_ids"].shape[1]
    console.print(
        f"\n[dim]{n_in} prompt tokens, prefill {prefill:.2f}s ({n_in / prefill:.0f} tok/s), "
        f"decode {len(new) - 1} tokens in {decode:.2f}s, density prefill {handle.density('prefill'):.3f}"
        + (f" decode {handle.density('decode'):.3f}" if handle.density("decode") is not None else "") + "[/dim]"
    )


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m"),
    lengths: str = typer.Option("2k,4k", help="comma-separated prompt lengths"),
    methods: str = typer.Option("dense;quest:density=0.25;streaming:density=0.25",
                                help="';'-separated method specs (the first is the baseline)"),
    depths: str = typer.Option("0.2,0.8", help="needle depths"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Passkey retrieval at a few lengths and depths: dense vs. sparse methods, accuracy and speed."""
    from rich.progress import Progress

    from . import apply, load_model, parse_spec
    from .eval import make_passkey, run_passkey

    specs = [s.strip() for s in methods.split(";") if s.strip()]
    try:
        for s in specs:
            parse_spec(s)
        lens = [parse_length(x) for x in lengths.split(",")]
        dps = [float(x) for x in depths.split(",")]
        if not quiet:
            console.print(f"loading {model} (the first run converts the GGUF once, ~30 s)")
        lm, tok = load_model(model)
    except LongreachError as err:
        _fail(err)
    samples = [(n, make_passkey(tok, n, d, seed=i)) for n in lens for i, d in enumerate(dps)]
    results: dict[tuple[str, int], list[dict]] = {}
    with Progress(disable=quiet, console=console) as progress:
        task = progress.add_task("passkey", total=len(specs) * len(samples))
        for spec in specs:
            with apply(lm, spec) as handle:
                for length, sample in samples:
                    handle.reset_stats()
                    row = run_passkey(lm, tok, sample)
                    row["density"] = handle.density("prefill")
                    results.setdefault((spec, length), []).append(row)
                    progress.advance(task)
    table = Table(title=f"passkey retrieval on {model} ({len(dps)} depths per length)")
    for col in ("method", "length", "accuracy", "density", "prefill s", "prefill speed vs dense"):
        table.add_column(col)
    for (spec, length), rows in results.items():
        base = results[(specs[0], length)]
        t = sum(r["prefill_s"] for r in rows)
        t0 = sum(r["prefill_s"] for r in base)
        acc = sum(r["score"] for r in rows) / len(rows)
        dens = sum(r["density"] for r in rows) / len(rows)
        table.add_row(spec, str(length), f"{acc:.0%}", f"{dens:.3f}", f"{t / len(rows):.2f}", f"{t0 / t:.2f}x")
    console.print(table)


@bench_app.command("attention")
def bench_attention(
    lengths: str = typer.Option("4k,8k,16k"),
    density: float = typer.Option(0.1, min=0.001, max=1.0),
    methods: str = typer.Option("", help="';'-separated specs (default: quest, moba, streaming at --density)"),
    kernel: str = typer.Option("gather"),
    heads: str = typer.Option("9,3,64", help="query heads, kv heads, head dim (SmolLM2: 9,3,64)"),
    repeat: int = typer.Option(2, min=1),
    json_out: Path = typer.Option(None, "--json", help="also write the rows as JSON"),
) -> None:
    """Attention operator: selection + kernel vs dense causal SDPA, one run, ratios."""
    from .bench import attention

    specs = [s for s in methods.split(";") if s] or [
        f"quest:density={density}", f"moba:density={density}", f"streaming:density={density}"]
    hq, hkv, dim = (int(x) for x in heads.split(","))
    try:
        rows = attention.run([parse_length(x) for x in lengths.split(",")], specs, kernel, hq, hkv, dim, repeat)
    except LongreachError as err:
        _fail(err)
    table = Table(title=f"attention operator, {hq} q / {hkv} kv heads, d={dim} — {attention.hardware()}")
    for col in ("T", "method", "density", "dense SDPA s", "select s", "attend s", "speedup vs dense",
                "select share"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.length), r.spec, f"{r.density:.3f}", f"{r.dense_s:.3f}", f"{r.select_s:.3f}",
                      f"{r.attend_s:.3f}", f"{r.speedup:.2f}x", f"{r.select_s / (r.select_s + r.attend_s):.0%}")
    console.print(table)
    if json_out:
        json_out.write_text(json.dumps([{**r.__dict__, "speedup": r.speedup, "hardware": attention.hardware()}
                                        for r in rows], indent=1))


if __name__ == "__main__":
    app()
