"""Task evaluators as configured under `eval.tasks`, and `run_task` that runs one of them.

Contract: `TaskConfig` is the union of the task kinds, told apart by `kind` (the config wraps it in a
discriminator on that field): `multiple_choice`, `generation`, `sql_execution`, `lm_eval`
(lm-evaluation-harness tasks, run by `keepmix.eval.harness`, an optional extra) and `open_book` (items
closed-book and with BM25-retrieved documents prepended, `keepmix.eval.openbook`, an optional extra). (The `token_accuracy`
figures come from the training loop's validation pass, not from here.) Unknown keys are errors.
`load_items` reads a task's items (`keepmix.data.sources.read_records`), keeps the first `limit` and
checks every item — a missing or mistyped field, or a gold index out of range, is a `KeepmixError`
naming the file, the item index (0-based position among the items read) and the field; `check_tasks`
does that for every task before a run starts. `run_task` scores a model on one task and returns the
task's metrics without the `task/<name>/` prefix:
  multiple_choice  {acc, acc_norm, acc_bytes, n}
  generation       {exact_match, n}
  sql_execution    {acc, acc/<group>..., n}
  lm_eval          {<lm-eval task>/<metric>, <lm-eval task>/<metric>_stderr, <lm-eval task>/n, ...}
                   (see keepmix.eval.harness; `check_tasks` also loads and checks its harness tasks)
  open_book        {open/<metric>, closed/<metric>, recall@<k>} with the metrics of its `scoring` kind
                   (see keepmix.eval.openbook; its corpus may be one of the run's `sources`)
Relative paths (items, database) resolve against `base_dir`, the config file's folder; a path that is
not found there and does not look like a file stays as it is (a hub dataset id). The batch size is the
task's own `batch_size`, else the `batch_size` argument (the eval-wide one), else 8.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from keepmix.errors import KeepmixError, raise_all

# keepmix.config imports this module to validate configs: the evaluators (torch, transformers) are
# imported where they run, so that loading a config stays fast.
if TYPE_CHECKING:
    import torch

    from keepmix.config import SourceConfig
    from keepmix.eval.openbook import Book
    from keepmix.eval.choice import MCItem
    from keepmix.eval.generate import GenItem
    from keepmix.eval.sql import SQLItem

DEFAULT_BATCH_SIZE = 8
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_LOCAL_SUFFIXES = {".jsonl", ".ndjson", ".json", ".parquet", ".sqlite", ".sqlite3", ".db"}


class _Named(BaseModel):
    """What every task kind has: a name, a batch size and a retention tolerance."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Task name (letters, digits, _ . -); its metrics are task/<name>/<metric>.")
    batch_size: int | None = Field(
        None, gt=0, description="Sequences per forward pass / generate call (default: eval.batch_size)."
    )
    tolerance: float | None = Field(
        None, ge=0, description="Retention tolerance for this task's metrics (default: eval.retention_tolerance)."
    )

    @field_validator("name")
    @classmethod
    def _metric_safe(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("use only letters, digits, '_', '.' and '-' (the name becomes part of metric keys)")
        return value


class _Task(_Named):
    path: str = Field(
        description="Items: a JSONL / JSON / Parquet file, a dataset saved with save_to_disk, or a hub dataset id."
    )
    hf_config: str | None = Field(None, description="Hub dataset configuration name.")
    hf_split: str | None = Field(None, description="Dataset split to read (hub or saved datasets).")
    limit: int | None = Field(None, gt=0, description="Evaluate only the first N items.")


class _GeneratingTask(_Task):
    prompt_field: str = Field("prompt", description="Field holding the prompt.")
    max_new_tokens: int = Field(64, gt=0, description="Most tokens generated per item.")
    stop: list[str] = Field(
        default_factory=lambda: ["\n"], description="Generation stops at (and before) any of these."
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value


class MultipleChoiceTask(_Task):
    """Pick the choice with the highest log-likelihood given the context (lm-evaluation-harness rules)."""

    kind: Literal["multiple_choice"] = Field(description="Score choices by log-likelihood.")
    context_field: str = Field("context", description="Field holding the context (question) text.")
    choices_field: str = Field("choices", description="Field holding the list of choice strings.")
    gold_field: str = Field("gold", description="Field holding the index of the right choice (0-based).")
    target_delimiter: str = Field(" ", description="Text between the context and each choice.")


class _Matching(BaseModel):
    """How a generated answer is compared with the expected one (exact match after normalization)."""

    answer_field: str = Field("answer", description="Field holding the expected answer.")
    lowercase: bool = Field(False, description="Compare case-insensitively (after strip + whitespace collapse).")
    regex: str | None = Field(
        None, description="Extract the answer from the generation: the first match's first group (or whole match)."
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        return value


class GenerationTask(_GeneratingTask, _Matching):
    """Greedy generation scored by exact match after normalization."""

    kind: Literal["generation"] = Field(description="Generate and compare with the answer.")


class SQLExecutionTask(_GeneratingTask):
    """Generate SQL and compare its result rows with the gold query's on a read-only SQLite database."""

    kind: Literal["sql_execution"] = Field(description="Execute generated SQL against a database.")
    sql_field: str = Field("sql", description="Field holding the gold SQL query.")
    group_field: str = Field("group", description="Optional field grouping items (reported as acc/<group>).")
    database: str = Field(description="SQLite database file the queries run against (never modified).")
    max_new_tokens: int = Field(128, gt=0, description="Most tokens generated per item.")
    stop: list[str] = Field(
        default_factory=lambda: [";", "\n\n"], description="Generation stops at (and before) any of these."
    )
    timeout_s: float = Field(5.0, gt=0, description="Time limit of each query, in seconds.")
    max_rows: int = Field(10_000, gt=0, description="A query returning more rows than this counts as failed.")


class LmEvalTask(_Named):
    """lm-evaluation-harness tasks (hub or local YAML) scored on the in-memory model by the harness itself."""

    kind: Literal["lm_eval"] = Field(description="Run lm-evaluation-harness tasks (extra: keepmix[lmeval]).")
    tasks: list[str] = Field(
        min_length=1, description="Harness task, group or tag names (arc_easy, hellaswag, mmlu, ...) or YAML files."
    )
    include_path: list[str] = Field(
        default_factory=list, description="Folders of your own task YAMLs (relative to the config file)."
    )
    limit: int | None = Field(None, gt=0, description="Score only the first N documents of every harness task.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (default: each task's own setting).")
    metrics: list[str] | None = Field(None, min_length=1, description="Keep only these metrics (default: all).")
    apply_chat_template: bool = Field(False, description="Wrap prompts in the tokenizer's chat template.")
    bootstrap_iters: int = Field(
        1000, ge=0, description="Bootstrap resamples for stderrs without a closed form (0: none)."
    )

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


_CHOICE_KEYS = ("choices_field", "gold_field", "target_delimiter")
_GENERATION_KEYS = ("answer_field", "lowercase", "regex", "max_new_tokens", "stop")


class OpenBookTask(_GeneratingTask, _Matching):
    """Items asked twice: closed-book, and open-book with the top-k BM25 documents of a corpus prepended
    (keepmix.eval.openbook; extra: keepmix[retrieval])."""

    kind: Literal["open_book"] = Field(description="Closed-book vs retrieved-context (BM25) evaluation.")
    scoring: Literal["generation", "multiple_choice"] = Field(
        "generation", description="Score items as generation (exact match) or multiple choice (log-likelihood)."
    )
    prompt_field: str = Field("question", description="Field holding the question: the retrieval query and the "
                              "templates' {question}.")
    max_new_tokens: int = Field(32, gt=0, description="Most tokens generated per item (scoring: generation).")
    choices_field: str = Field("choices", description="Field holding the choices (scoring: multiple_choice).")
    gold_field: str = Field("gold", description="Field holding the right choice's index (scoring: multiple_choice).")
    target_delimiter: str = Field(" ", description="Text between the prompt and each choice (multiple_choice).")
    gold_doc_field: str = Field("gold_doc", description="Optional field: the id (or list of ids) of the corpus "
                                "document(s) holding the answer; items that have it give recall@k.")
    corpus: str = Field(description="What is retrieved from: a source of this run (by name) or a file (JSONL "
                        "records, or text with one document per blank-line-separated paragraph).")
    corpus_text_field: str = Field("text", description="Field of a JSONL corpus file holding a document's text.")
    corpus_id_field: str = Field("id", description="Field holding a document's id (else its 0-based position).")
    k: int = Field(3, gt=0, description="Documents retrieved per question.")
    template: str = Field("{documents}\n\n{question}", description="Open-book prompt: {documents} (the retrieved "
                          "documents, best first, joined by `separator`) and {question}.")
    closed_template: str = Field("{question}", description="Closed-book prompt, with {question}.")
    separator: str = Field("\n", description="Between retrieved documents in {documents}.")
    closed_book: bool = Field(True, description="Also score the items closed-book.")

    @field_validator("template")
    @classmethod
    def _both_placeholders(cls, value: str) -> str:
        missing = [p for p in ("{documents}", "{question}") if p not in value]
        if missing:
            raise ValueError(f"the template needs the placeholder(s) {' and '.join(missing)}")
        return value

    @field_validator("closed_template")
    @classmethod
    def _question_placeholder(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("the closed-book template needs the placeholder {question}")
        return value

    @model_validator(mode="after")
    def _keys_of_the_scoring(self) -> OpenBookTask:
        other = _CHOICE_KEYS if self.scoring == "generation" else _GENERATION_KEYS
        given = [key for key in other if key in self.model_fields_set]
        if given:
            raise ValueError(f"{', '.join(given)}: not used with scoring: {self.scoring}")
        return self


TaskConfig = MultipleChoiceTask | GenerationTask | SQLExecutionTask | LmEvalTask | OpenBookTask


def resolve_path(path: str, base_dir: Path) -> str:
    """`path` against `base_dir` when it is relative and local; a hub id stays as it is."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return str(p)
    candidate = Path(base_dir) / p
    if candidate.exists() or path.startswith((".", "/")) or p.suffix.lower() in _LOCAL_SUFFIXES:
        return str(candidate.resolve())
    return path


def task_tolerances(tasks: list[TaskConfig]) -> dict[str, float]:
    """Per-task retention overrides, keyed by metric prefix, for `compute_retention`."""
    return {f"task/{t.name}": t.tolerance for t in tasks if t.tolerance is not None}


def _field(row: dict, name: str, where: str, types: tuple, what: str):
    if name not in row:
        raise KeepmixError(f"{where}: missing field {name!r} (fields: {', '.join(map(str, row)) or 'none'})")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, types):
        raise KeepmixError(f"{where}: field {name!r} must be {what}, got {type(value).__name__} {value!r}")
    return value


def mc_items(rows: list[dict], task: MultipleChoiceTask | OpenBookTask, source: str,
             context_field: str | None = None) -> list[MCItem]:
    """Validated multiple-choice items (the context from `context_field`, default the task's); errors name
    `source`, the item index and the field."""
    from keepmix.eval.choice import MCItem

    items = []
    for i, row in enumerate(rows):
        where = f"{source}: item {i}"
        context = _field(row, context_field or task.context_field, where, (str,), "a string")
        choices = _field(row, task.choices_field, where, (list, tuple), "a list of strings")
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise KeepmixError(
                f"{where}: field {task.choices_field!r} must list at least 2 non-empty strings, got {choices!r}"
            )
        gold = _field(row, task.gold_field, where, (int,), "an integer index into the choices")
        if not 0 <= gold < len(choices):
            raise KeepmixError(
                f"{where}: field {task.gold_field!r} is {gold}, out of range for {len(choices)} choices "
                f"(expected 0..{len(choices) - 1})"
            )
        items.append(MCItem(context, tuple(choices), gold))
    return items


def gen_items(rows: list[dict], task: GenerationTask | OpenBookTask, source: str) -> list[GenItem]:
    """Validated generation items; a numeric answer is compared as its text."""
    from keepmix.eval.generate import GenItem

    items = []
    for i, row in enumerate(rows):
        where = f"{source}: item {i}"
        prompt = _field(row, task.prompt_field, where, (str,), "a string")
        answer = _field(row, task.answer_field, where, (str, int), "a string (or an integer)")
        items.append(GenItem(prompt, str(answer)))
    return items


def sql_items(rows: list[dict], task: SQLExecutionTask, source: str) -> list[SQLItem]:
    """Validated text-to-SQL items; the group field is optional per item."""
    from keepmix.eval.sql import SQLItem

    items = []
    for i, row in enumerate(rows):
        where = f"{source}: item {i}"
        prompt = _field(row, task.prompt_field, where, (str,), "a string")
        sql = _field(row, task.sql_field, where, (str,), "a string")
        if not sql.strip():
            raise KeepmixError(f"{where}: field {task.sql_field!r} is empty; expected the gold SQL query")
        group = None
        if row.get(task.group_field) is not None:
            group = str(_field(row, task.group_field, where, (str, int), "a string"))
        items.append(SQLItem(prompt, sql, group))
    return items


def load_items(task: TaskConfig, base_dir: Path, sources: list[SourceConfig] = ()) -> list | Book:
    """The task's validated items (the first `limit`); KeepmixError naming the file, item and field. An
    `open_book` task gives a `Book` (its items, gold documents and corpus; `sources`: the run's sources)."""
    from keepmix.data.sources import read_records

    source = resolve_path(task.path, base_dir)
    rows = read_records(source, hf_split=task.hf_split, hf_config=task.hf_config)
    if task.limit is not None:
        rows = rows[: task.limit]
    if not rows:
        raise KeepmixError(f"{source} holds no items")
    if isinstance(task, MultipleChoiceTask):
        return mc_items(rows, task, source)
    if isinstance(task, GenerationTask):
        return gen_items(rows, task, source)
    if isinstance(task, OpenBookTask):
        from keepmix.eval.openbook import load_book

        return load_book(task, rows, source, base_dir, list(sources))
    database = Path(resolve_path(task.database, base_dir))
    if not database.is_file():
        raise KeepmixError(f"database: file not found: {database}")
    return sql_items(rows, task, source)


def task_directions(tasks: list[TaskConfig], base_dir: Path) -> dict[str, dict[str, bool]]:
    """The harness's higher_is_better of each `lm_eval` task's metrics, keyed by metric prefix, for
    `compute_retention` (the other kinds follow the metric-name rule)."""
    from keepmix.eval import harness

    return {f"task/{t.name}/{entry}": hib for t in tasks if isinstance(t, LmEvalTask)
            for entry, hib in harness.directions(t, base_dir).items()}


def check_tasks(tasks: list[TaskConfig], base_dir: Path, sources: list[SourceConfig] = ()) -> None:
    """Read and validate every task's items (load and check an `lm_eval` task's harness tasks; an
    `open_book` task's corpus and its retrieval library) before any work, reporting all problems together."""
    from keepmix.eval import harness
    from keepmix.eval.retrieval import require_bm25s

    problems = []
    for i, task in enumerate(tasks):
        try:
            if isinstance(task, LmEvalTask):
                harness.prepare(task, base_dir)
            else:
                if isinstance(task, OpenBookTask):
                    require_bm25s(f"task {task.name!r} (kind open_book)")
                load_items(task, base_dir, sources)
        except KeepmixError as err:
            problems.append(f"eval.tasks[{i}] ({task.name}): {err}")
    raise_all(problems, "the task files")


def run_task(
    task: TaskConfig,
    model,
    tokenizer,
    *,
    base_dir: Path,
    device: torch.device | str,
    batch_size: int | None = None,
    sources: list[SourceConfig] = (),
) -> dict[str, float]:
    """Metrics of `model` on one task, without the `task/<name>/` prefix (see the module doc); `sources`:
    the run's sources, which an `open_book` task may retrieve from."""
    from keepmix.eval.choice import score_multiple_choice
    from keepmix.eval.generate import score_generation
    from keepmix.eval.sql import score_sql

    bs = task.batch_size or batch_size or DEFAULT_BATCH_SIZE
    if isinstance(task, LmEvalTask):
        from keepmix.eval import harness

        return harness.run(task, model, tokenizer, base_dir=base_dir, batch_size=bs)
    items = load_items(task, base_dir, sources)
    if isinstance(task, OpenBookTask):
        from keepmix.eval.openbook import score_open_book

        return score_open_book(task, model, tokenizer, items, batch_size=bs, device=device)
    if isinstance(task, MultipleChoiceTask):
        return score_multiple_choice(
            model, tokenizer, items, batch_size=bs, device=device, target_delimiter=task.target_delimiter
        )
    if isinstance(task, GenerationTask):
        return score_generation(
            model,
            tokenizer,
            items,
            max_new_tokens=task.max_new_tokens,
            stop=task.stop,
            batch_size=bs,
            device=device,
            lowercase=task.lowercase,
            regex=task.regex,
        )
    try:
        return score_sql(
            model,
            tokenizer,
            items,
            database=Path(resolve_path(task.database, base_dir)),
            max_new_tokens=task.max_new_tokens,
            stop=task.stop,
            batch_size=bs,
            device=device,
            timeout_s=task.timeout_s,
            max_rows=task.max_rows,
        )
    except KeepmixError as err:
        raise KeepmixError(f"task {task.name!r} ({resolve_path(task.path, base_dir)}): {err}") from None
