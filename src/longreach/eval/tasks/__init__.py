"""Evaluation task families (generators + scorers) and their registry.

    passkey   a number hidden in repetitive filler (exact match)
    niah      needle(s) in real prose: single / multikey / multivalue / multiquery, words / numbers / uuids
    vt        variable tracking through chains of assignments
    cwe, fwe  common / frequent word extraction
    kvret     key-value retrieval from a JSON of uuid pairs, the gold pair swept from first to last
    ppl       perplexity on long real documents, per position bucket
"""

from __future__ import annotations

from ...configurable import parse_item, split_items
from ...errors import SpecError, did_you_mean
from .base import Sample, Task
from .kvret import KVRetrieval
from .niah import Niah
from .passkey import Passkey
from .ppl import Perplexity
from .vt import VariableTracking
from .words import CommonWords, FrequentWords

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    Passkey, Niah, VariableTracking, CommonWords, FrequentWords, KVRetrieval, Perplexity)}


def task_class(name: str) -> type[Task]:
    try:
        return TASKS[name]
    except KeyError:
        raise SpecError(f"unknown task '{name}': {did_you_mean(name, list(TASKS))}") from None


def parse_task(spec: str | Task) -> Task:
    """``niah:variant=multikey,value=uuids`` -> a Niah task; errors say how to fix the string."""
    if isinstance(spec, Task):
        return spec
    if not spec or not spec.strip():
        raise SpecError("empty task spec: give e.g. 'passkey' or 'niah:variant=multikey'")
    return parse_item(spec.strip(), task_class)  # type: ignore[return-value]


def parse_tasks(text: str) -> list[Task]:
    """A comma/semicolon list of task specs; duplicates are refused."""
    tasks = [parse_task(s) for s in split_items(text)]
    if not tasks:
        raise SpecError("no tasks given: e.g. --tasks passkey,niah")
    names = [t.spec() for t in tasks]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"task {', '.join(dupes)} given twice")
    return tasks


__all__ = ["TASKS", "CommonWords", "FrequentWords", "KVRetrieval", "Niah", "Passkey", "Perplexity", "Sample",
           "Task", "VariableTracking", "parse_task", "parse_tasks", "task_class"]
