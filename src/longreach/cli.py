"""Command line: thin commands over the public API (nothing lives only here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import LongreachError
from .eval.showcase import DEMO_METHODS
from .provenance import provenance

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Training-free long-context inference for Hugging Face causal LMs.\n\n"
         "Examples:\n\n  longreach methods\n\n"
         "  longreach generate --model smollm2-135m --method quest:density=0.1 --input doc.txt\n\n"
         "  longreach demo\n\n  longreach bench attention --lengths 4k,8k,16k --density 0.1",
)
bench_app = typer.Typer(help="Benchmarks (ratios measured in one run).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
heads_app = typer.Typer(help="Attention-head profiles (retrieval, sink, locality) for head-aware policies.",
                        no_args_is_help=True)
app.add_typer(heads_app, name="heads")
console = Console(width=max(Console().width, 140))  # tables stay readable when piped


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
    chunk: int = typer.Option(None, min=1, help="prefill this many tokens per forward (long inputs in less memory)"),
) -> None:
    """Continue a long prompt with a method applied; print text, timings and density."""
    from . import apply, cache_bytes, load_model, parse_spec
    from .generation import eos_ids, greedy

    try:
        parse_spec(method)  # bad specs fail before the model loads
        text = input.read_text()
        if not text.strip():
            raise LongreachError(f"{input} is empty; give a text file with the prompt")
        lm, tok = load_model(model)
        templated = chat and tok.chat_template is not None
        if templated:  # the rendered template holds its own special tokens
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=not templated)
        trained = getattr(getattr(lm.config, "text_config", None) or lm.config, "max_position_embeddings", None)
        if trained and ids["input_ids"].shape[1] > trained and not parse_spec(method).of_kind("position"):
            console.print(f"[yellow]warning:[/yellow] {ids['input_ids'].shape[1]} prompt tokens is past the "
                          f"{trained} this model was trained on; add a position method (e.g. selfextend+...)")
        with apply(lm, method, kernel=kernel) as handle:
            run = greedy(lm, ids, max_new_tokens, eos_ids(lm, tok), hold_last=handle.compresses, chunk=chunk)
    except LongreachError as err:
        _fail(err)
    console.print(tok.decode(run.tokens, skip_special_tokens=True), markup=False)
    n_in, prefill = ids["input_ids"].shape[1], run.prefill_s
    console.print(
        f"\n[dim]{n_in} prompt tokens, prefill {prefill:.2f}s ({n_in / prefill:.0f} tok/s), "
        f"decode {len(run.tokens) - 1} tokens in {run.decode_s:.2f}s, density prefill {handle.density('prefill'):.3f}"
        + (f" decode {handle.density('decode'):.3f}" if handle.density("decode") is not None else "")
        + (f", KV cache {cache_bytes(run.cache) / 2**20:.1f} MiB" if cache_bytes(run.cache) is not None else "")
        + "[/dim]"
    )


@app.command()
def plan(
    model: str = typer.Option(..., help="bundled name (smollm2-135m, gemma3-270m), HF folder or .gguf file"),
    length: str = typer.Option(..., help="prompt length in tokens, e.g. 32768 or 32k"),
    method: str = typer.Option("dense", help="method spec, e.g. selfextend or yarn:factor=4+snapkv:density=0.25"),
    chunk: int = typer.Option(None, min=1, help="prefill chunk in tokens (as given to generate/eval --chunk)"),
    memory_gib: float = typer.Option(None, help="memory to plan for (default: MemAvailable now)"),
) -> None:
    """Expected memory of a long prompt (weights, KV cache, peak activations); exit 2 if it would not fit."""
    from . import load_model, parse_spec
    from .eval.runner import parse_lengths
    from .plan import GiB, plan_memory, resident_bytes

    try:
        spec = parse_spec(method)
        tokens = parse_lengths(length)[0]
        lm, _ = load_model(model)
        budget = int(memory_gib * GiB) if memory_gib is not None else None
        result = plan_memory(lm, spec, tokens, chunk, budget, runtime=resident_bytes())
    except LongreachError as err:
        _fail(err)
    table = Table(title=f"longreach plan: {model} · {spec} · {tokens} tokens")
    table.add_column("")
    table.add_column("bytes", justify="right")
    for name, value in result.rows():
        table.add_row(name, value)
    console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if not result.fits:
        _fail(LongreachError(
            f"does not fit: expected peak {result.total / GiB:.2f} GiB > {result.available / GiB:.2f} GiB available; "
            "try --chunk 2048 (smaller activations), a press (smaller cache) or a shorter input"))
    console.print("[green]fits[/green]")


@app.command()
def diagnose(
    model: str = typer.Option(..., help="bundled name (smollm2-135m, gemma3-270m), HF folder or .gguf file"),
    method: list[str] = typer.Option(..., help="method spec; repeat --method to compare several in one run"),
    input: Path = typer.Option(None, exists=True, dir_okay=False, help="text file with the prompt"),
    task: str = typer.Option(None, help="instead of --input: build the prompt from an eval task, e.g. passkey"),
    length: str = typer.Option("2k", help="prompt length in tokens for --task (e.g. 8k)"),
    depth: float = typer.Option(0.5, help="needle depth for --task"),
    layers: str = typer.Option(None, help="layers to replay, e.g. 0,10,20 (default: all)"),
    queries: int = typer.Option(1024, min=1, help="queries (evenly spaced) that estimate mass recall"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="apply the model's chat template, if it has one"),
    kernel: str = typer.Option("auto", help="auto, gather, flex or reference"),
    out: Path = typer.Option(Path("diagnose"), help="folder for diagnose.json and recall.png"),
) -> None:
    """Oracle gap per layer: dense mass recall, output error, density, selection vs attention time.

    Example: longreach diagnose --model smollm2-135m --method hip:density=0.1 --method quest:density=0.1
    --task passkey --length 8k
    """
    from . import load_model, parse_spec
    from .diagnostics import diagnose as run_diagnosis
    from .diagnostics import recall_heatmaps

    try:
        specs = [str(parse_spec(m)) for m in method]
        if (input is None) == (task is None):
            raise LongreachError("give exactly one of --input FILE or --task TASK (e.g. --task passkey --length 8k)")
        wanted = [_layer_index(x) for x in layers.split(",") if x.strip()] if layers else None
        text = None
        if input is not None:
            text = input.read_text()
            if not text.strip():
                raise LongreachError(f"{input} is empty; give a text file with the prompt")
        else:
            from .eval.corpus import Corpus
            from .eval.runner import parse_lengths
            from .eval.tasks import parse_task

            task_obj, n_tokens = parse_task(task), parse_lengths(length)[0]
        lm, tok = load_model(model)
        templated = chat and tok.chat_template is not None
        if text is None:
            sample = task_obj.build(tok, Corpus.load("canterbury"), n_tokens, depth, 0, chat)
            text, templated = sample.prompt, sample.chat
        elif templated:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=not templated)["input_ids"]
        n_layers = getattr(lm.config, "num_hidden_layers", None)
        if wanted and n_layers is not None and max(wanted) >= n_layers:
            raise LongreachError(f"--layers: this model has layers 0..{n_layers - 1}, got {max(wanted)}")
        console.print(f"{ids.shape[1]} tokens; replaying {len(specs)} method(s) on each layer")
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        total = len(wanted) if wanted else n_layers
        with Progress(TextColumn("layers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console) as bar:
            task_id = bar.add_task("layers", total=total)
            diag = run_diagnosis(lm, ids, specs, kernel=kernel, layers=wanted, max_queries=queries,
                                 progress=lambda _layer: bar.advance(task_id))
    except LongreachError as err:
        _fail(err)
    table = Table(title=f"oracle gap per layer, {diag.tokens} tokens, recall over {min(queries, diag.tokens)} "
                        "queries (times: this machine, one run)")
    for col in ("layer", "method", "recall mean", "recall min head", "output error", "density", "select ms",
                "attend ms", "dense ms"):
        table.add_column(col)
    for r in diag.layers:
        table.add_row(str(r.layer), r.method, f"{sum(r.recall) / len(r.recall):.3f}", f"{min(r.recall):.3f}",
                      f"{sum(r.output_error) / len(r.output_error):.3f}", f"{r.density:.3f}",
                      f"{r.select_s * 1e3:.1f}", f"{r.attend_s * 1e3:.1f}", f"{r.dense_s * 1e3:.1f}")
    console.print(table)
    summary = Table(title="all layers")
    for col in ("method", "mass recall", "worst head", "output error", "density", "select / attend",
                "sparse vs dense attention"):
        summary.add_column(col)
    for m in diag.methods:
        s = diag.summary(m)
        summary.add_row(m, f"{s['recall']:.3f}", f"{s['min_recall']:.3f}", f"{s['output_error']:.3f}",
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


def _layer_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise LongreachError(f"--layers: '{text}' is not a layer index; use e.g. 0,10,20") from None
    if value < 0:
        raise LongreachError(f"--layers: layer indices start at 0, got {value}")
    return value


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., help="bundled name (smollm2-135m, gemma3-270m), HF folder or .gguf file"),
    tasks: str = typer.Option("passkey,niah", help="task specs, e.g. passkey,niah:variant=multikey,kvret,ppl"),
    lengths: str = typer.Option("2k,4k", help="prompt lengths in tokens, e.g. 2k,4k,8k"),
    methods: str = typer.Option("dense,quest:density=0.1",
                                help="method specs; speed is reported against dense when it is in the sweep"),
    samples: int = typer.Option(5, help="samples per task x length (depths cycle over --depths)"),
    first_seed: int = typer.Option(0, help="seeds run from here: keep tuning and reporting prompts disjoint"),
    depths: str = typer.Option(None, help="needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)"),
    out: Path = typer.Option(..., help="folder for results.jsonl and the report (re-run to resume)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="apply the model's chat template, if it has one"),
    kernel: str = typer.Option("auto", help="auto, gather, flex or reference"),
    corpus: str = typer.Option("canterbury", help="prose source: canterbury, austen, bible (Debian) or synthetic"),
    executor: str = typer.Option("local", help="local (in-process) or ray (cells spread over a Ray cluster)"),
    workers: int = typer.Option(2, help="Ray actors (each loads the model once)"),
    report: bool = typer.Option(True, "--report/--no-report", help="write the report at the end"),
    quiet: bool = typer.Option(False, "--quiet"),
    chunk: int = typer.Option(None, help="prefill this many tokens per forward (long inputs in less memory)"),
) -> None:
    """Sweep methods x tasks x lengths; one JSON line per sample in OUT/results.jsonl (resumable)."""
    _run_eval(model, tasks, lengths, methods, samples, depths, out, chat, kernel, corpus, executor, workers,
              report, quiet, chunk, first_seed)


def _run_eval(model: str, tasks: str, lengths: str, methods: str, samples: int, depths: str | None, out: Path,
              chat: bool = True, kernel: str = "auto", corpus: str = "canterbury", executor: str = "local",
              workers: int = 2, report: bool = True, quiet: bool = False, chunk: int | None = None,
              first_seed: int = 0) -> None:
    import sys

    from .eval import runner

    try:
        plan = runner.make_plan(model, tasks, methods, lengths, depths=depths, samples=samples, chat=chat,
                                kernel=kernel, corpus=corpus, chunk=chunk, first_seed=first_seed)
        if executor not in ("local", "ray"):
            raise LongreachError(f"unknown executor '{executor}': use local or ray")
        if executor == "ray":
            from .eval.distributed import check_ray

            check_ray()
        todo, bad, finished = runner.pending(plan, out)
    except LongreachError as err:
        _fail(err)
    for line in bad:
        console.print(f"[yellow]warning:[/yellow] {out / 'results.jsonl'} {line} — its sample will be run again")
    total = sum(len(v) for v in todo.values())
    if not quiet:
        console.print(f"{len(plan.cells())} cells, {finished} samples done, {total} to run → {out / 'results.jsonl'}")
    if total:
        try:
            from .eval.corpus import Corpus
            from .models import load_tokenizer

            prose = Corpus.load(plan.corpus)
            runner.preflight(plan, todo, load_tokenizer(model), prose)
            runner.write_plan(plan, out, sys.argv)
            if executor == "ray":
                from .eval.distributed import run_ray

                run_ray(plan, out, todo, workers=workers, quiet=quiet, console=console)
            else:
                from . import load_model

                if not quiet:
                    console.print(f"loading {model}")
                lm, tok = load_model(model)
                with _SweepProgress(todo, quiet) as progress:
                    runner.run_local(plan, out, todo, lm, tok, prose, progress=progress.advance)
        except LongreachError as err:
            _fail(err)
    if report:
        _report(out, quiet)


class _SweepProgress:
    """Overall bar (with ETA) plus one bar for the cell being run."""

    def __init__(self, todo: dict, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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


def _report(out: Path, quiet: bool) -> None:
    from .eval import report as rep

    try:
        result = rep.build_report(out)
    except LongreachError as err:
        _fail(err)
    for line in result.bad_lines:
        console.print(f"[yellow]warning:[/yellow] {out / 'results.jsonl'} {line}")
    print(result.markdown)
    if not quiet:
        console.print(f"[dim]report: {result.html_path}[/dim]")


@app.command()
def report(out: Path = typer.Argument(..., help="an eval output folder (holding results.jsonl)")) -> None:
    """Markdown table of an eval folder (mean ± 95% CI, density, speed vs dense) and OUT/report.html with plots."""
    if not (out / "results.jsonl").is_file():
        _fail(LongreachError(f"{out} has no results.jsonl; run 'longreach eval --out {out}' first"))
    _report(out, quiet=False)


@app.command()
def demo(
    model: str = typer.Option("smollm2-135m"),
    lengths: str = typer.Option("8k", help="prompt lengths (8k: where the fast prefill method wins on CPU)"),
    methods: str = typer.Option(";".join(DEMO_METHODS),
                                help="';'-separated specs (include dense: speed and cache are relative to it)"),
    samples: int = typer.Option(1, help="samples per task x length"),
    out: Path = typer.Option(None, help="results folder (default: a fresh temporary folder)"),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Dense vs a fast sparse prefill vs a KV press on passkey + needle-in-prose: accuracy, speed, cache memory
    (~4 minutes on 2 cores)."""
    import tempfile

    from .eval.results import read_rows
    from .eval.showcase import summarise

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


