"""SQL execution accuracy: equivalence, ordering, invalid SQL, hostile queries, limits, end to end."""

import hashlib
import sqlite3
import time

import pytest
import torch
import transformers

from keepmix.errors import KeepmixError
from keepmix.eval.sql import (
    SQLItem,
    execute_sql,
    extract_sql,
    gold_results,
    has_order_by,
    score_sql,
    sql_match,
    sql_metrics,
)
from tests.conftest import make_bpe_tokenizer

LIMITS = dict(timeout_s=2.0, max_rows=1000)


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "shop.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, total REAL);
        INSERT INTO customers VALUES (1, 'Ada', 'Paris'), (2, 'Bob', 'Rome'), (3, 'Cy', 'Paris'), (4, 'Di', 'Oslo');
        INSERT INTO orders VALUES (1, 1, 10.0), (2, 1, 5.5), (3, 2, 7.25), (4, 3, 1.0), (5, 3, 2.0);
        """
    )
    conn.commit()
    conn.close()
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def right(db, gold, pred):
    g = execute_sql(db, gold, **LIMITS)
    p = execute_sql(db, pred, **LIMITS)
    assert g.ok, g.error
    return p.ok and sql_match(p.rows, g.rows, has_order_by(gold))


def test_equivalent_queries_count_as_right(db):
    assert right(db, "SELECT name FROM customers WHERE city = 'Paris'",
                 "select c.name from customers as c where c.city in ('Paris')")
    # Unordered gold: row order does not matter.
    assert right(db, "SELECT name FROM customers WHERE city = 'Paris'",
                 "SELECT name FROM customers WHERE city = 'Paris' ORDER BY name DESC")
    # A join written as a subquery.
    assert right(db, "SELECT DISTINCT c.name FROM customers c JOIN orders o ON o.customer_id = c.id",
                 "SELECT name FROM customers WHERE id IN (SELECT customer_id FROM orders)")
    # Float arithmetic written differently.
    assert right(db, "SELECT AVG(total) FROM orders", "SELECT SUM(total) * 1.0 / COUNT(*) FROM orders")
    assert right(db, "SELECT COUNT(*) FROM orders", "SELECT COUNT(id) FROM orders")


def test_wrong_queries_count_as_wrong(db):
    assert not right(db, "SELECT name FROM customers WHERE city = 'Paris'",
                     "SELECT name FROM customers WHERE city = 'Rome'")
    assert not right(db, "SELECT name FROM customers", "SELECT name, city FROM customers")  # extra column
    assert not right(db, "SELECT city FROM customers", "SELECT DISTINCT city FROM customers")  # multiset
    # An ordered gold needs the same order.
    gold = "SELECT name FROM customers ORDER BY name"
    assert right(db, gold, "SELECT name FROM customers ORDER BY 1 ASC")
    assert not right(db, gold, "SELECT name FROM customers ORDER BY name DESC")


def test_invalid_sql_is_wrong_not_a_crash(db):
    invalid = ("SELEC name FROM customers", "SELECT nope FROM customers", "SELECT * FROM missing", "", "-- note")
    for bad in invalid:
        result = execute_sql(db, bad, **LIMITS)
        assert not result.ok and result.rows is None and result.error
    assert not right(db, "SELECT 1", "SELECT (")


HOSTILE = [
    "DROP TABLE customers",
    "DELETE FROM orders",
    "INSERT INTO customers VALUES (9, 'Eve', 'Nice')",
    "UPDATE orders SET total = 0",
    "CREATE TABLE t (x)",
    "ATTACH DATABASE '{dir}/evil.sqlite' AS evil",
    "PRAGMA writable_schema = ON",
    "PRAGMA journal_mode = WAL",
    "VACUUM INTO '{dir}/copy.sqlite'",
    "VACUUM",
    "SELECT 1; DROP TABLE customers",
    "BEGIN IMMEDIATE",
    "SELECT load_extension('evil')",
    "REINDEX",
]


def test_hostile_queries_leave_the_database_byte_identical(db):
    before, files = digest(db), sorted(p.name for p in db.parent.iterdir())
    for statement in HOSTILE:
        result = execute_sql(db, statement.format(dir=db.parent), **LIMITS)
        assert not result.ok, statement
    # ATTACH + write, as two statements run one after the other on fresh connections.
    attach = execute_sql(db, f"ATTACH DATABASE '{db.parent}/evil.sqlite' AS evil", **LIMITS)
    write = execute_sql(db, "CREATE TABLE evil.t AS SELECT * FROM customers", **LIMITS)
    assert not attach.ok and not write.ok
    assert digest(db) == before
    assert sorted(p.name for p in db.parent.iterdir()) == files  # no file created (ATTACH, VACUUM INTO)
    # The authorizer refuses them when the statement is prepared, before anything runs.
    for statement in ("DROP TABLE customers", "PRAGMA writable_schema = ON", "ATTACH 'x.sqlite' AS x", "VACUUM"):
        error = execute_sql(db, statement, **LIMITS).error
        assert "not authorized" in error or "authorization denied" in error, (statement, error)
    assert execute_sql(db, "SELECT COUNT(*) FROM customers", **LIMITS).rows == [(4,)]


def test_a_runaway_query_is_cut_off_within_its_limit(db):
    runaway = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n"
    start = time.monotonic()
    result = execute_sql(db, runaway, timeout_s=0.5, max_rows=10)
    elapsed = time.monotonic() - start
    assert not result.ok and "timed out" in result.error
    assert elapsed < 0.5 + 1.0
    # Endless rows stop at the row limit instead.
    rows = execute_sql(db, "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n",
                       timeout_s=5.0, max_rows=10)
    assert not rows.ok and "more than 10 rows" in rows.error
    # A bounded recursive CTE is a legitimate read.
    bounded = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 3) SELECT x FROM n"
    assert execute_sql(db, bounded, **LIMITS).rows == [(1,), (2,), (3,)]


def test_extract_sql_takes_the_first_statement():
    assert extract_sql(" SELECT 1; SELECT 2;") == "SELECT 1"
    assert extract_sql("```sql\nSELECT a\nFROM t;\n```\nmore text") == "SELECT a\nFROM t"
    assert extract_sql("Here it is:\n```\nSELECT 2\n```") == "SELECT 2"
    assert extract_sql("SELECT 'a;b' FROM t; DROP TABLE t") == "SELECT 'a;b' FROM t"
    assert extract_sql("  SELECT x FROM t  ") == "SELECT x FROM t"
    assert has_order_by("select a from t order  by a") and not has_order_by("SELECT border FROM t")


def test_metrics_per_group():
    items = [SQLItem("p", "SELECT 1", "seen"), SQLItem("p", "SELECT 1", "seen"), SQLItem("p", "SELECT 1", "unseen"),
             SQLItem("p", "SELECT 1")]
    assert sql_metrics(items, [True, False, True, True]) == {
        "acc": 0.75, "acc/seen": 0.5, "acc/unseen": 1.0, "n": 4.0
    }
    assert sql_metrics(items[3:], [False]) == {"acc": 0.0, "n": 1.0}


def test_a_failing_gold_query_is_an_error_naming_the_item(db):
    items = [SQLItem("p", "SELECT 1"), SQLItem("p", "SELECT nope FROM customers")]
    with pytest.raises(KeepmixError, match="item 1: the gold query fails"):
        gold_results(items, db, **LIMITS)


# End to end: a tiny model that memorized its completions generates them; score_sql executes them.
# (prompt, memorized completion, gold query, group)
PAIRS = [
    ("Q: names in Paris\nSQL:", " select name from customers where city in ('Paris');",
     "SELECT name FROM customers WHERE city = 'Paris'", "seen"),
    ("Q: how many orders\nSQL:", " SELECT COUNT(*) FROM orders;", "SELECT COUNT(id) FROM orders", "seen"),
    ("Q: order totals\nSQL:", " SELECT total FROM orders ORDER BY total;",
     "SELECT total FROM orders ORDER BY total DESC", "unseen"),
    ("Q: cities\nSQL:", " DROP TABLE customers;", "SELECT city FROM customers", "unseen"),
    ("Q: biggest order\nSQL:", " SELEC max(total) FRM orders;", "SELECT MAX(total) FROM orders", "unseen"),
]


@pytest.fixture(scope="module")
def memorizer():
    texts = [prompt + completion for prompt, completion, _, _ in PAIRS]
    tokenizer = make_bpe_tokenizer(texts, 300, specials=("<pad>", "<eos>"), full_alphabet=False)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.LlamaForCausalLM(config)
    seqs = [tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in seqs])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(80):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), tokenizer


def test_score_sql_end_to_end(db, memorizer):
    model, tokenizer = memorizer
    items = [SQLItem(prompt, gold, group) for prompt, _, gold, group in PAIRS]
    before = digest(db)
    metrics = score_sql(
        model, tokenizer, items, database=db, max_new_tokens=40, stop=[";", "\n\n"], batch_size=3,
        device="cpu", **LIMITS,
    )
    # Right: the two equivalent rewrites. Wrong: reversed order under ORDER BY, DROP, invalid SQL.
    assert metrics == {"acc": 0.4, "acc/seen": 1.0, "acc/unseen": 0.0, "n": 5.0}
    assert digest(db) == before
