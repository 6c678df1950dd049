"""Evaluation: task generators on real prose, a resumable sweep runner, and reports.

    from longreach.eval import make_sweep, parse_task
    task = parse_task("niah:variant=multikey")
    sample = task.build(tokenizer, Corpus.load(), length=4096, depth=0.5, seed=0, chat=True)
"""

from .corpus import Corpus
from .measure import run_sample
from .report import build_report
from .runner import Sweep, make_sweep, pending, run_local
from .tasks import TASKS, Sample, Task, parse_task, parse_tasks

__all__ = ["TASKS", "Corpus", "Sample", "Sweep", "Task", "build_report", "make_sweep", "parse_task", "parse_tasks",
           "pending", "run_local", "run_sample"]
