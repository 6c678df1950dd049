"""Benchmarks: the attention operator, a real model end to end, and selection scaling (ratios from one run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.table import Table

from longreach import LongreachError
from longreach.provenance import provenance

from .common import checked_specs, console, floats, head_shapes, items, token_lengths, user_errors

bench_app = typer.Typer(help="Benchmarks (ratios measured in one run).", no_args_is_help=True)

NO_PLOT = "[yellow]no plot:[/yellow] pip install 'longreach[plots]' (matplotlib)"


@bench_app.command("attention")
def bench_attention(
    lengths: str = typer.Option("4k,8k,16k"),
    density: str = typer.Option("0.1", help="densities for the default methods, e.g. 0.05,0.1,0.25,0.5,1.0"),
    methods: str = typer.Option("", help="';'-separated specs (default: quest, moba, streaming at each --density)"),
    kernel: str = typer.Option("gather", help="kernels to time, e.g. gather or gather,flex"),
    heads: str = typer.Option("9,3,64", help="q heads,kv heads,head dim; ';' for several (Llama-3-8B: 32,8,128)"),
    phases: str = typer.Option("prefill", help="prefill, decode or prefill,decode"),
    repeat: int = typer.Option(3, min=1, help="repeats per row: medians, and each repeat's ratio (min-max)"),
    user_path: bool = typer.Option(False, "--user-path", help="also time each spec's attention inside apply() + a "
                                   "1-layer model forward (prefill) against select + attend on the same tensors"),
    json_out: Path = typer.Option(None, "--json", help="also write the rows (and the measured roofline) as JSON"),
    plot_out: Path = typer.Option(None, "--plot", help="also write a PNG: speedup vs T per method"),
) -> None:
    """Attention operator: selection + kernel vs dense causal SDPA, one run, ratios and fraction of roofline."""
    from longreach.bench import attention, roofline

    with user_errors(ValueError):
        specs = items(methods, ";") or [
            f"{m}:density={d}" for d in floats(density, "density") for m in ("quest", "moba", "streaming")]
        shapes = head_shapes(heads)
        wanted = tuple(items(phases))
        if not wanted or set(wanted) - {"prefill", "decode"}:
            raise LongreachError(f"--phases takes prefill and/or decode, got '{phases}'")
        checked_specs(specs)  # bad specs fail before anything is timed; rows keep the specs as written
        peak = roofline.measure()
        rows = [r for kern in items(kernel) for hq, hkv, dim in shapes
                for r in attention.run(token_lengths(lengths), specs, kern, hq, hkv, dim, repeat, wanted)]
        user_rows = [r for hq, hkv, dim in shapes if user_path
                     for r in attention.user_path(token_lengths(lengths), specs, hq, hkv, dim, repeat)]
    table = Table(title=f"attention operator vs dense causal SDPA, medians of {repeat} repeats — "
                        f"{attention.hardware()}; "
                        f"matmul peak {peak.flops / 1e9:.0f} GFLOP/s, read {peak.bytes_per_s / 1e9:.1f} GB/s")
    for col in ("phase", "heads", "T", "method", "kernel", "density", "dense s", "select s", "attend s", "speedup",
                "min-max", "select share", "roofline", "dense roofline"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.phase, r.heads, str(r.length), r.spec, r.kernel, f"{r.density:.3f}", f"{r.dense_s:.4f}",
                      f"{r.select_s:.4f}", f"{r.attend_s:.4f}", f"{r.speedup:.2f}x",
                      f"{min(r.speedups):.2f}-{max(r.speedups):.2f}x",
                      f"{r.select_s / (r.select_s + r.attend_s):.0%}", f"{r.roofline(peak):.1%}",
                      f"{r.dense_roofline(peak):.1%}")
    console.print(table)
    console.print("roofline: attended FLOP/s / matmul peak (prefill), K/V bytes read per s / read bandwidth (decode)")
    used = {f"{hq}/{hkv}/{dim}/{phase}" for hq, hkv, dim in shapes for phase in wanted}
    choices = {shape: made for shape, made in attention.kernel_choices().items() if shape in used}
    for shape, made in choices.items():
        console.print(f"gather path for q/kv/dim/phase {shape}: {made['path']} ({made['why']})")
    if user_rows:
        table = Table(title="the user's path: attention inside apply() + a 1-layer model forward vs select + attend "
                            "on the same q/k/v (prefill, density tracking on: apply's default)")
        for col in ("heads", "T", "method", "user path s", "operator s", "overhead"):
            table.add_column(col)
        for u in user_rows:
            table.add_row(u.heads, str(u.length), u.spec, f"{u.runtime_s:.4f}", f"{u.operator_s:.4f}",
                          f"{u.overhead:+.1%}")
        console.print(table)
    if json_out:
        machine = attention.hardware()  # in every row too, so that a row copied elsewhere still names its CPU
        json_out.write_text(json.dumps({"hardware": machine, "provenance": provenance(),
                                        "kernel_choice": choices, "roofline": peak.as_dict(),
                                        "user_path": [{**u.__dict__, "overhead": u.overhead, "machine": machine}
                                                      for u in user_rows],
                                        "rows": [
            {**r.__dict__, "speedup": r.speedup, "roofline_fraction": r.roofline(peak),
             "dense_roofline_fraction": r.dense_roofline(peak), "machine": machine} for r in rows]}, indent=1))
    if plot_out and not attention.plot(rows, plot_out):
        console.print(NO_PLOT)


@bench_app.command("e2e")
def bench_e2e(
    model: str = typer.Option("smollm2-135m", help="bundled name (smollm2-135m, gemma3-270m), HF folder or .gguf"),
    lengths: str = typer.Option("2k,4k,8k,16k", help="prompt lengths in tokens"),
    methods: str = typer.Option("dense;quest:density=0.1",
                                help="';'-separated specs (the transformers baseline always runs first)"),
    new_tokens: int = typer.Option(32, min=2, help="tokens decoded per run (no early stop)"),
    chunk: int = typer.Option(None, min=1, help="prefill chunk in tokens"),
    repeats: int = typer.Option(3, min=1, help="runs per row, each in a fresh process; medians and min-max"),
    corpus: str = typer.Option("canterbury", help="text source: canterbury, austen, bible or synthetic"),
    peer: bool = typer.Option(True, "--peer/--no-peer", help="add llama.cpp, on the model's GGUF and on an F32 copy "
                              "of it (the weights longreach runs), when llama-cpp-python is installed (`make peer`)"),
    peer_flash: bool = typer.Option(False, "--peer-flash", help="also run llama.cpp with its flash attention on"),
    hf_generate: bool = typer.Option(False, "--hf-generate", help="also time each spec through model.generate() "
                                     "under apply (the README's path; it should cost what longreach.generate does)"),
    json_out: Path = typer.Option(None, "--json", help="also write the rows as JSON"),
    plot_out: Path = typer.Option(None, "--plot", help="also write a PNG: speedups vs T"),
) -> None:
    """A real model end to end: time to first token, decode tokens/s (and the bandwidth bound), peak RSS and KV
    bytes, vs transformers; every row in fresh processes, repeated."""
    from longreach.bench import attention, e2e, roofline
    from longreach.eval import Corpus

    with user_errors(ValueError, RuntimeError):
        specs = checked_specs(items(methods, ";"))
        tokens = token_lengths(lengths)
        text = "\n\n".join(Corpus.load(corpus).documents.values())
        bandwidth = roofline.memory_bandwidth()
        peers, note = _peers(model, peer_flash) if peer else ([], None)
        rows = e2e.run_rows(model, text, tokens, specs, new_tokens, chunk, hf_generate, repeats,
                            progress=lambda line: console.print(f"[dim]{line}[/dim]"), peers=peers)
    base = e2e.baselines(rows)
    after = [bw for r in rows for bw in r.bandwidth_runs]
    table = Table(title=f"end to end: {model}, {new_tokens} new tokens, median of {repeats} fresh processes "
                        f"(min-max), read bandwidth {bandwidth / 1e9:.1f} GB/s at the start, "
                        f"{min(after) / 1e9:.1f}-{max(after) / 1e9:.1f} after the runs — {attention.hardware()}")
    for col in ("T", "method", "TTFT s", "decode tok/s", "TTFT vs transformers", "decode vs transformers",
                "decode bound tok/s", "peak RSS MiB", "KV MiB"):
        table.add_column(col, no_wrap=col == "method")
    for r in rows:
        ttft_x, dec_x = r.vs(base.get(r.length))
        bound, share = r.decode_bound(bandwidth), r.bound_share(bandwidth)
        table.add_row(str(r.length), r.method, _spread(r.ttft_s, r.ttft_runs, 2),
                      _spread(r.decode_tok_s, r.decode_runs, 2),
                      f"{ttft_x:.2f}x" if ttft_x else "-", f"{dec_x:.2f}x" if dec_x else "-",
                      f"{bound:.1f} ({share:.0%})" if bound and share else "-",
                      _spread(r.peak_rss_mb, r.rss_runs, 0),
                      f"{r.kv_bytes / 2**20:.1f}" if r.kv_bytes is not None else "-")
    console.print(table)
    if note:
        console.print(f"[yellow]note:[/yellow] {note}")
    if json_out:
        machine = attention.hardware()
        json_out.write_text(json.dumps({"hardware": machine, "provenance": provenance(),
                                        "model": model, "repeats": repeats, "read_bytes_per_s": bandwidth,
                                        "peer_note": note, "rows": [
            {**r.__dict__, "ttft_speedup": r.vs(base.get(r.length))[0],
             "decode_speedup": r.vs(base.get(r.length))[1], "decode_bound_tok_s": r.decode_bound(bandwidth),
             "decode_bound_share": r.bound_share(bandwidth),
             "machine": machine} for r in rows]}, indent=1))
    if plot_out and not e2e.plot(rows, plot_out):
        console.print(NO_PLOT)


def _peers(model: str, flash: bool) -> tuple[list, str | None]:
    """llama.cpp rows for this model (its GGUF and an F32 copy), or none and why."""
    from longreach.bench import peer
    from longreach.models import gguf_path

    gguf = gguf_path(model)
    if gguf is None:
        return [], "llama.cpp column skipped: the model is not a GGUF"
    if not peer.available():
        return [], "llama.cpp column skipped: `make peer` (or pip install llama-cpp-python) adds it"
    return peer.peers(gguf, flash), None


def _spread(value: float, runs: list[float], digits: int) -> str:
    """``median (min-max)`` of a row's repeats; the value alone for one run."""
    if len(runs) < 2:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} ({min(runs):.{digits}f}-{max(runs):.{digits}f})"


@bench_app.command("selection")
def bench_selection(
    method: str = typer.Option("hip:budget=2048", help="method spec (a fixed budget shows the scaling best)"),
    lengths: str = typer.Option("4k,8k,16k,32k,64k"),
    heads: str = typer.Option("9,3,64", help="query heads, kv heads, head dim (SmolLM2: 9,3,64)"),
    repeat: int = typer.Option(2, min=1),
) -> None:
    """Selection time alone vs length, with a c * T log2 T fit and the log-log slope (one run)."""
    from longreach.bench import attention

    with user_errors():
        shapes = head_shapes(heads)
        if len(shapes) > 1:
            raise LongreachError(f"--heads takes one 'q,kv,dim' triple here, got '{heads}'")
        hq, hkv, dim = shapes[0]
        fit = attention.selection_scaling(method, token_lengths(lengths), hq, hkv, dim, repeat)
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