@app.command()
def corpus(action: str = typer.Argument("fetch", help="fetch: download and normalise the prose corpus now")) -> None:
    """Fetch the real-prose corpus (Canterbury texts from brotli 1.1.0's sdist) into the cache, once."""
    from .eval.corpus import Corpus

    if action != "fetch":
        _fail(LongreachError(f"unknown action '{action}': use 'longreach corpus fetch'"))
    try:
        prose = Corpus.load("canterbury")
    except LongreachError as err:
        _fail(err)
    for name, text in prose.documents.items():
        console.print(f"{name}: {len(text):,} characters")
    console.print(f"[dim]licence: {prose.licence}[/dim]")


@bench_app.command("attention")
def bench_attention(
    lengths: str = typer.Option("4k,8k,16k"),
    density: str = typer.Option("0.1", help="densities for the default methods, e.g. 0.05,0.1,0.25,0.5,1.0"),
    methods: str = typer.Option("", help="';'-separated specs (default: quest, moba, streaming at each --density)"),
    kernel: str = typer.Option("gather", help="kernels to time, e.g. gather or gather,flex"),
    heads: str = typer.Option("9,3,64", help="q heads,kv heads,head dim; ';' for several (Llama-3-8B: 32,8,128)"),
    phases: str = typer.Option("prefill", help="prefill, decode or prefill,decode"),
    repeat: int = typer.Option(2, min=1),
    json_out: Path = typer.Option(None, "--json", help="also write the rows (and the measured roofline) as JSON"),
    plot_out: Path = typer.Option(None, "--plot", help="also write a PNG: speedup vs T per method"),
) -> None:
    """Attention operator: selection + kernel vs dense causal SDPA, one run, ratios and fraction of roofline."""
    from . import parse_spec
    from .bench import attention, roofline
    from .eval.runner import parse_lengths

    try:
        densities = [float(x) for x in density.split(",") if x.strip()]
        specs = [s for s in methods.split(";") if s] or [
            f"{m}:density={d}" for d in densities for m in ("quest", "moba", "streaming")]
        shapes = [tuple(int(x) for x in h.split(",")) for h in heads.split(";") if h.strip()]
        wanted = tuple(p.strip() for p in phases.split(",") if p.strip())
        if not wanted or set(wanted) - {"prefill", "decode"}:
            raise LongreachError(f"--phases takes prefill and/or decode, got '{phases}'")
        if any(len(sh) != 3 for sh in shapes):
            raise LongreachError(f"--heads takes 'q,kv,dim' triples separated by ';', got '{heads}'")
        for spec in specs:
            parse_spec(spec)  # bad specs fail before anything is timed
        peak = roofline.measure()
        rows = [r for kern in kernel.split(",") for hq, hkv, dim in shapes
                for r in attention.run(list(parse_lengths(lengths)), specs, kern.strip(), hq, hkv, dim, repeat, wanted)]
    except (LongreachError, ValueError) as err:
        _fail(err if isinstance(err, LongreachError) else LongreachError(str(err)))
    table = Table(title=f"attention operator vs dense causal SDPA — {attention.hardware()}; "
                        f"matmul peak {peak.flops / 1e9:.0f} GFLOP/s, read {peak.bytes_per_s / 1e9:.1f} GB/s")
    for col in ("phase", "heads", "T", "method", "kernel", "density", "dense s", "select s", "attend s", "speedup",
                "select share", "roofline", "dense roofline"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.phase, r.heads, str(r.length), r.spec, r.kernel, f"{r.density:.3f}", f"{r.dense_s:.4f}",
                      f"{r.select_s:.4f}", f"{r.attend_s:.4f}", f"{r.speedup:.2f}x",
                      f"{r.select_s / (r.select_s + r.attend_s):.0%}", f"{r.roofline(peak):.1%}",
                      f"{r.dense_roofline(peak):.1%}")
    console.print(table)
    console.print("roofline: attended FLOP/s / matmul peak (prefill), K/V bytes read per s / read bandwidth (decode)")
    if json_out:
        json_out.write_text(json.dumps({"hardware": attention.hardware(), "provenance": provenance(),
                                        "roofline": peak.as_dict(), "rows": [
            {**r.__dict__, "speedup": r.speedup, "roofline_fraction": r.roofline(peak),
             "dense_roofline_fraction": r.dense_roofline(peak)} for r in rows]}, indent=1))
    if plot_out and not attention.plot(rows, plot_out):
        console.print("[yellow]no plot:[/yellow] pip install 'longreach[plots]' (matplotlib)")


