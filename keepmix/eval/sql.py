"""SQL execution accuracy against a SQLite database that no query can change.

Contract: a predicted query is right when it runs and its result rows equal the gold query's rows —
as multisets, or as sequences when the gold query contains ORDER BY (anywhere, as in Spider's
evaluation). Rows are compared as tuples, so column order and count matter; floats are rounded to
6 decimals first so that equivalent arithmetic written differently still matches. A prediction that
fails (invalid SQL, a denied statement, over the time or row limit) is wrong, never a crash; a gold
query that fails is an error naming the item.

Safety, in layers, for every query:
  - the file is opened read-only (`file:...?mode=ro` URI), then `PRAGMA query_only=ON`;
  - an authorizer allows only reading tables, SELECT, (recursive) CTEs and functions (not
    load_extension): writes, DDL, PRAGMA, ATTACH/DETACH, transactions and VACUUM are denied;
  - one statement only (sqlite3's `execute` refuses a second one);
  - a progress handler aborts the query once `timeout_s` has passed (a runaway recursive CTE stops);
  - at most `max_rows` rows are fetched (more is a failure), and strings/blobs are capped in length.
The generated text is reduced to one statement by `extract_sql`: the first fenced code block if any,
then the text up to the first `;` that ends a complete statement.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import torch

from keepmix.errors import KeepmixError
from keepmix.eval.generate import generate_batch

_ALLOWED_ACTIONS = {sqlite3.SQLITE_READ, sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_DENIED_FUNCTIONS = {"load_extension"}
_PROGRESS_EVERY = 1000  # SQLite VM instructions between deadline checks
_MAX_VALUE_BYTES = 10_000_000  # longest string/blob a query may build (randomblob(1e12) must not OOM)
_FLOAT_DECIMALS = 6
_FENCE = re.compile(r"```[^\n`]*\n?(.*?)(?:```|$)", re.DOTALL)
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


@dataclass(frozen=True)
class SQLItem:
    """One text-to-SQL item: the prompt, the gold query, and an optional group (e.g. seen/unseen)."""

    prompt: str
    sql: str
    group: str | None = None


@dataclass(frozen=True)
class QueryResult:
    """The rows of a query, or why it failed (`rows` is None exactly when `error` is set)."""

    rows: list[tuple] | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def extract_sql(generation: str) -> str:
    """The first SQL statement of a generation (code fences stripped, without the final ';')."""
    fenced = _FENCE.search(generation)
    text = (fenced.group(1) if fenced else generation).strip()
    for at, char in enumerate(text):
        if char == ";" and sqlite3.complete_statement(text[: at + 1]):
            return text[:at].strip()
    return text


def _authorize(action, arg1, arg2, db_name, trigger):
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _connect(db_path: str | Path) -> sqlite3.Connection:
    path = Path(db_path)
    if not path.is_file():
        raise KeepmixError(f"{path}: SQLite database not found")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    conn.execute("PRAGMA query_only=ON")
    if hasattr(conn, "setlimit"):  # Python >= 3.11; on 3.10 the authorizer alone keeps ATTACH out
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_VALUE_BYTES)
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.set_authorizer(_authorize)
    return conn


def execute_sql(db_path: str | Path, sql: str, *, timeout_s: float, max_rows: int) -> QueryResult:
    """Run one read-only query with a time and row limit.

    Every failure of the query comes back as `QueryResult.error`; only a missing database file raises
    (`KeepmixError`), since that is the task's fault, not the prediction's.
    """
    conn = _connect(db_path)
    deadline = time.monotonic() + timeout_s
    # A non-zero return from the handler makes SQLite abort the statement ("interrupted").
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_EVERY)
    try:
        cursor = conn.execute(sql)
        if cursor.description is None:
            return QueryResult(None, "not a query: it returns no columns")
        rows = cursor.fetchmany(max_rows + 1)
        if len(rows) > max_rows:
            return QueryResult(None, f"more than {max_rows} rows")
        return QueryResult([tuple(r) for r in rows])
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as err:
        if time.monotonic() > deadline:
            return QueryResult(None, f"timed out after {timeout_s:g} s")
        return QueryResult(None, f"{type(err).__name__}: {err}")
    finally:
        conn.close()


def _normal_row(row: tuple) -> tuple:
    return tuple(round(v, _FLOAT_DECIMALS) if isinstance(v, float) else v for v in row)


def has_order_by(sql: str) -> bool:
    """Whether the result order of `sql` counts (it has an ORDER BY clause)."""
    return bool(_ORDER_BY.search(sql))


def sql_match(pred_rows: list[tuple], gold_rows: list[tuple], ordered: bool) -> bool:
    """Equal results: same rows in the same order if `ordered`, else the same multiset of rows."""
    pred = [_normal_row(r) for r in pred_rows]
    gold = [_normal_row(r) for r in gold_rows]
    if ordered:
        return pred == gold
    return Counter(pred) == Counter(gold)


def gold_results(items: list[SQLItem], database: str | Path, *, timeout_s: float, max_rows: int) -> list[list[tuple]]:
    """The gold rows of every item; a gold query that fails is a `KeepmixError` naming the item."""
    out = []
    for i, item in enumerate(items):
        result = execute_sql(database, item.sql, timeout_s=timeout_s, max_rows=max_rows)
        if not result.ok:
            raise KeepmixError(f"item {i}: the gold query fails on {database} ({result.error}): {item.sql}")
        out.append(result.rows)
    return out


def score_sql(
    model,
    tokenizer,
    items: list[SQLItem],
    *,
    database: str | Path,
    max_new_tokens: int,
    stop: list[str],
    batch_size: int,
    device: torch.device | str,
    timeout_s: float,
    max_rows: int,
) -> dict[str, float]:
    """{"acc", "acc/<group>" for each group, "n"}: execution accuracy of generated SQL."""
    # Gold queries first: a broken task file should fail before minutes of generation.
    golds = gold_results(items, database, timeout_s=timeout_s, max_rows=max_rows)
    generations = generate_batch(
        model,
        tokenizer,
        [item.prompt for item in items],
        max_new_tokens=max_new_tokens,
        stop=stop,
        batch_size=batch_size,
        device=device,
    )
    right: list[bool] = []
    for item, gold, generation in zip(items, golds, generations, strict=True):
        pred = execute_sql(database, extract_sql(generation), timeout_s=timeout_s, max_rows=max_rows)
        right.append(pred.ok and sql_match(pred.rows, gold, has_order_by(item.sql)))
    return sql_metrics(items, right)


def sql_metrics(items: list[SQLItem], right: list[bool]) -> dict[str, float]:
    """acc, acc/<group> (only when items carry groups) and n from per-item correctness."""
    metrics = {"acc": sum(right) / len(right) if right else float("nan")}
    groups: dict[str, list[bool]] = {}
    for item, ok in zip(items, right, strict=True):
        if item.group is not None:
            groups.setdefault(item.group, []).append(ok)
    for group in sorted(groups):
        metrics[f"acc/{group}"] = sum(groups[group]) / len(groups[group])
    metrics["n"] = float(len(right))
    return metrics
