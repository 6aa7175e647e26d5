"""The demo's data: determinism, disjoint splits, and a SQL task whose gold queries answer."""

import collections
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from keepmix.demo import sql_task
from keepmix.demo.data import (CODE_BOUNDARIES, PROSE_BOUNDARIES, build_demo_data, chunk_text,
                               code_documents, prose_documents)
from keepmix.errors import KeepmixError


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_demo_data(tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture(scope="module")
def manifest(built):
    return json.loads(built.manifest.read_text())


def test_same_seed_gives_byte_identical_files_in_a_fresh_process(built, tmp_path):
    # A fresh interpreter with another hash seed: catches any dependence on set/dict hash order.
    other = tmp_path / "again"
    code = f"from keepmix.demo.data import build_demo_data; build_demo_data({str(other)!r})"
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    names = sorted(p.name for p in built.out_dir.iterdir())
    assert names == sorted(p.name for p in other.iterdir())
    assert len(names) == 8
    for name in names:
        assert (built.out_dir / name).read_bytes() == (other / name).read_bytes(), name


def test_another_seed_changes_splits_and_questions(built, tmp_path):
    other = build_demo_data(tmp_path, seed=1, code_max_docs=50, code_valid_docs=10, sql_train=40,
                            sql_eval_seen=12, sql_eval_unseen=4)
    assert other.database.read_bytes() != built.database.read_bytes()
    assert other.prose_valid.read_bytes() != built.prose_valid.read_bytes()
    assert {r["completion"] for r in _read(other.sql_train)} - {
        r["completion"] for r in _read(built.sql_train)}


def test_default_sizes_fit_the_demo(built, manifest):
    c = built.counts
    assert 300 <= c["prose_train"] <= 600 and 20 <= c["prose_valid"] <= 100
    assert (c["code_train"], c["code_valid"]) == (400, 48)
    assert c["sql_train"] == 400 and c["sql_eval"] == 48 + 36
    assert {k.removesuffix(".jsonl"): v["records"] for k, v in manifest["files"].items()} == c
    for name in ("prose_train", "prose_valid", "code_train", "code_valid"):
        lengths = [len(r["text"]) for r in _read(getattr(built, name))]
        assert max(lengths) <= 1000 and min(lengths) >= 100, name
        assert 600 <= sum(lengths) / len(lengths) <= 1000, name


def test_prose_is_split_by_topic(built, manifest):
    topic_of = {d: t for t, docs in prose_documents(1000).items() for d in docs}
    train = {topic_of[r["text"]] for r in _read(built.prose_train)}
    valid = {topic_of[r["text"]] for r in _read(built.prose_valid)}
    assert train and valid and not train & valid
    # No section of the reference is on both sides, even via a topic that quotes another.
    paragraphs = [{p.strip() for r in _read(path) for p in r["text"].split("\n\n")
                   if len(p.strip()) >= 60} for path in (built.prose_train, built.prose_valid)]
    assert not paragraphs[0] & paragraphs[1]
    assert (sorted(train), sorted(valid)) == (manifest["prose_topics"]["train"],
                                              manifest["prose_topics"]["valid"])


def test_code_is_split_by_module_and_skips_tests_and_the_prose_source(built, manifest):
    module_of = {d: m for m, docs in code_documents(1000).items() for d in docs}
    train = {module_of[r["text"]] for r in _read(built.code_train)}
    valid = {module_of[r["text"]] for r in _read(built.code_valid)}
    assert train and valid and not train & valid
    texts = [{r["text"] for r in _read(path)} for path in (built.code_train, built.code_valid)]
    assert not texts[0] & texts[1]
    assert len(train) >= 50  # the sample spreads over the stdlib, not a few big modules
    modules = set(manifest["code_modules"]["train"]) | set(manifest["code_modules"]["valid"])
    assert {"json", "email", "asyncio"} <= modules
    assert not modules & {"test", "idlelib", "lib2to3", "encodings", "pydoc_data", "site-packages"}


def test_code_chunks_start_at_definitions():
    funcs = [f"# helper {i}\n@cache\ndef f{i}(x):\n" + "    x += 1\n" * 50 + "    return x\n\n\n"
             for i in range(6)]
    text = '"""Module."""\nimport functools\n\n\n' + "".join(funcs)
    chunks = chunk_text(text, 1000, CODE_BOUNDARIES)
    assert len(chunks) == 6  # two functions (~590 chars each) never fit in one chunk
    assert all(c.startswith("# helper") for c in chunks[1:])
    assert "".join(chunks).count("return x") == 6


def test_a_line_longer_than_a_chunk_is_cut_at_chunk_size():
    chunks = chunk_text("abcd" * 625, 1000, PROSE_BOUNDARIES)
    assert [len(c) for c in chunks] == [1000, 1000, 500]


def test_at_least_twelve_templates_and_unseen_ones_never_trained(built, manifest):
    assert len(sql_task.SQL_TEMPLATES) >= 12
    seen, unseen = set(built.seen_templates), set(built.unseen_templates)
    assert len(seen) >= 9 and len(unseen) >= 3 and not seen & unseen
    assert manifest["sql"]["unseen_templates"] == list(built.unseen_templates)
    train = _read(built.sql_train)
    assert {r["template"] for r in train} == seen
    unseen_questions = [re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(t.question)))
                        for t in sql_task.SQL_TEMPLATES if t.name in unseen]
    asked = [r["prompt"].split("-- Question: ")[1].split("\n")[0] for r in train]
    assert not any(p.fullmatch(q) for q in asked for p in unseen_questions)
    evals = [r["question"] for r in _read(built.sql_eval) if r["group"] == "unseen"]
    assert all(any(p.fullmatch(q) for p in unseen_questions) for q in evals)  # the regexes work
    groups = collections.Counter((r["group"], r["template"] in seen) for r in _read(built.sql_eval))
    assert groups == {("seen", True): 48, ("unseen", False): 36}


