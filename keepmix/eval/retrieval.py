"""Retrieval for open-book evaluation and RAFT-style data: a corpus of documents and BM25 over it.

Contract:
  - `read_corpus(path, ...)` reads documents with ids: JSONL / JSON / Parquet records (the text from
    `text_field`, or a source's format: prompt_completion is prompt + completion, chat its contents one a
    line), or a text file whose blank-line-separated paragraphs are the documents. A document's id is its
    `id_field` (a string or an integer, compared as text), else its 0-based position. Ids must be unique,
    and the corpus non-empty; each problem is a `KeepmixError` naming the file and the record.
  - `BM25Index(texts)` indexes the texts with `bm25s` (an optional extra, `keepmix[retrieval]`; its
    absence is a `KeepmixError` naming the extra) — lowercased words of two or more characters, English
    stopwords removed, no stemming, Lucene BM25 with k1 = 1.5, b = 0.75. `top_k(queries, k)` returns each
    query's best min(k, corpus size) document positions, best first; equal scores keep corpus order, so
    the result is a function of the corpus and the query alone.
  - `retrieve(corpus, queries, k)` is `top_k` on a corpus, kept per process (retrieval does not depend on
    the model, so a run's evals rank each question once).
  - `recall_at_k(retrieved, gold)`: the mean over items that name gold documents of the share of their
    gold documents among their retrieved ones (None when no item names one).
This is the one module that calls bm25s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keepmix.errors import KeepmixError

EXTRA = "pip install 'keepmix[retrieval]'"
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


@dataclass(frozen=True)
class Corpus:
    """Documents to retrieve from: ids and texts, in corpus order."""

    ids: tuple[str, ...]
    texts: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.ids, self.texts]).encode()).hexdigest()[:24]

    def position(self) -> dict[str, int]:
        return {doc_id: i for i, doc_id in enumerate(self.ids)}


def _document_text(doc: dict) -> str:
    if "messages" in doc:
        return "\n".join(m["content"] for m in doc["messages"])
    if "prompt" in doc:
        return doc["prompt"] + doc["completion"]
    return doc["text"]


def read_corpus(path: str, *, format: str = "text", fields: dict[str, str] | None = None, id_field: str = "id",
                hf_config: str | None = None, hf_split: str | None = None, max_docs: int | None = None) -> Corpus:
    """The documents of a file or source (see the module doc)."""
    from keepmix.data.sources import canonical, read_located_records

    local = Path(path)
    if local.is_file() and local.suffix.lower() in _TEXT_SUFFIXES:
        paragraphs = [p.strip() for p in local.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        if not paragraphs:
            raise KeepmixError(f"{path}: the corpus holds no documents (expected paragraphs separated by blank lines)")
        return Corpus(tuple(str(i) for i in range(len(paragraphs))), tuple(paragraphs))
    fields = {"text": "text", "messages": "messages", "prompt": "prompt", "completion": "completion", **(fields or {})}
    records = read_located_records(path, hf_config=hf_config, hf_split=hf_split,
                                   hint="; expected one JSON object per line")
    rows = list(zip(records.rows, records.locations))[:max_docs]
    ids, texts = [], []
    for i, (row, where) in enumerate(rows):
        try:
            texts.append(_document_text(canonical(row, format, fields)))
        except ValueError as err:
            raise KeepmixError(f"{where}: corpus document {i}: {err}") from None
        doc_id = row.get(id_field, i)
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise KeepmixError(f"{where}: corpus document {i}: field {id_field!r} must be a string or an integer, "
                               f"got {type(doc_id).__name__}")
        ids.append(str(doc_id))
    if not ids:
        raise KeepmixError(f"{path}: the corpus holds no documents")
    seen: set[str] = set()
    for doc_id, (_, where) in zip(ids, rows):
        if doc_id in seen:
            raise KeepmixError(f"{where}: corpus document id {doc_id!r} appears twice; ids ({id_field!r}) must be unique")
        seen.add(doc_id)
    return Corpus(tuple(ids), tuple(texts))


def require_bm25s(what: str):
    """The bm25s module, or a KeepmixError saying that `what` needs the retrieval extra."""
    try:
        import bm25s
    except ImportError as err:
        raise KeepmixError(f"{what} needs the BM25 library bm25s, an optional extra: {EXTRA} ({err})") from None
    return bm25s


class BM25Index:
    """BM25 over a list of texts (see the module doc)."""

    def __init__(self, texts: list[str] | tuple[str, ...], what: str = "retrieval"):
        self._bm25s = require_bm25s(what)
        self.size = len(texts)
        self._index = self._bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        self._index.index(self._tokens(list(texts)), show_progress=False)

    def _tokens(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def top_k(self, queries: list[str], k: int) -> list[list[int]]:
        out = []
        for tokens in self._tokens(queries):
            scores = self._index.get_scores(tokens) if tokens else np.zeros(self.size, dtype=np.float32)
            out.append(np.argsort(-np.asarray(scores), kind="stable")[:k].tolist())
        return out


_RETRIEVED: dict[str, list[list[int]]] = {}


def retrieve(corpus: Corpus, queries: list[str], k: int, what: str = "retrieval") -> list[list[int]]:
    """Each query's top-k document positions in `corpus` (kept per process; see the module doc)."""
    key = hashlib.sha256(json.dumps([corpus.fingerprint, k, queries]).encode()).hexdigest()
    if key not in _RETRIEVED:
        _RETRIEVED[key] = BM25Index(corpus.texts, what).top_k(queries, k)
    return _RETRIEVED[key]


def recall_at_k(retrieved: list[list[str]], gold: list[tuple[str, ...] | None]) -> float | None:
    """Mean share of each item's gold documents among its retrieved ones, over items with gold documents."""
    shares = [len(set(g) & set(r)) / len(set(g)) for r, g in zip(retrieved, gold, strict=True) if g]
    return float(np.mean(shares)) if shares else None
