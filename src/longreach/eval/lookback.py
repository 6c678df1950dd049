"""A labelled set for the Lookback Lens detector, built from the eval tasks: generate, score, label.

Label 1 (``hallucinated``) means the greedy answer failed the task's scorer against its gold answer (a wrong
pass key, a missed needle); 0 means it was right. That is a *proxy* for the paper's labels (human or GPT-4
annotation of contextual hallucinations in summaries and QA): a wrong retrieval is one kind of answer not
supported by the context, and a correct one can still hold unsupported text beyond the scored value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ..analysis import lookback_ratios
from ..generation import eos_ids
from .corpus import Corpus
from .tasks import Task


def labelled_rows(model, tokenizer, task: Task, corpus: Corpus, samples: Iterable[tuple[int, float, int]],
                  chat: bool = True, max_new_tokens: int | None = None, kernel: str = "auto",
                  progress: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """One row per (length, depth, seed) of ``samples``: the answer's lookback features, its score and the label."""
    eos = eos_ids(model, tokenizer)
    for length, depth, seed in samples:
        sample = task.build(tokenizer, corpus, length, depth, seed, chat)
        ids = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=not sample.chat)["input_ids"]
        run = lookback_ratios(model, ids, max_new_tokens or sample.max_new_tokens, eos, kernel)
        prediction = tokenizer.decode(run.tokens, skip_special_tokens=True).strip()
        score = task.score(prediction, sample.gold)
        row = {"label": int(score < 1.0), "score": score, "prediction": prediction, "gold": list(sample.gold),
               "task": sample.task, "length": length, "tokens": sample.tokens, "depth": sample.depth,
               "seed": seed, "layers": run.layers, "heads": int(run.ratios.shape[2]),
               "features": [round(x, 6) for x in run.features().tolist()]}
        if progress is not None:
            progress(row)
        yield row