def test_eval_questions_never_appear_in_training(built):
    train = {(r["template"], r["completion"].removesuffix(";\n")) for r in _read(built.sql_train)}
    evals = [(r["template"], r["sql"]) for r in _read(built.sql_eval)]
    assert len(train) == 400 and len(set(evals)) == len(evals) == 84
    assert not train & set(evals)


def test_every_gold_query_answers_on_a_read_only_database(built):
    con = sql_task.open_read_only(built.database)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        con.execute("DELETE FROM orders")
    results = collections.defaultdict(list)
    golds = [(r["template"], r["completion"].removesuffix(";\n")) for r in _read(built.sql_train)]
    golds += [(r["template"], r["sql"]) for r in _read(built.sql_eval)]
    for template, sql in golds:
        rows = con.execute(sql).fetchall()
        assert rows and rows != [(0,)] and rows != [(None,)], sql
        results[template].append(tuple(rows))
    assert set(results) == {t.name for t in sql_task.SQL_TEMPLATES}
    for template, answers in results.items():
        # Answers depend on the values: no single answer covers half of a template's questions.
        top = collections.Counter(answers).most_common(1)[0][1]
        assert top <= len(answers) / 2, template


def test_prompt_and_completion_format(built):
    con = sql_task.open_read_only(built.database)
    real_schema = [row[0] + ";" for row in con.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' ORDER BY rowid")]
    assert real_schema == sql_task.SCHEMA_SQL.split("\n")  # the prompt shows the real schema
    prompt_shape = re.compile(r"-- SQLite schema\n(CREATE TABLE [^\n]+;\n){4}-- Question: [^\n]+\?"
                              r"(?: [^\n]+\.)?\n-- SQL:\n")
    for r in _read(built.sql_train):
        assert prompt_shape.fullmatch(r["prompt"]), r["prompt"]
        assert r["completion"].startswith("SELECT ") and r["completion"].endswith(";\n")
        assert r["completion"].count(";") == 1 and "\n" not in r["completion"][:-1]
    for r in _read(built.sql_eval):
        assert r["prompt"] == sql_task.format_prompt(r["question"])
        assert set(r) == {"prompt", "sql", "group", "template", "question"}


def test_gold_result_rejects_empty_zero_and_tied_limits():
    con = sqlite3.connect(":memory:")
    con.executescript("CREATE TABLE t (name TEXT, v INTEGER);"
                      "INSERT INTO t VALUES ('a', 3), ('b', 2), ('c', 2), ('d', 1);")
    assert sql_task.gold_result(con, "SELECT COUNT(*) FROM t WHERE v > 5") is None
    assert sql_task.gold_result(con, "SELECT name FROM t WHERE v > 5") is None
    assert sql_task.gold_result(con, "SELECT name, v FROM t ORDER BY v DESC LIMIT 2") is None
    assert sql_task.gold_result(con, "SELECT name, v FROM t ORDER BY v DESC LIMIT 3") == (
        ("a", 3), ("b", 2), ("c", 2))
    assert sql_task.gold_result(con, "SELECT COUNT(*) FROM t WHERE v = 2") == ((2,),)


def test_asking_more_questions_than_a_template_has_is_an_error(tmp_path):
    facts = sql_task.build_shop_database(tmp_path / "shop.sqlite", seed=0)
    # 12 categories x 5 values of n: at most 60 distinct questions.
    with pytest.raises(KeepmixError, match="most_expensive_in_category' gave only"):
        sql_task.sample_questions(tmp_path / "shop.sqlite", facts,
                                  {"most_expensive_in_category": 100}, seed=0)


def test_bad_arguments_are_reported_together(tmp_path):
    with pytest.raises(KeepmixError) as e:
        build_demo_data(tmp_path, sql_train=0, unseen_templates=("no_such_template",))
    assert "sql_train must be at least 1" in str(e.value)
    assert "'no_such_template'" in str(e.value)
    assert not list(tmp_path.iterdir())
