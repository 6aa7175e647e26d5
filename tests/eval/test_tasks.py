"""Task configs (the `eval.tasks` schema), item validation, run_task, and the shipped example tasks."""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import torch
import transformers
import yaml
from pydantic import Field, TypeAdapter, ValidationError

from keepmix.errors import KeepmixError
from keepmix.eval.choice import MCItem, score_multiple_choice
from keepmix.eval.generate import GenItem, score_generation
from keepmix.eval.sql import SQLItem, execute_sql, gold_results
from keepmix.eval.tasks import (
    GenerationTask,
    MultipleChoiceTask,
    SQLExecutionTask,
    TaskConfig,
    resolve_path,
    run_task,
    task_tolerances,
)
from tests.conftest import make_bpe_tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "tasks"
TASKS = TypeAdapter(list[Annotated[TaskConfig, Field(discriminator="kind")]])


@pytest.fixture(scope="module")
def tokenizer():
    texts = [line for p in EXAMPLES.glob("*.jsonl") for line in p.read_text().splitlines()]
    return make_bpe_tokenizer(texts, 400, specials=("<pad>", "<eos>"), full_alphabet=False)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_config_is_a_union_on_kind_with_defaults():
    tasks = TASKS.validate_python([
        {"name": "mc", "kind": "multiple_choice", "path": "mc.jsonl"},
        {"name": "gen", "kind": "generation", "path": "g.jsonl", "lowercase": True},
        {"name": "sql", "kind": "sql_execution", "path": "s.jsonl", "database": "shop.sqlite", "tolerance": 0.1},
    ])
    mc, gen, sql = tasks
    assert isinstance(mc, MultipleChoiceTask) and (mc.context_field, mc.choices_field, mc.gold_field) == (
        "context", "choices", "gold"
    )
    assert isinstance(gen, GenerationTask)
    assert (gen.prompt_field, gen.answer_field, gen.stop) == ("prompt", "answer", ["\n"])
    assert isinstance(sql, SQLExecutionTask) and (sql.prompt_field, sql.sql_field, sql.group_field) == (
        "prompt", "sql", "group"
    )
    assert (sql.timeout_s, sql.max_rows, sql.stop) == (5.0, 10_000, [";", "\n\n"])
    assert task_tolerances(tasks) == {"task/sql": 0.1}
    # Every field documents itself.
    for cls in (MultipleChoiceTask, GenerationTask, SQLExecutionTask):
        assert all(f.description for f in cls.model_fields.values()), cls.__name__


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "x", "kind": "multiple_choice", "path": "a", "max_new_tokens": 3}, "Extra inputs"),
        ({"name": "x", "kind": "sql_execution", "path": "a"}, "database"),
        ({"name": "x", "kind": "token_accuracy", "path": "a"}, "does not match any of the expected tags"),
        ({"name": "a/b", "kind": "generation", "path": "a"}, "letters, digits"),
        ({"name": "x", "kind": "generation", "path": "a", "regex": "(unclosed"}, "not a valid regular expression"),
        ({"name": "x", "kind": "generation", "path": "a", "stop": [""]}, "non-empty"),
        ({"name": "x", "kind": "sql_execution", "path": "a", "database": "d", "timeout_s": 0}, "greater than 0"),
    ],
)
def test_config_problems_are_reported(entry, message):
    with pytest.raises(ValidationError, match=message):
        TASKS.validate_python([entry])


def test_relative_paths_resolve_against_base_dir(tmp_path):
    (tmp_path / "items.jsonl").write_text("")
    assert resolve_path("items.jsonl", tmp_path) == str(tmp_path / "items.jsonl")
    assert resolve_path("sub/missing.parquet", tmp_path) == str(tmp_path / "sub" / "missing.parquet")
    assert resolve_path("/abs/items.jsonl", tmp_path) == "/abs/items.jsonl"
    assert resolve_path("org/dataset", tmp_path) == "org/dataset"  # a hub id


MC_ROWS = [
    {"q": "Question: What is the capital of France?\nAnswer:", "opts": ["Paris", "Rome", "Oslo"], "label": 0},
    {"q": "Question: Which keyword removes duplicates?\nAnswer:", "opts": ["UNIQUE", "DISTINCT"], "label": 1},
    {"q": "Question: How many sides does a hexagon have?\nAnswer:", "opts": ["five", "six", "seven"], "label": 1},
    {"q": "unused: beyond the limit", "opts": ["a", "b"], "label": 0},
]


def test_run_task_multiple_choice_matches_the_direct_scorer(tmp_path, model, tokenizer):
    write_jsonl(tmp_path / "mc.jsonl", MC_ROWS)
    task = MultipleChoiceTask(name="mc", kind="multiple_choice", path="mc.jsonl", context_field="q",
                              choices_field="opts", gold_field="label", limit=3)
    got = run_task(task, model, tokenizer, base_dir=tmp_path, device="cpu", batch_size=4)
    items = [MCItem(r["q"], tuple(r["opts"]), r["label"]) for r in MC_ROWS[:3]]
    assert got == score_multiple_choice(model, tokenizer, items, batch_size=2, device="cpu")
    assert set(got) == {"acc", "acc_norm", "acc_bytes", "n"} and got["n"] == 3


