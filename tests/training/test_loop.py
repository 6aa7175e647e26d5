"""A whole run: its outputs, its metrics, and the guards around its run directory."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from keepmix.data import tokenize as tk
from keepmix.data.packing import RowPlan, Segment, build_rows
from keepmix.errors import KeepmixError
from keepmix.training.forward import LossModel
from keepmix.training.loop import train
from tests.conftest import TINY_LLAMA, prose_docs, train_records


def test_run_outputs_and_metrics(make_run):
    config = make_run(train={"steps": 8, "checkpoint_every": 4, "keep_checkpoints": 1})
    result = train(config, progress="quiet")
    run_dir = config.parent / "out"
    assert result.status == "completed" and result.final_dir == run_dir / "final"
    assert (run_dir / "config.yaml").exists() and (run_dir / "retention.json").exists()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["sources"][0]["path"] == str(config.parent / "general.jsonl")  # resolved, absolute
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*")] == ["step-00000008"]  # keep last 1

    steps = train_records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 9))
    first = steps[0]
    for key in ("micro_step", "tokens_seen", "time", "lr", "loss", "token_acc", "grad_norm", "tokens_per_s",
                "sources", "planned", "realized", "realized_cum", "epoch"):
        assert key in first, key
    assert set(first["sources"]["general"]) == {"loss", "token_acc", "tokens", "rows"}
    assert sum(first["realized"].values()) == pytest.approx(1.0)
    assert first["tokens_seen"] == 4 * 64  # 4 full rows of 64 tokens
    assert steps[-1]["loss"] < steps[0]["loss"]
    evals = train_records(run_dir, "eval")
    assert [e["step"] for e in evals] == [0, 6, 8]
    assert evals[0]["metrics"]["valid/general/loss"] > evals[-1]["metrics"]["valid/general/loss"]
    assert set(evals[-1]["retention"]["valid/general/token_acc"]) >= {"baseline", "now", "delta", "flagged"}
    assert train_records(run_dir, "end")[-1]["status"] == "completed"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    assert model.config.num_hidden_layers == 2 and tok.eos_token == "<eos>"


def test_lora_final_can_be_merged(make_run):
    config = make_run(model={"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear", "merge": True}},
                      train={"steps": 2, "checkpoint_every": 2}, eval={"every": None})
    train(config, progress="quiet")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(config.parent / "out" / "final")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_existing_run_is_not_overwritten(make_run):
    config = make_run(train={"steps": 2, "checkpoint_every": 2})
    train(config, progress="quiet")
    metrics = (config.parent / "out" / "metrics.jsonl").read_text()
    with pytest.raises(KeepmixError, match="already holds a run; continue it with --resume"):
        train(config, progress="quiet")
    assert (config.parent / "out" / "metrics.jsonl").read_text() == metrics


def test_resume_refuses_a_changed_config(make_run):
    config = make_run(train={"steps": 4, "checkpoint_every": 2})
    train(config, progress="quiet", stop_at=2)
    with pytest.raises(KeepmixError, match=r"keys that break an exact resume: mixture\.floor, train\.lr"):
        train(config, progress="quiet", resume=True, overrides={"train.lr": 1e-3, "mixture.floor": 0.2})
    result = train(config, progress="quiet", resume=True, overrides={"eval.every": 1})  # safe to change
    assert result.status == "completed"


def test_accelerate_fsdp_launch_is_refused_with_the_keepmix_setting(make_run, monkeypatch):
    config = make_run(train={"steps": 2, "checkpoint_every": 2})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(KeepmixError, match=r"set train\.fsdp: true"):
        train(config, progress="quiet")
    assert not (config.parent / "out").exists()


def test_baseline_from_reuses_the_step0_eval_of_the_same_model_and_data(make_run):
    short = {"steps": 2, "checkpoint_every": 2}
    first = make_run("first", train=short, eval={"every": None})
    train(first, progress="quiet")
    baseline = train_records(first.parent / "out", "eval")[0]
    # another mixture and optimisation, the same model, data and eval: the baseline is reused
    sources = yaml.safe_load(first.read_text())["sources"]
    for source in sources:  # the same files, not copies
        source["path"] = str(first.parent / source["path"])
    arm = {"train": {**short, "lr": 1e-3, "warmup": 0}, "mixture": {"floor": 0.3}, "sources": sources}
    fresh = make_run("fresh", **arm, eval={"every": None})
    reused = make_run("reused", **arm, eval={"every": None, "baseline_from": str(first.parent / "out")})
    train(fresh, progress="quiet")
    result = train(reused, progress="quiet")
    got = train_records(reused.parent / "out", "eval")[0]
    assert got["metrics"] == baseline["metrics"] == train_records(fresh.parent / "out", "eval")[0]["metrics"]
    assert got["baseline_from"] == str((first.parent / "out").resolve())
    fresh_retention = json.loads((fresh.parent / "out" / "retention.json").read_text())["retention"]
    assert result.retention == fresh_retention
    # another model or other held-out data: refused before anything is written
    other = make_run("other", train={**short, "seq_len": 32}, sources=sources,
                     eval={"baseline_from": str(first.parent / "out")})
    with pytest.raises(KeepmixError, match=r"evaluated another model or other data: train\.seq_len differ"):
        train(other, progress="quiet")
    assert not (other.parent / "out").exists()


def test_loss_model_isolates_packed_documents(tokenizer):
    """The training path's per-token losses on a packed row equal each document's losses alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(tokenizer), **arch))
    docs = tk.tokenize_docs(prose_docs(3), tokenizer, fmt="text", loss_on="all")
    lengths = [min(int(n), 25) for n in docs.lengths]
    rows = build_rows([RowPlan(0, [Segment(i, 1, 0, lengths[i]) for i in range(3)])], [docs], 80, 1)
    weights = (rows.labels != -100).float().reshape(-1)
    _, token_loss, _ = LossModel(model)(rows.input_ids, rows.position_ids, rows.labels, weights)
    start = 0
    for i in range(3):
        ids = torch.as_tensor(docs.doc(i)[0][: lengths[i]], dtype=torch.long)[None]
        logits = model(input_ids=ids).logits[0, :-1]
        alone = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
        torch.testing.assert_close(token_loss[start : start + lengths[i] - 1], alone, atol=1e-5, rtol=1e-4)
        start += lengths[i]


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    from keepmix.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "x"}, "sources": [{"name": "a", "path": "nope.jsonl"}],
                                    "train": {"stepz": 3}}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"keepmix: error: {path}: 2 problems in the config:")
    assert "train.stepz: unknown key" in err and "sources[0].path: file not found" in err
    assert "Traceback" not in err


