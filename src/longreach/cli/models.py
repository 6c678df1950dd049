"""Model families: which method runs on which transformers family (the conformance matrix)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, user_errors

models_app = typer.Typer(help="Model families: check every method on tiny random models of each family.",
                         no_args_is_help=True)


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


@models_app.command("check")
def models_check(
    families: str = typer.Option(None, help="comma-separated families (default: all; see docs/models.md)"),
    methods: str = typer.Option(None, help="comma-separated methods (default: every registered method)"),
    out: Path = typer.Option(None, help="write the matrix as Markdown here (e.g. docs/models.md)"),
    quiet: bool = typer.Option(False, "--quiet", help="no per-cell progress"),
) -> None:
    """Run every method on a tiny random model of each family: ✓, refused (apply's reason) or ✗ (a bug).

    Examples:\n
      longreach models check --out docs/models.md\n
      longreach models check --families gemma2,gpt-oss --methods quest,snapkv
    """
    from longreach.conformance import markdown, run_matrix

    with user_errors():
        matrix = run_matrix(_names(families), _names(methods),
                            progress=None if quiet else (lambda msg: console.print(msg, markup=False)))
    text = markdown(matrix)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        console.print(f"wrote {out}")
    fails = matrix.failures()
    ok = sum(c.status == "ok" for c in matrix.cells.values())
    console.print(f"{ok} ✓, {len(matrix.refused())} refused, {len(fails)} ✗ over {len(matrix.cells)} cells",
                  markup=False)
    for c in fails:
        console.print(f"✗ {c.family} {c.method}: {c.reason}", markup=False)
    if fails:
        raise typer.Exit(1)
