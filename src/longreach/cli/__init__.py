"""Command line: thin commands over the public API (nothing lives only here).

Each module holds one command group; this one builds the Typer ``app`` (the ``longreach`` console script) and
registers every command before anything can run it, so ``python -m longreach`` and ``python -m longreach.cli``
see them all.
"""

from __future__ import annotations

import typer

from . import diagnose, evaluate, run, serve, tune
from .bench import bench_app
from .heads import heads_app
from .lookback import lookback_app
from .models import models_app

app = typer.Typer(
    add_completion=False, no_args_is_help=True,
    help="Training-free long-context inference for Hugging Face causal LMs.\n\n"
         "Examples:\n\n  longreach methods\n\n"
         "  longreach generate --model smollm2-135m --method quest:density=0.1 --input doc.txt\n\n"
         "  longreach demo\n\n  longreach bench attention --lengths 4k,8k,16k --density 0.1",
)
app.command()(run.methods)
app.command()(run.generate)
app.command()(run.plan)
app.command()(diagnose.diagnose)
app.command("eval")(evaluate.eval_cmd)
app.command()(evaluate.report)
app.command()(evaluate.demo)
app.command()(evaluate.corpus)
app.command()(serve.serve)
app.command()(tune.tune)
app.add_typer(bench_app, name="bench")
app.add_typer(heads_app, name="heads")
app.add_typer(lookback_app, name="lookback")
app.add_typer(models_app, name="models")


def main() -> None:
    """Run the CLI (entry point of ``python -m longreach`` and ``python -m longreach.cli``)."""
    app()


__all__ = ["app", "main"]
