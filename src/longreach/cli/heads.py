"""Head profiles: score what each attention head does, show a saved profile, find positional q/k dims."""

from __future__ import annotations

from pathlib import Path

import typer

from longreach import LongreachError

from .common import MODEL_HELP, console, floats, token_lengths, user_errors

heads_app = typer.Typer(help="Attention-head profiles (retrieval, sink, locality) for head-aware policies, and "
                             "positional q/k dims for posdim.",
                        no_args_is_help=True)


@heads_app.command("profile")
def heads_profile(
    model: str = typer.Option(..., help=MODEL_HELP),
    lengths: str = typer.Option("1k,2k", help="probe lengths in tokens"),
    depths: str = typer.Option("0.1,0.4,0.7,0.95", help="needle depths of the probes (one probe per length x depth)"),
    corpus: str = typer.Option("canterbury", help="prose for the probes: canterbury, austen, bible or synthetic"),
    out: Path = typer.Option(Path("profile.json"), help="where to write the profile JSON"),
) -> None:
    """Score every (layer, head) on copy probes: retrieval, sink, hidden sink, locality, entropy."""
    from longreach import load_model
    from longreach.eval import Corpus
    from longreach.heads import profile_heads
    from longreach.heads.show import summary

    with user_errors():
        lens = tuple(token_lengths(lengths))
        deps = tuple(floats(depths, "depths"))
        if out.exists() and out.is_dir():
            raise LongreachError(f"--out {out} is a folder; give a file name such as profile.json")
        prose_src = Corpus.synthetic() if corpus == "synthetic" else Corpus.load(corpus)
        lm, tok = load_model(model)
        prof = profile_heads(lm, tok, lambda seed: "".join(prose_src.passage(seed, 3 * max(lens))),
                             prose_src.vocabulary(), lengths=lens, depths=deps,
                             progress=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    prof.save(out)
    console.print("\n".join(summary(prof)), markup=False)
    console.print(f"wrote {out}")


@heads_app.command("show")
def heads_show(
    profile: Path = typer.Argument(..., help="a profile JSON from `longreach heads profile`"),
    plots: Path = typer.Option(None, help="folder for one heatmap PNG per score (default: next to the profile)"),
) -> None:
    """Print a profile's summary and write layers x heads heatmaps."""
    from longreach.heads import HeadProfile
    from longreach.heads.show import heatmaps, summary

    with user_errors():
        prof = HeadProfile.load(profile)
    console.print("\n".join(summary(prof)), markup=False)
    folder = plots or profile.with_suffix("")
    for path in heatmaps(prof, folder):
        console.print(f"wrote {path}")


@heads_app.command("posdim")
def heads_posdim(
    model: str = typer.Option(..., help=MODEL_HELP),
    length: str = typer.Option("1k", help="probe length in tokens"),
    corpus: str = typer.Option("canterbury", help="prose for the probe: canterbury, austen, bible or synthetic"),
    skip: int = typer.Option(4, help="first tokens left out of the correlation (attention sinks)"),
    show: int = typer.Option(3, help="best dims printed per layer"),
    out: Path = typer.Option(Path("dims.json"), help="where to write the dims JSON"),
) -> None:
    """Find each layer's positional q/k dims (un-rotated; |rank correlation| with position) for posdim.

    Example: longreach heads posdim --model smollm2-135m --length 1k --out dims.json
    then:    longreach generate --model smollm2-135m --input prompt.txt --method "posdim:file=dims.json,scale=0.5"
    """
    from longreach import load_model
    from longreach.eval import Corpus
    from longreach.heads.posdim import find_position_dims

    with user_errors():
        (n_tokens,) = token_lengths(length)
        if out.exists() and out.is_dir():
            raise LongreachError(f"--out {out} is a folder; give a file name such as dims.json")
        prose_src = Corpus.synthetic() if corpus == "synthetic" else Corpus.load(corpus)
        lm, tok = load_model(model)
        found = find_position_dims(lm, tok, "".join(prose_src.passage(0, 2 * n_tokens)), n_tokens, skip)
    found.save(out)
    for layer, row in enumerate(found.scores):
        best = found.best(layer, show)
        console.print(f"layer {layer:>2}: " + "  ".join(f"dim {d} {row[d]:.2f}" for d in best), markup=False)
    console.print(f"wrote {out}  (apply with posdim:file={out},scale=0.5)")
