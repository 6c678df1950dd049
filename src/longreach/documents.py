"""A prompt made of documents: what attention sorting reorders and what document tasks build.

A foundation module (no torch): the eval tasks describe their prompts with it without importing the sorting
procedure, which runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class Documents:
    """A prompt made of documents: ``prefix + separator.join(documents) + question``.

    ``question`` is everything after the documents (the question, a chat template's end, an answer prefix).
    """

    documents: tuple[str, ...]
    prefix: str = ""
    question: str = ""
    separator: str = "\n\n"

    def __post_init__(self) -> None:
        object.__setattr__(self, "documents", tuple(self.documents))
        if not self.documents:
            raise InputError("attention sorting needs at least one document")
        empty = [i for i, d in enumerate(self.documents) if not d.strip()]
        if empty:
            raise InputError(f"documents {empty} are empty or whitespace: every document needs text of its own")

    @property
    def prompt(self) -> str:
        return self.prefix + self.separator.join(self.documents) + self.question

    def char_spans(self) -> list[tuple[int, int]]:
        """Each document's [start, end) in ``prompt``, in characters."""
        spans, at = [], len(self.prefix)
        for doc in self.documents:
            spans.append((at, at + len(doc)))
            at += len(doc) + len(self.separator)
        return spans

    def reordered(self, order: Sequence[int]) -> Documents:
        """The documents at positions ``order`` (``order[j]`` is the index of the document placed j-th)."""
        if sorted(order) != list(range(len(self.documents))):
            raise InputError(f"{list(order)} is not a permutation of the {len(self.documents)} documents")
        return Documents(tuple(self.documents[i] for i in order), self.prefix, self.question, self.separator)