@bench_app.command("e2e")
def bench_e2e(
    model: str = typer.Option("smollm2-135m", help="bundled name (smollm2-135m, gemma3-270m), HF folder or .gguf"),
    lengths: str = typer.Option("2k,4k,8k,16k", help="prompt lengths in tokens"),
    methods: str = typer.Option("dense;quest:density=0.1",
                                help="';'-separated specs (the transformers baseline always runs first)"),
    new_tokens: int = typer.Option(32, min=2, help="tokens decoded per run (no early stop)"),
    chunk: int = typer.Option(None, min=1, help="prefill chunk in tokens"),
    corpus: str = typer.Option("canterbury", help="text source: canterbury, austen, bible or synthetic"),
    peer: bool = typer.Option(True, "--peer/--no-peer", help="add llama.cpp on the same GGUF when installed"),
    json_out: Path = typer.Option(None, "--json", help="also write the rows as JSON"),
    plot_out: Path = typer.Option(None, "--plot", help="also write a PNG: speedups vs T"),
) -> None:
    """A real model end to end: time to first token, decode tokens/s, peak RSS and KV bytes, vs transformers."""
    from . import load_model, parse_spec
    from .bench import attention, e2e
    from .eval.corpus import Corpus
    from .eval.runner import parse_lengths
    from .models import gguf_path

    try:
        specs = [str(parse_spec(s)) for s in methods.split(";") if s.strip()]
        tokens = list(parse_lengths(lengths))
        lm, tok = load_model(model)
        text = "\n\n".join(Corpus.load(corpus).documents.values())
        rows = e2e.run_model(lm, tok, text, tokens, specs, new_tokens, chunk)
        note = None
        if peer:
            gguf = gguf_path(model)
            if gguf is None:
                note = "llama.cpp column skipped: the model is not a GGUF"
            elif not e2e.llama_cpp_available():
                note = "llama.cpp column skipped: pip install llama-cpp-python to add it"
            else:
                rows += e2e.run_llama_cpp(gguf, text, tokens, new_tokens)
    except (LongreachError, ValueError) as err:
        _fail(err if isinstance(err, LongreachError) else LongreachError(str(err)))
    base = e2e.baselines(rows)
    table = Table(title=f"end to end: {model}, {new_tokens} new tokens — {attention.hardware()}")
    for col in ("T", "method", "TTFT s", "decode tok/s", "TTFT vs transformers", "decode vs transformers",
                "peak RSS MiB", "KV MiB"):
        table.add_column(col)
    for r in rows:
        ttft_x, dec_x = r.vs(base.get(r.length))
        table.add_row(str(r.length), r.method, f"{r.ttft_s:.2f}", f"{r.decode_tok_s:.2f}",
                      f"{ttft_x:.2f}x" if ttft_x else "-", f"{dec_x:.2f}x" if dec_x else "-",
                      f"{r.peak_rss_mb:.0f}", f"{r.kv_bytes / 2**20:.1f}" if r.kv_bytes is not None else "-")
    console.print(table)
    if note:
        console.print(f"[yellow]note:[/yellow] {note}")
    if json_out:
        json_out.write_text(json.dumps({"hardware": attention.hardware(), "provenance": provenance(),
                                        "model": model, "rows": [
            {**r.__dict__, "ttft_speedup": r.vs(base.get(r.length))[0],
             "decode_speedup": r.vs(base.get(r.length))[1]} for r in rows]}, indent=1))
    if plot_out and not e2e.plot(rows, plot_out):
        console.print("[yellow]no plot:[/yellow] pip install 'longreach[plots]' (matplotlib)")