def test_metrics_lines_are_json(make_run):
    config = make_run(train={"steps": 2, "checkpoint_every": 2}, eval={"every": None})
    train(config, progress="quiet")
    for line in (config.parent / "out" / "metrics.jsonl").read_text().splitlines():
        assert isinstance(json.loads(line), dict)


def test_tasks_run_at_baseline_during_training_and_in_retention(make_run):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples" / "tasks"
    tasks = [
        {"name": "mc", "kind": "multiple_choice", "path": str(examples / "general_choice.jsonl"), "limit": 4},
        {"name": "sql", "kind": "sql_execution", "path": str(examples / "shop_sql.jsonl"),
         "database": str(examples / "shop.sqlite"), "max_new_tokens": 8, "limit": 4, "tolerance": 0.5},
    ]
    config = make_run(train={"steps": 4, "checkpoint_every": 4}, eval={"every": 2, "tasks": tasks})
    result = train(config, progress="quiet")
    evals = train_records(config.parent / "out", "eval")
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:
        assert {"task/mc/acc", "task/mc/acc_norm", "task/sql/acc", "task/sql/n"} <= set(e["metrics"])
    assert result.retention["task/sql/acc"]["tolerance"] == 0.5  # the task's own tolerance
    assert result.retention["task/mc/acc"]["baseline"] == evals[0]["metrics"]["task/mc/acc"]


def test_fused_optimizer_matches_the_plain_update(make_run, monkeypatch):
    """The speed choice (fused AdamW) keeps the losses of the per-parameter update."""
    fused = make_run("fused", train={"steps": 4, "checkpoint_every": 4}, eval={"every": None})
    train(fused, progress="quiet")
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: real(*a, **{**k, "fused": False}))
    plain = make_run("plain", train={"steps": 4, "checkpoint_every": 4}, eval={"every": None})
    train(plain, progress="quiet")
    a = [r["loss"] for r in train_records(fused.parent / "out")]
    b = [r["loss"] for r in train_records(plain.parent / "out")]
    assert a[0] == b[0] and b == pytest.approx(a, rel=1e-5)