def test_run_task_generation_matches_the_direct_scorer(tmp_path, model, tokenizer):
    rows = [{"prompt": "Q: What is 2 + 3?\nA:", "answer": 5}, {"prompt": "Q: What is 6 * 7?\nA:", "answer": "42"}]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    task = GenerationTask(name="gen", kind="generation", path=str(tmp_path / "gen.jsonl"), max_new_tokens=6)
    got = run_task(task, model, tokenizer, base_dir=Path("/nonexistent"), device="cpu")
    items = [GenItem(r["prompt"], str(r["answer"])) for r in rows]
    assert got == score_generation(model, tokenizer, items, max_new_tokens=6, stop=["\n"], batch_size=1, device="cpu")
    assert got["n"] == 2


def test_run_task_sql_reports_groups(tmp_path, model, tokenizer):
    conn = sqlite3.connect(tmp_path / "db.sqlite")
    conn.executescript("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (1), (2);")
    conn.commit()
    conn.close()
    rows = [{"prompt": "SQL:", "sql": "SELECT x FROM t", "group": "seen"},
            {"prompt": "SQL: count", "sql": "SELECT COUNT(*) FROM t", "group": "unseen"},
            {"prompt": "SQL: max", "sql": "SELECT MAX(x) FROM t"}]
    write_jsonl(tmp_path / "sql.jsonl", rows)
    task = SQLExecutionTask(name="sql", kind="sql_execution", path="sql.jsonl", database="db.sqlite",
                            max_new_tokens=12, timeout_s=1.0)
    got = run_task(task, model, tokenizer, base_dir=tmp_path, device="cpu")
    assert set(got) == {"acc", "acc/seen", "acc/unseen", "n"} and got["n"] == 3
    assert got["acc"] == 0.0  # an untrained model writes no valid SQL


@pytest.mark.parametrize(
    "row, message",
    [
        ({"opts": ["a", "b"], "label": 0}, r"item 1: missing field 'q'"),
        ({"q": "c", "opts": ["a", "b"], "label": 2}, r"item 1: field 'label' is 2, out of range for 2 choices"),
        ({"q": "c", "opts": ["a", "b"], "label": "0"}, r"item 1: field 'label' must be an integer"),
        ({"q": "c", "opts": ["a", "b"], "label": True}, r"item 1: field 'label' must be an integer"),
        ({"q": "c", "opts": "ab", "label": 0}, r"item 1: field 'opts' must be a list"),
        ({"q": "c", "opts": ["a", ""], "label": 0}, r"item 1: field 'opts' must list at least 2 non-empty"),
    ],
)
def test_bad_items_name_file_index_and_field(tmp_path, model, tokenizer, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [MC_ROWS[0], row])
    task = MultipleChoiceTask(name="mc", kind="multiple_choice", path="bad.jsonl", context_field="q",
                              choices_field="opts", gold_field="label")
    with pytest.raises(KeepmixError, match=message) as err:
        run_task(task, model, tokenizer, base_dir=tmp_path, device="cpu")
    assert str(path) in str(err.value)


def test_bad_sql_items_and_database_are_named(tmp_path, model, tokenizer):
    write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "sql": "SELECT nope FROM t"}])
    task = SQLExecutionTask(name="s", kind="sql_execution", path="s.jsonl", database="missing.sqlite")
    with pytest.raises(KeepmixError, match="database: file not found"):
        run_task(task, model, tokenizer, base_dir=tmp_path, device="cpu")
    sqlite3.connect(tmp_path / "d.sqlite").executescript("CREATE TABLE t (x INTEGER);")
    task = SQLExecutionTask(name="s", kind="sql_execution", path="s.jsonl", database="d.sqlite")
    with pytest.raises(KeepmixError, match=r"s\.jsonl\): item 0: the gold query fails"):
        run_task(task, model, tokenizer, base_dir=tmp_path, device="cpu")
    write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "answer": ["a"]}])
    gen = GenerationTask(name="g", kind="generation", path="g.jsonl")
    with pytest.raises(KeepmixError, match=r"g\.jsonl: item 0: field 'answer' must be a string"):
        run_task(gen, model, tokenizer, base_dir=tmp_path, device="cpu")


def test_shipped_example_tasks_run(model, tokenizer):
    tasks = TASKS.validate_python(yaml.safe_load((EXAMPLES / "tiny_with_tasks.yaml").read_text())["eval"]["tasks"])
    expected = {
        "multiple_choice": {"acc", "acc_norm", "acc_bytes", "n"},
        "generation": {"exact_match", "n"},
        "sql_execution": {"acc", "acc/seen", "acc/unseen", "n"},
    }
    for task in tasks:
        short = {"limit": 8} if task.kind == "multiple_choice" else {"limit": 8, "max_new_tokens": 4}
        small = task.model_copy(update=short)
        metrics = run_task(small, model, tokenizer, base_dir=EXAMPLES, device="cpu", batch_size=8)
        assert set(metrics) == expected[task.kind] and metrics["n"] == 8, task.name


def test_example_database_is_what_the_script_builds(tmp_path):
    rebuilt = tmp_path / "shop.sqlite"
    subprocess.run([sys.executable, str(EXAMPLES / "make_shop_db.py"), str(rebuilt)], check=True, capture_output=True)
    rows = [json.loads(line) for line in (EXAMPLES / "shop_sql.jsonl").read_text().splitlines()]
    items = [SQLItem(r["prompt"], r["sql"], r["group"]) for r in rows]
    shipped = gold_results(items, EXAMPLES / "shop.sqlite", timeout_s=2.0, max_rows=1000)
    assert gold_results(items, rebuilt, timeout_s=2.0, max_rows=1000) == shipped
    assert all(shipped) and {r["group"] for r in rows} == {"seen", "unseen"}
    listing = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    tables = execute_sql(rebuilt, listing, timeout_s=2.0, max_rows=10)
    assert tables.rows == [("customers",), ("orders",), ("products",)]