@bench_app.command("selection")
def bench_selection(
    method: str = typer.Option("hip:budget=2048", help="method spec (a fixed budget shows the scaling best)"),
    lengths: str = typer.Option("4k,8k,16k,32k,64k"),
    heads: str = typer.Option("9,3,64", help="query heads, kv heads, head dim (SmolLM2: 9,3,64)"),
    repeat: int = typer.Option(2, min=1),
) -> None:
    """Selection time alone vs length, with a c * T log2 T fit and the log-log slope (one run)."""
    from .bench import attention
    from .eval.runner import parse_lengths

    try:
        hq, hkv, dim = (int(x) for x in heads.split(","))
        fit = attention.selection_scaling(method, list(parse_lengths(lengths)), hq, hkv, dim, repeat)
    except LongreachError as err:
        _fail(err)
    table = Table(title=f"{method} selection (prefill), {hq} q / {hkv} kv heads, d={dim} — {attention.hardware()}")
    for col in ("T", "select s", "x previous", "c*T*log2(T) fit s"):
        table.add_column(col)
    prev = None
    for t, s in zip(fit.lengths, fit.seconds, strict=True):
        table.add_row(str(t), f"{s:.3f}", f"{s / prev:.2f}x" if prev else "-", f"{fit.c * t * math.log2(t):.3f}")
        prev = s
    console.print(table)
    console.print(f"log-log slope {fit.slope:.2f} (1 = linear, 2 = quadratic); T log T fit: worst relative "
                  f"residual {fit.max_rel_residual:.0%}")


