"""The sweep: methods x tasks x lengths x samples, one JSON line per sample, resumable.

Everything a user can get wrong (task, method, length and depth specs, an output folder that
holds another model's results) is checked by :func:`make_sweep` / :func:`pending` before a model
is loaded. The model is loaded once; each method is applied and removed around its cells, and
prompts are built once per (task, length, sample) and shared by every method.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..documents import Documents
from ..errors import InputError
from ..sorting import SortedDocuments, sort_documents
from ..spec import parse_spec
from .corpus import Corpus
from .measure import prompt_sha, run_sample, warm_up
from .results import ResultsWriter, read_rows, row_key
from .tasks import Sample, Task, parse_tasks

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SORTED = "sorted"  # the eval folder's attention-sorted prompts (SampleBank)
SORT_LABEL = " · sort-documents="  # method label suffix of rows answered after attention sorting
MAX_LENGTH = 1 << 20


@dataclass(frozen=True)
class Cell:
    """One method x task x length: the unit of progress, scheduling and resuming."""

    method: str
    task: Task
    length: int

    def __str__(self) -> str:
        return f"{self.method} · {self.task.spec()} · {self.length}"


@dataclass(frozen=True)
class Sweep:
    """What one eval asks for: methods x tasks x lengths, and how every sample is built and run.

    Not called a plan: in longreach "plan" is the memory plan (``longreach plan``).
    """

    model: str
    tasks: tuple[Task, ...]
    methods: tuple[str, ...]  # canonical spec strings
    lengths: tuple[int, ...]
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    samples: int = 5  # per task x length; depths cycle over the grid, seeds are 0..samples-1
    chat: bool = True
    kernel: str = "auto"
    corpus: str = "canterbury"
    chunk: int | None = None  # prefill tokens per forward (None: the whole prompt at once)
    first_seed: int = 0  # seeds are first_seed .. first_seed + samples - 1 (disjoint sets for tuning / reporting)
    sort_rounds: int | None = None  # attention sorting of each prompt's documents before answering (None: off)

    def cells(self) -> list[Cell]:
        return [Cell(m, t, n) for m in self.methods for t in self.tasks for n in self.lengths]

    def points(self, task: Task) -> list[tuple[float | None, int]]:
        """(depth, seed) of every sample of a task at one length."""
        return [(self.depths[i % len(self.depths)] if task.uses_depth else None, self.first_seed + i)
                for i in range(self.samples)]

    def chat_for(self, task: Task) -> bool:
        """The chat flag as requested (a row's ``chat_applied`` says whether the tokenizer had a template)."""
        return self.chat and task.metric != "ppl"

    def label(self, method: str) -> str:
        """A row's ``method``: the spec, and the sorting rounds when documents are sorted before answering (rows
        of both kinds then share a folder, and the report sets each against dense)."""
        return method if self.sort_rounds is None else f"{method}{SORT_LABEL}{self.sort_rounds}"

    def key(self, cell: Cell, depth: float | None, seed: int) -> tuple:
        return row_key({"model": self.model, "method": self.label(cell.method), "task": cell.task.spec(),
                        "length": cell.length, "depth": depth, "seed": seed, "chat": self.chat_for(cell.task),
                        "corpus": self.corpus})


def parse_lengths(text: str) -> tuple[int, ...]:
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            value = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise InputError(f"'{part}' is not a length; use e.g. 2048 or 4k") from None
        if not 64 <= value <= MAX_LENGTH:
            raise InputError(f"length {part} is out of range; use 64 .. 1024k tokens")
        out.append(value)
    if not out:
        raise InputError("no lengths given: e.g. --lengths 2k,4k,8k")
    return tuple(dict.fromkeys(out))


def parse_depths(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"depths must be numbers in [0, 1], got '{text}'") from None
    if not out or any(not 0 <= d <= 1 for d in out):
        raise InputError(f"depths must be numbers in [0, 1], got '{text}'")
    return out


def make_sweep(model: str, tasks: str, methods: str, lengths: str, *, depths: str | None = None, samples: int = 5,
              chat: bool = True, kernel: str = "auto", corpus: str = "canterbury", chunk: int | None = None,
              first_seed: int = 0, sort_rounds: int | None = None) -> Sweep:
    """Parse and validate every spec of a sweep (no model, no corpus download)."""
    from .. import kernel_names
    from ..configurable import split_items

    method_specs = [str(parse_spec(s)) for s in split_items(methods)]
    if not method_specs:
        raise InputError("no methods given: e.g. --methods dense,quest:density=0.1")
    if len(set(method_specs)) != len(method_specs):
        raise InputError(f"a method is given twice in '{methods}'")
    if samples < 1:
        raise InputError("--samples must be >= 1")
    if kernel != "auto" and kernel not in kernel_names():
        raise InputError(f"unknown kernel '{kernel}': use auto, {', '.join(kernel_names())}")
    if corpus not in ("canterbury", "synthetic", "austen", "bible"):
        raise InputError(f"unknown corpus '{corpus}': use canterbury (default), austen, bible or synthetic")
    if chunk is not None and chunk < 1:
        raise InputError(f"--chunk must be >= 1 token, got {chunk}")
    if first_seed < 0:
        raise InputError(f"--first-seed must be >= 0, got {first_seed}")
    parsed = tuple(parse_tasks(tasks))
    if sort_rounds is not None:
        if sort_rounds < 0:
            raise InputError(f"--sort-documents takes a number of rounds >= 0, got {sort_rounds}")
        plain = [t.spec() for t in parsed if not t.has_documents]
        if plain:
            raise InputError(f"--sort-documents reorders a prompt's documents, and {', '.join(plain)} has none: "
                             "use a task with documents, e.g. niah:docs=8 or kvret:docs=1")
    procedures = [m for m in method_specs if parse_spec(m).of_kind("procedure")]
    runs = [m for m in method_specs if parse_spec(m).runs > 1]
    scored = [t.spec() for t in parsed if t.metric == "ppl"]
    if procedures and scored:
        raise InputError(f"{procedures[0]} replaces the prefill to build a cache for answering, and {scored[0]} "
                         "scores every position of the prompt: run perplexity tasks in a sweep without it")
    if runs and scored:
        raise InputError(f"{runs[0]} combines its runs' logits only for the tokens it generates, and {scored[0]} "
                         "scores every position of the prompt: run perplexity tasks in a sweep without it")
    return Sweep(model, parsed, tuple(method_specs), parse_lengths(lengths),
                parse_depths(depths) if depths else DEFAULT_DEPTHS, samples, chat, kernel, corpus, chunk, first_seed,
                sort_rounds)


def pending(sweep: Sweep, out: Path) -> tuple[dict[Cell, list[tuple[float | None, int]]], list, int]:
    """Work left per cell, the unreadable lines of ``results.jsonl``, and how many samples are done."""
    rows, bad = read_rows(out / "results.jsonl")
    others = sorted({r["model"] for r in rows} - {sweep.model})
    if others:
        raise InputError(f"{out} holds results of another model ({', '.join(others)}); "
                         "use a separate --out folder per model")
    done = {row_key(r) for r in rows}
    todo: dict[Cell, list[tuple[float | None, int]]] = {}
    finished = 0
    for cell in sweep.cells():
        left = [p for p in sweep.points(cell.task) if sweep.key(cell, *p) not in done]
        finished += sweep.samples - len(left)
        if left:
            todo[cell] = left
    return todo, bad, finished


class SampleBank:
    """Prompts are built once per (task, length, depth, seed) and shared by every method.

    Attention-sorted prompts are also kept in ``store`` (the eval folder's ``sorted/``), one JSON per prompt and
    rounds, naming the ``model`` that sorted them: a resumed sweep, and Ray workers sharing the folder, answer the
    order sorted first instead of sorting again (the rows' ``sort_s`` is that sorting's time)."""

    def __init__(self, tokenizer, corpus: Corpus, chat: bool, store: Path | None = None, model: str = ""):
        self.tokenizer, self.corpus, self.chat = tokenizer, corpus, chat
        self.store, self.model = store, model
        self._cache: dict[tuple, Sample] = {}
        self._sorted: dict[tuple, SortedDocuments] = {}

    def get(self, task: Task, length: int, depth: float | None, seed: int) -> Sample:
        key = (task.spec(), length, depth, seed)
        if key not in self._cache:
            self._cache[key] = task.build(self.tokenizer, self.corpus, length, depth, seed, self.chat)
        return self._cache[key]

    def sorted(self, model, task: Task, length: int, depth: float | None, seed: int, rounds: int, kernel: str,
               chunk: int | None) -> SortedDocuments:
        """The sample's documents after ``rounds`` of attention sorting (dense), once per prompt: every method
        answers the same sorted prompt. Call it with no method applied to the model."""
        key = (task.spec(), length, depth, seed, rounds)
        if key not in self._sorted:
            sample = self.get(task, length, depth, seed)
            docs = sample.documents
            if docs is None:
                raise InputError(f"task {task.spec()} built a prompt without documents: nothing to sort")
            path = None if self.store is None else self.store / f"{prompt_sha(sample)}-{rounds}.json"
            found = _read_sorted(path, docs, self.model) if path is not None else None
            if found is None:
                found = sort_documents(model, self.tokenizer, docs.documents, docs.prefix, docs.question,
                                       separator=docs.separator, rounds=rounds,
                                       add_special_tokens=not sample.chat, chunk=chunk, kernel=kernel)
                if path is not None:
                    _write_sorted(path, found, self.model)
            self._sorted[key] = found
        return self._sorted[key]


def _read_sorted(path: Path, docs: Documents, model: str) -> SortedDocuments | None:
    """A stored sorting of this prompt by this model, or None (none yet, another model's, or unreadable: it is
    sorted again and rewritten)."""
    try:
        record = json.loads(path.read_text())
        return SortedDocuments.from_record(docs, record) if record.get("model") == model else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_sorted(path: Path, found: SortedDocuments, model: str) -> None:
    """Keep a sorting for later runs; a folder that cannot take it only costs sorting again (a warning)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # workers may write the same prompt: whole files only
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"model": model, **found.record()}))
        tmp.replace(path)
    except OSError as err:
        warnings.warn(f"longreach: could not keep the attention sorting in {path.parent} ({err}); a resumed run "
                      "sorts this prompt again", RuntimeWarning, stacklevel=2)


def sorting_fields(sample: Sample, result: SortedDocuments | None) -> dict:
    """What a row records of attention sorting: its rounds and cost, where the gold document went."""
    if result is None:
        return {}
    gold = sample.meta.get("gold_document")
    return {"sort_rounds": result.rounds, "sort_s": result.seconds, "sort_tokens": sum(result.tokens),
            "gold_document_sorted": result.position(gold) if gold is not None else None,
            "sorted_prompt_sha": prompt_sha(dataclasses.replace(sample, prompt=result.prompt))}


def preflight(sweep: Sweep, todo: dict[Cell, list], tokenizer, corpus: Corpus) -> None:
    """Build one pending prompt per task x length before the model loads: impossible lengths fail now."""
    seen = set()
    for cell, points in todo.items():
        if (cell.task.spec(), cell.length) not in seen:
            seen.add((cell.task.spec(), cell.length))
            try:
                cell.task.build(tokenizer, corpus, cell.length, points[0][0], points[0][1], sweep.chat)
            except (InputError, ValueError) as err:
                raise InputError(f"task {cell.task.spec()} at length {cell.length}: {err}") from None


def run_cells(sweep: Sweep, todo: dict[Cell, list], model, tokenizer, corpus: Corpus,
              on_sample: Callable[[Cell], None] | None = None, out: Path | None = None) -> Iterator[dict]:
    """Run the given cells, yielding finished rows (methods applied one at a time); attention-sorted prompts are
    kept in ``out/sorted`` when ``out`` is given."""
    from .. import __version__, apply
    from ..provenance import provenance

    bank = SampleBank(tokenizer, corpus, sweep.chat, store=out / SORTED if out is not None else None,
                      model=sweep.model)
    model_id = sweep.model
    for method in sweep.methods:
        cells = [c for c in todo if c.method == method]
        if not cells:
            continue
        if sweep.sort_rounds is not None:  # sorting runs dense, before the method is applied
            for cell in cells:
                for depth, seed in todo[cell]:
                    bank.sorted(model, cell.task, cell.length, depth, seed, sweep.sort_rounds, sweep.kernel,
                                sweep.chunk)
        with apply(model, method, kernel=sweep.kernel) as handle:
            warm_up(model, through_generate=handle.procedure is not None or handle.parallel is not None)
            for cell in cells:
                for depth, seed in todo[cell]:
                    sample = bank.get(cell.task, cell.length, depth, seed)
                    ordered = None if sweep.sort_rounds is None else bank.sorted(
                        model, cell.task, cell.length, depth, seed, sweep.sort_rounds, sweep.kernel, sweep.chunk)
                    answered = sample if ordered is None else dataclasses.replace(sample, prompt=ordered.prompt,
                                                                                documents=ordered.documents)
                    measured = run_sample(model, tokenizer, cell.task, answered, handle, sweep.chunk)
                    row = {
                        "model": model_id, "method": sweep.label(method), "task": cell.task.spec(),
                        "family": cell.task.name,
                        "metric": cell.task.metric, "length": cell.length, "depth": depth, "seed": seed,
                        "chat": sweep.chat_for(cell.task), "chat_applied": sample.chat, "corpus": corpus.name,
                        "gold": list(sample.gold), **measured,
                        "kernel": sweep.kernel, "chunk": sweep.chunk, "prompt_sha": prompt_sha(sample),
                        "version": __version__, "provenance": provenance(),
                        "host": platform.node(), "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                        **{k: v for k, v in sample.meta.items() if k != "ids"}, **sorting_fields(sample, ordered),
                    }
                    yield row
                    if on_sample:
                        on_sample(cell)


def run_local(sweep: Sweep, out: Path, todo: dict[Cell, list], model, tokenizer, corpus: Corpus,
              progress=None) -> int:
    """Append every row of ``todo`` to ``out/results.jsonl``; returns how many were written."""
    written = 0
    with ResultsWriter(out / "results.jsonl") as writer:
        for row in run_cells(sweep, todo, model, tokenizer, corpus, on_sample=progress, out=out):
            writer.append(row)
            written += 1
    return written


def record_sweep(sweep: Sweep, out: Path, argv: list[str] | None) -> None:
    """Record how the folder was produced (appended per invocation: resumes are visible)."""
    import json
    import shlex

    out.mkdir(parents=True, exist_ok=True)
    entry = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "model": sweep.model,
             "command": shlex.join(argv) if argv else None, "tasks": [t.spec() for t in sweep.tasks],
             "methods": list(sweep.methods), "lengths": list(sweep.lengths), "samples": sweep.samples,
             "depths": list(sweep.depths), "chat": sweep.chat, "kernel": sweep.kernel, "corpus": sweep.corpus,
             "chunk": sweep.chunk, "first_seed": sweep.first_seed, "sort_documents": sweep.sort_rounds}
    with open(out / "runs.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
