"""``--executor ray``: the same sweep, its cells spread over Ray actors, rows gathered by the driver.

Each actor loads the model once and runs whole cells (method x task x length); the driver is the
only writer of ``results.jsonl``, appending a cell's rows as soon as it finishes, so resuming works
exactly as with the local executor. ``ray.init()`` joins the cluster named by ``RAY_ADDRESS`` if set,
else starts a local one (enough on a single machine).
"""

from __future__ import annotations

import os

from ..errors import LongreachError
from .results import ResultsWriter


def check_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        hint = "--executor ray needs Ray: pip install 'longreach[ray]' (or use --executor local)"
        raise LongreachError(hint) from None


class CellWorker:
    """Holds one loaded model; runs cells on request (wrapped as a Ray actor by :func:`run_ray`)."""

    def __init__(self, sweep, threads: int, out=None):
        import torch

        from ..models import load_model
        from .corpus import Corpus

        torch.set_num_threads(threads)
        self.sweep, self.out = sweep, out  # the eval folder: workers sharing it share attention-sorted prompts
        self.model, self.tokenizer = load_model(sweep.model)
        self.corpus = Corpus.load(sweep.corpus)

    def run(self, cell, points) -> list[dict]:
        from .runner import run_cells

        return list(run_cells(self.sweep, {cell: points}, self.model, self.tokenizer, self.corpus, out=self.out))


def run_ray(sweep, out, todo: dict, workers: int = 2, quiet: bool = False, console=None) -> int:
    import ray
    from ray.util import ActorPool

    if workers < 1:
        raise LongreachError("--workers must be >= 1")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=not quiet, logging_level="ERROR")
    cpus = int(ray.available_resources().get("CPU", 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    actor = ray.remote(num_cpus=min(1, cpus))(CellWorker)
    pool = ActorPool([actor.remote(sweep, threads, out) for _ in range(workers)])
    written = 0
    cells = list(todo)
    with ResultsWriter(out / "results.jsonl") as writer:
        for rows in pool.map_unordered(lambda a, cell: a.run.remote(cell, todo[cell]), cells):
            for row in rows:
                writer.append(row)
            written += len(rows)
            if console is not None and not quiet and rows:
                console.print(f"[dim]{rows[0]['method']} · {rows[0]['task']} · {rows[0]['length']}: "
                              f"{len(rows)} samples ({written} written)[/dim]")
    return written