if __name__ == "__main__":
    app()


@heads_app.command("profile")
def heads_profile(
    model: str = typer.Option(..., help="bundled name (smollm2-135m, gemma3-270m), HF folder or .gguf file"),
    lengths: str = typer.Option("1k,2k", help="probe lengths in tokens"),
    depths: str = typer.Option("0.1,0.4,0.7,0.95", help="needle depths of the probes (one probe per length x depth)"),
    corpus: str = typer.Option("canterbury", help="prose for the probes: canterbury, austen, bible or synthetic"),
    out: Path = typer.Option(Path("profile.json"), help="where to write the profile JSON"),
) -> None:
    """Score every (layer, head) on copy probes: retrieval, sink, hidden sink, locality, entropy."""
    from . import load_model
    from .eval.corpus import Corpus
    from .eval.runner import parse_lengths
    from .heads import profile_heads

    try:
        lens = tuple(parse_lengths(lengths))
        deps = tuple(_floats(depths, "depths"))
        if out.exists() and out.is_dir():
            raise LongreachError(f"--out {out} is a folder; give a file name such as profile.json")
        prose_src = Corpus.synthetic() if corpus == "synthetic" else Corpus.load(corpus)
        lm, tok = load_model(model)
        prof = profile_heads(lm, tok, lambda seed: "".join(prose_src.passage(seed, 3 * max(lens))),
                             prose_src.vocabulary(), lengths=lens, depths=deps,
                             progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    except LongreachError as err:
        _fail(err)
    prof.save(out)
    from .heads.show import summary

    console.print("\n".join(summary(prof)), markup=False)
    console.print(f"wrote {out}")


@heads_app.command("show")
def heads_show(
    profile: Path = typer.Argument(..., help="a profile JSON from `longreach heads profile`"),
    plots: Path = typer.Option(None, help="folder for one heatmap PNG per score (default: next to the profile)"),
) -> None:
    """Print a profile's summary and write layers x heads heatmaps."""
    from .heads import HeadProfile
    from .heads.show import heatmaps, summary

    try:
        prof = HeadProfile.load(profile)
    except LongreachError as err:
        _fail(err)
    console.print("\n".join(summary(prof)), markup=False)
    folder = plots or profile.with_suffix("")
    for path in heatmaps(prof, folder):
        console.print(f"wrote {path}")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LongreachError(f"--{what} must be comma-separated numbers, got '{text}'") from None
