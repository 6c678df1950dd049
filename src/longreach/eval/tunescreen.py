"""Stage 1 of ``longreach tune``: drop clearly bad candidates cheaply, before any of them is evaluated.

On the first tuning prompts of each task, every select candidate is replayed on the real queries and keys of one
dense forward (:func:`longreach.diagnostics.diagnose`: mass recall and output error), and every press runs the
prompt once: how far it moves the next-token distribution at the prompt's end from dense's (total variation
distance) says whether what it dropped mattered there. One line per candidate and prompt in ``screen.jsonl``, so
an interrupted screen resumes at the prompt it was on. :func:`longreach.eval.tunerules.cut` draws the line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import InputError
from .corpus import Corpus
from .measure import prompt_sha
from .results import ResultsWriter
from .runner import make_sweep
from .tunerules import Screened

if TYPE_CHECKING:
    from .tune import TunePlan, TuneSettings

Log = Callable[[str], None]


@torch.no_grad()
def next_token_probs(model, ids: torch.Tensor, spec: str, kernel: str) -> torch.Tensor:
    """The next-token distribution at the prompt's end with ``spec`` applied (a press holds the last token back, so
    this row already reads the compressed cache)."""
    from .. import apply

    with apply(model, spec, kernel=kernel):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1].float().softmax(-1)


def read_jsonl(path: Path, model: str, log: Log) -> list[dict]:
    """Rows of a screen file (bad lines reported and their work redone); another model's file is refused."""
    rows = []
    if not path.exists():
        return rows
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if line.strip():
                log(f"warning: {path} line {number} is not valid JSON (a killed run?); its screen runs again")
    others = sorted({r.get("model") for r in rows} - {model})
    if others:
        raise InputError(f"{path} holds screens of another model ({', '.join(map(str, others))}); use another --out")
    return rows


def screen(plan: TunePlan, settings: TuneSettings, model, tokenizer, corpus: Corpus, length: int, path: Path,
           log: Log) -> list[Screened]:
    """Stage 1 on the first tuning prompts of each task at ``length``; one line per candidate and prompt in
    ``path``, so an interrupted screen resumes at the prompt it was on."""
    from ..diagnostics import diagnose

    sweep = make_sweep(plan.model, plan.tasks, "dense", str(length), samples=plan.screen_per_task,
                       chat=settings.chat, corpus=corpus.name, first_seed=settings.tune_seed)
    done = {(r["spec"], r["task"], r["seed"], r["length"], r["corpus"], r["chat"]): r
            for r in read_jsonl(path, plan.model, log)}
    with ResultsWriter(path) as writer:
        for task in sweep.tasks:
            for depth, seed in sweep.points(task):
                key = (task.spec(), seed, length, corpus.name, sweep.chat_for(task))
                selects = [s for s in plan.prefill if (s, *key) not in done]
                presses = [s for s in plan.press if (s, *key) not in done]
                if not selects and not presses:
                    continue
                sample = task.build(tokenizer, corpus, length, depth, seed, settings.chat)
                ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=not sample.chat)["input_ids"]
                base = {"model": plan.model, "task": key[0], "seed": seed, "depth": depth, "length": length,
                        "corpus": corpus.name, "chat": key[4], "prompt_sha": prompt_sha(sample)}
                log(f"screen: {task.spec()} seed {seed}: {len(selects)} select, {len(presses)} press candidates")
                if selects:
                    diag = diagnose(model, ids, selects, kernel=settings.kernel, max_queries=settings.screen_queries)
                    for spec in selects:
                        got = diag.summary(spec)
                        row = {**base, "spec": spec, "kind": "prefill", "recall": got["recall"],
                               "output_error": got["output_error"], "density": got["density"]}
                        writer.append(row)
                        done[(spec, *key)] = row
                if presses:
                    dense = next_token_probs(model, ids, "dense", settings.kernel)
                    for spec in presses:
                        probs = next_token_probs(model, ids, spec, settings.kernel)
                        row = {**base, "spec": spec, "kind": "press",
                               "shift": 0.5 * float((probs - dense).abs().sum()),
                               "agree": float(int(probs.argmax()) == int(dense.argmax()))}
                        writer.append(row)
                        done[(spec, *key)] = row
    wanted = {(t.spec(), s, length, corpus.name, sweep.chat_for(t)) for t in sweep.tasks for _, s in sweep.points(t)}
    out = []
    for spec, kind in [(s, "prefill") for s in plan.prefill] + [(s, "press") for s in plan.press]:
        rows = [r for k, r in done.items() if k[0] == spec and k[1:] in wanted]
        mean = lambda f, rows=rows: sum(r[f] for r in rows) / len(rows)  # noqa: E731
        if kind == "prefill":
            out.append(Screened(spec, kind, len(rows), recall=mean("recall"), output_error=mean("output_error"),
                                density=mean("density")))
        else:
            out.append(Screened(spec, kind, len(rows), shift=mean("shift"), agree=mean("agree")))
    return out
