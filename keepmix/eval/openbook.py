"""Open-book evaluation: the same items closed-book and with retrieved documents in their prompt.

Contract of an `open_book` task (keepmix.eval.tasks.OpenBookTask):
  - the corpus is a source of the run (its records, in its format, the first `max_docs`; a generated
    source cannot serve) or a file (`keepmix.eval.retrieval.read_corpus`); `load_book` reads it and the
    items, checking every item as its `scoring` kind does (`mc_items` / `gen_items`) and every `gold_doc`
    (an id or a list of ids, optional per item) against the corpus ids: a `KeepmixError` names the file,
    the item and the field;
  - each item's question (`prompt_field`) is the BM25 query; its top-k documents, best first, joined by
    `separator`, fill `{documents}` of `template`, and the question fills `{question}`; closed-book, the
    question fills `closed_template`;
  - the prompts are scored by the ordinary scorers: `score_multiple_choice` (acc, acc_norm, acc_bytes, n)
    or `score_generation` (exact_match, n). Metrics, without the `task/<name>/` prefix: `open/<metric>`,
    `closed/<metric>` (when `closed_book`), and `recall@<k>` (see `recall_at_k`) when any item names a
    gold document.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from keepmix.errors import KeepmixError
from keepmix.eval.retrieval import Corpus, read_corpus, recall_at_k, retrieve

if TYPE_CHECKING:
    from keepmix.config import SourceConfig
    from keepmix.eval.tasks import OpenBookTask


@dataclass(frozen=True)
class Book:
    """An open-book task's items (as its scoring kind's items, the question in their prompt), their
    questions, their gold document ids (None: the item names none) and the corpus."""

    items: list
    questions: list[str]
    gold: list[tuple[str, ...] | None]
    corpus: Corpus


def corpus_source(task: OpenBookTask, sources: list[SourceConfig]) -> SourceConfig | None:
    """The run's source that `task.corpus` names, or None when it names a file."""
    return next((s for s in sources if s.name == task.corpus), None)


def read_task_corpus(task: OpenBookTask, base_dir: Path, sources: list[SourceConfig]) -> Corpus:
    from keepmix.eval.tasks import resolve_path

    source = corpus_source(task, sources)
    if source is None:
        path = Path(resolve_path(task.corpus, base_dir))
        if not path.is_file():
            raise KeepmixError(f"corpus: {task.corpus!r} is neither a source of the run "
                               f"({', '.join(s.name for s in sources) or 'none given'}) nor a file ({path} not found)")
        return read_corpus(str(path), fields={"text": task.corpus_text_field}, id_field=task.corpus_id_field)
    if source.path is None:
        raise KeepmixError(f"corpus: source {source.name!r} is generated (self-rehearsal); retrieve from a source "
                           f"with data or a file")
    fields = {"text": source.text_field, "messages": source.messages_field, "prompt": source.prompt_field,
              "completion": source.completion_field}
    return read_corpus(resolve_path(source.path, base_dir), format=source.format, fields=fields,
                       id_field=task.corpus_id_field, hf_config=source.hf_config, hf_split=source.hf_split,
                       max_docs=source.max_docs)


def _gold_docs(row: dict, task: OpenBookTask, where: str, ids: dict[str, int]) -> tuple[str, ...] | None:
    value = row.get(task.gold_doc_field)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in values):
        raise KeepmixError(f"{where}: field {task.gold_doc_field!r} must be a document id (a string or an "
                           f"integer) or a non-empty list of them, got {value!r}")
    unknown = [str(v) for v in values if str(v) not in ids]
    if unknown:
        raise KeepmixError(f"{where}: field {task.gold_doc_field!r} names {', '.join(map(repr, unknown))}, "
                           f"not a document id of the corpus ({len(ids)} documents)")
    return tuple(str(v) for v in values)


def load_book(task: OpenBookTask, rows: list[dict], source: str, base_dir: Path,
              sources: list[SourceConfig]) -> Book:
    """The validated items, questions and gold documents of `rows` (from file `source`), and the corpus."""
    from keepmix.eval.tasks import gen_items, mc_items

    corpus = read_task_corpus(task, base_dir, sources)
    if task.scoring == "multiple_choice":
        items = mc_items(rows, task, source, context_field=task.prompt_field)
        questions = [item.context for item in items]
    else:
        items = gen_items(rows, task, source)
        questions = [item.prompt for item in items]
    ids = corpus.position()
    gold = [_gold_docs(row, task, f"{source}: item {i}", ids) for i, row in enumerate(rows)]
    return Book(items, questions, gold, corpus)


def open_prompt(task: OpenBookTask, question: str, documents: list[str]) -> str:
    return task.template.replace("{documents}", task.separator.join(documents)).replace("{question}", question)


def closed_prompt(task: OpenBookTask, question: str) -> str:
    return task.closed_template.replace("{question}", question)


def _with_prompts(task: OpenBookTask, items: list, prompts: list[str]) -> list:
    """The items with their question replaced by `prompts` (MCItem.context / GenItem.prompt)."""
    field = "context" if task.scoring == "multiple_choice" else "prompt"
    return [dataclasses.replace(item, **{field: p}) for item, p in zip(items, prompts, strict=True)]


def score_open_book(task: OpenBookTask, model, tokenizer, book: Book, *, batch_size: int, device) -> dict[str, float]:
    """open/..., closed/... and recall@k of one open-book task (see the module doc)."""
    from keepmix.eval.choice import score_multiple_choice
    from keepmix.eval.generate import score_generation

    def score(items: list) -> dict[str, float]:
        if task.scoring == "multiple_choice":
            return score_multiple_choice(model, tokenizer, items, batch_size=batch_size, device=device,
                                         target_delimiter=task.target_delimiter)
        return score_generation(model, tokenizer, items, max_new_tokens=task.max_new_tokens, stop=task.stop,
                                batch_size=batch_size, device=device, lowercase=task.lowercase, regex=task.regex)

    top = retrieve(book.corpus, book.questions, task.k, what=f"task {task.name!r} (kind open_book)")
    opened = [open_prompt(task, q, [book.corpus.texts[j] for j in docs]) for q, docs in zip(book.questions, top)]
    metrics = {f"open/{key}": value for key, value in score(_with_prompts(task, book.items, opened)).items()}
    if task.closed_book:
        closed = [closed_prompt(task, q) for q in book.questions]
        metrics.update({f"closed/{key}": value for key, value in score(_with_prompts(task, book.items, closed)).items()})
    recall = recall_at_k([[book.corpus.ids[j] for j in docs] for docs in top], book.gold)
    if recall is not None:
        metrics[f"recall@{task.k}"] = recall
    return metrics
