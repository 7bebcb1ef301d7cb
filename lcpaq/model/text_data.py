"""Text data for transformers models (issue 15 contract, item 3). This file holds only the type
the evaluation needs until the loader of text files lands (owner: the text-loading work):
query/document pairs for retrieval."""

from __future__ import annotations

from dataclasses import dataclass

from lcpaq.model.data import Dataset


@dataclass(frozen=True)
class RetrievalPairs:
    """Query/document pairs: row i of ``queries`` matches row i of ``documents`` (token inputs
    [N, 2, T] int64: ids and attention mask)."""

    queries: Dataset
    documents: Dataset
    source: str

    def __len__(self) -> int:
        return len(self.queries)
