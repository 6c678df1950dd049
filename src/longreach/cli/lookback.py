"""Lookback Lens: per-head lookback ratios of a greedy answer, a labelled set from the eval tasks, a detector."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from longreach import LongreachError
from longreach.provenance import provenance

from .common import CHAT_HELP, KERNEL_HELP, MODEL_HELP, chat_prompt, console, floats, token_lengths, user_errors
from .diagnose import check_prompt_options, prompt_ids

lookback_app = typer.Typer(
    help="Lookback Lens (Chuang et al. 2024): how much each head reads the prompt while answering, and a "
         "logistic-regression detector of wrong answers on those ratios.\n\n"
         "  longreach lookback ratios --model smollm2-135m --task passkey --length 1k\n\n"
         "  longreach lookback dataset --model smollm2-135m --task passkey --lengths 1k,2k --seeds 4 "
         "--out data.jsonl\n\n"
         "  longreach lookback fit data.jsonl --out detector.json",
    no_args_is_help=True)


@lookback_app.command("ratios")
def ratios(
    model: str = typer.Option(..., help=MODEL_HELP),
    input: Path = typer.Option(None, exists=True, dir_okay=False, help="text file with the prompt"),
    task: str = typer.Option(None, help="instead of --input: build the prompt from an eval task, e.g. passkey"),
    length: str = typer.Option("1k", help="prompt length in tokens for --task"),
    depth: float = typer.Option(0.5, help="needle depth for --task"),
    max_new_tokens: int = typer.Option(16, min=1, help="greedy tokens to generate (EOS stops earlier)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help=CHAT_HELP),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    detector: Path = typer.Option(None, exists=True, dir_okay=False,
                                  help="a detector from `lookback fit`: print its P(wrong answer) for this answer"),
    out: Path = typer.Option(Path("lookback"), help="folder for lookback.json and lookback.png"),
) -> None:
    """Generate greedily; per generated token and (layer, head), the share of attention on the prompt."""
    from longreach import load_model
    from longreach.analysis import LogisticDetector, lookback_ratios
    from longreach.analysis.plots import lookback_heatmap
    from longreach.generation import eos_ids

    with user_errors():
        text, task_obj, n_tokens = check_prompt_options(input, task, length)
        det = LogisticDetector.load(detector) if detector is not None else None
        lm, tok = load_model(model)
        ids = prompt_ids(tok, text, task_obj, n_tokens, depth, chat)
        run = lookback_ratios(lm, ids, max_new_tokens, eos_ids(lm, tok), kernel)
        p_wrong = float(det.probability(run.features())) if det is not None else None
    answer = tok.decode(run.tokens, skip_special_tokens=True)
    console.print(f"{run.prompt_tokens} prompt tokens; answer ({len(run.tokens)} tokens): {answer!r}", markup=False)
    by_layer = run.ratios.mean(0)  # (layers, heads)
    table = Table(title="lookback ratio per layer, mean over generated tokens (1 = all attention on the prompt)")
    for col in ("layer", "mean over heads", "lowest head", "highest head"):
        table.add_column(col)
    for layer, row in zip(run.layers, by_layer, strict=True):
        table.add_row(str(layer), f"{row.mean():.3f}", f"{row.min():.3f} (h{int(row.argmin())})",
                      f"{row.max():.3f} (h{int(row.argmax())})")
    console.print(table)
    if p_wrong is not None:
        console.print(f"detector {detector}: P(wrong answer) = {p_wrong:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    data = {"model": model, "provenance": provenance(), "answer": answer, "features": run.features().tolist(),
            "p_wrong": p_wrong, **run.to_dict()}
    (out / "lookback.json").write_text(json.dumps(data))
    lookback_heatmap(run.ratios, run.layers, out / "lookback.png", f"{model}: ")
    console.print(f"wrote {out / 'lookback.json'} and {out / 'lookback.png'}")


@lookback_app.command("dataset")
def dataset(
    model: str = typer.Option(..., help=MODEL_HELP),
    task: str = typer.Option("passkey", help="eval task whose scorer labels the answers, e.g. passkey, niah"),
    lengths: str = typer.Option("1k", help="prompt lengths in tokens, e.g. 1k,2k"),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", help="needle depths"),
    seeds: int = typer.Option(4, min=1, help="samples per (length, depth)"),
    first_seed: int = typer.Option(0, min=0, help="seed of the first sample (seeds first_seed .. first_seed+seeds-1)"),
    max_new_tokens: int = typer.Option(None, min=1, help="greedy tokens per answer (default: the task's)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help=CHAT_HELP),
    corpus: str = typer.Option("canterbury", help="prose source: canterbury, austen, bible or synthetic"),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    out: Path = typer.Option(Path("lookback-data.jsonl"), help="JSONL to write, one labelled answer per line; "
                             "an existing file of the same set is resumed"),
) -> None:
    """Build a labelled set: answer each task sample greedily; label 1 when the scorer finds it wrong.

    The label is a proxy for the paper's contextual-hallucination annotations (docs/analyses.md). A long set
    resumes: answers already in --out (same model, task, template and corpus) are kept and not asked again.
    """
    from longreach import load_model
    from longreach.eval import Corpus, parse_task
    from longreach.eval.lookback import labelled_rows
    from longreach.eval.results import ResultsWriter

    with user_errors():
        task_obj, lens, deps = parse_task(task), token_lengths(lengths), floats(depths, "depths")
        if out.is_dir():
            raise LongreachError(f"--out {out} is a folder; give a file name such as data.jsonl")
        prose = Corpus.synthetic() if corpus == "synthetic" else Corpus.load(corpus)
        settings = {"model": model, "task_spec": task, "chat": chat, "corpus": corpus,
                    "max_new_tokens": max_new_tokens}
        kept = resumable_rows(out, settings)
        done = {(r["length"], r["depth"], r["seed"]) for r in kept}
        todo = [(n, d, s) for n in lens for d in deps for s in range(first_seed, first_seed + seeds)]
        todo = [key for key in todo if key not in done]
        if kept:
            console.print(f"resuming {out}: {len(kept)} answers kept, {len(todo)} to run")
        lm, tok = load_model(model)
        total, wrong = len(kept) + len(todo), sum(r["label"] for r in kept)
        with ResultsWriter(out) as writer:  # one fsync'd append per answer, as eval's results.jsonl
            for i, row in enumerate(labelled_rows(lm, tok, task_obj, prose, todo, chat, max_new_tokens, kernel),
                                    len(kept) + 1):
                row.update(settings)
                writer.append(row)
                wrong += row["label"]
                console.print(f"[dim]{i}/{total} {row['tokens']} tokens, depth {row['depth']}: "
                              f"{'wrong' if row['label'] else 'right'} ({row['prediction'][:40]!r})[/dim]")
    console.print(f"wrote {out}: {total} answers, {wrong} wrong (label 1), {total - wrong} right (label 0)")


def resumable_rows(out: Path, settings: dict) -> list[dict]:
    """The rows a resumed `dataset` keeps. Refuses a file of another set rather than mixing or overwriting it; a
    last line cut off by an interrupted write (no newline) is dropped, and only that line, once the rest passed."""
    if not out.exists() or out.stat().st_size == 0:
        return []
    text = out.read_text()
    lines = text.splitlines()
    torn = not text.endswith("\n")
    if torn:
        lines = lines[:-1]
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise LongreachError(f"{out}:{n} is not JSON; give another --out (the file is left as it is)") from None
        other = {k: row.get(k, "(not recorded)") for k in settings}
        other = {k: v for k, v in other.items() if v != settings[k]}
        if other:
            mine = {k: settings[k] for k in other}
            raise LongreachError(f"{out} holds answers of another set ({other}; this run: {mine}): give another "
                                 f"--out, or the same options to resume it (the file is left as it is)")
        rows.append(row)
    if torn:
        console.print(f"[yellow]{out}: dropping its last line, cut off by an interrupted write[/yellow]")
        out.write_text("".join(line + "\n" for line in lines))
    return rows


@lookback_app.command("fit")
def fit(
    data: Path = typer.Argument(..., exists=True, dir_okay=False,
                                help="JSONL rows {features, label} (from `lookback dataset`) or {prompt, label}"),
    model: str = typer.Option(None, help=MODEL_HELP + "; needed for {prompt, label} rows"),
    max_new_tokens: int = typer.Option(16, min=1, help="{prompt, label} rows: greedy tokens per answer"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help=CHAT_HELP),
    held_back: float = typer.Option(0.25, min=0.01, max=0.99, help="fraction of each label kept out of training"),
    seed: int = typer.Option(0, help="seed of the split"),
    l2: float = typer.Option(1.0, min=0.0, help="L2 penalty on the standardised weights"),
    folds: int = typer.Option(5, min=0, help="also cross-validate over every row with this many stratified folds "
                              "(0: skip; each label needs at least this many rows)"),
    kernel: str = typer.Option("auto", help=KERNEL_HELP),
    out: Path = typer.Option(Path("detector.json"), help="where to save the detector (weights, scaling, report)"),
) -> None:
    """Fit the logistic-regression detector (label 1 = wrong answer) and report its held-back accuracy and AUROC,
    and the k-fold cross-validated ones over every row, each beside the majority-class baseline."""
    import torch

    from longreach.analysis import fit_detector
    from longreach.eval.stats import wilson

    with user_errors():
        rows = read_rows(data)
        features = [r.get("features") for r in rows]
        if any(f is None for f in features):
            features = prompt_features(rows, model, max_new_tokens, chat, kernel)
        if len({len(f) for f in features}) != 1:
            raise LongreachError(f"{data}: rows have features of different lengths; use rows from one model")
        x, y = torch.tensor(features, dtype=torch.float64), torch.tensor([int(r["label"]) for r in rows])
        det, report = fit_detector(x, y, held_back, seed, l2, folds)
    det.meta.update({"data": str(data), "features": x.shape[1], "held_back": held_back, "seed": seed, "l2": l2,
                     "folds": folds,
                     "label": "1 = wrong answer (the task scorer's proxy for a contextual hallucination)",
                     "model": model or rows[0].get("model"), "layers": rows[0].get("layers"),
                     "heads": rows[0].get("heads"), "provenance": provenance()})
    det.save(out)
    table = Table(title=f"lookback detector on {len(rows)} rows, {x.shape[1]} features")
    for col in ("rows train / held back", "wrong train / held back", "train acc", "held-back acc",
                "majority-class acc", "held-back AUROC"):
        table.add_column(col)
    table.add_row(f"{report.n_train} / {report.n_held_back}",
                  f"{report.positives_train} / {report.positives_held_back}", f"{report.train_accuracy:.3f}",
                  f"{report.held_back_accuracy:.3f}", f"{report.majority_accuracy:.3f}",
                  "–" if report.held_back_auroc is None else f"{report.held_back_auroc:.3f}")
    console.print(table)
    cv = report.cross_validation
    if cv is not None:
        lo, hi = wilson(cv.right, cv.rows)
        folds_table = Table(title=f"{cv.folds}-fold cross-validation (stratified, seed {seed}): every row scored "
                                  "once by a detector that never saw it")
        for col in ("rows", "accuracy (Wilson 95%)", "majority-class acc", "AUROC (0.5 = chance)"):
            folds_table.add_column(col)
        folds_table.add_row(str(cv.rows), f"{cv.accuracy:.3f} ({lo:.3f}–{hi:.3f})", f"{cv.majority_accuracy:.3f}",
                            f"{cv.auroc:.3f}")
        console.print(folds_table)
    console.print(f"wrote {out}")


def read_rows(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise LongreachError(f"{path}:{n} is not JSON") from None
        if not isinstance(row, dict) or "label" not in row or not ("features" in row or "prompt" in row):
            raise LongreachError(f"{path}:{n}: each row needs 'label' and 'features' or 'prompt'")
        if row["label"] not in (0, 1, True, False):
            raise LongreachError(f"{path}:{n}: label must be 0 or 1, got {row['label']!r}")
        rows.append(row)
    if not rows:
        raise LongreachError(f"{path} holds no rows")
    return rows


def prompt_features(rows: list[dict], model: str | None, max_new_tokens: int, chat: bool, kernel: str
                    ) -> list[list[float]]:
    """Features of rows that give a prompt: the mean lookback ratios of the model's greedy answer."""
    from longreach import load_model
    from longreach.analysis import lookback_ratios
    from longreach.generation import eos_ids

    if model is None:
        raise LongreachError("rows with a 'prompt' need --model to generate the answers")
    lm, tok = load_model(model)
    eos, out = eos_ids(lm, tok), []
    for i, row in enumerate(rows, 1):
        if row.get("features") is not None:
            out.append(row["features"])
            continue
        text, templated = chat_prompt(tok, row["prompt"], chat)
        ids = tok(text, return_tensors="pt", add_special_tokens=not templated)["input_ids"]
        out.append(lookback_ratios(lm, ids, max_new_tokens, eos, kernel).features().tolist())
        console.print(f"[dim]{i}/{len(rows)} prompts answered[/dim]")
    return out
