"""keepmix merge: θ0 + α(θ − θ0) evaluated with the run's evals; α = 0 is the base, α = 1 the final model."""

import json

import pytest
import torch

from keepmix.errors import KeepmixError
from keepmix.sweep.merge import merge_run, parse_alphas
from keepmix.training.loop import train
from tests.conftest import train_records


def _close(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return set(a) == set(b) and all(abs(a[k] - b[k]) <= tol * max(1.0, abs(b[k])) for k in a)


@pytest.mark.parametrize("lora, precision, dtype", [(False, "auto", "auto"), (True, "auto", "auto"),
                                                    (False, "bf16", "auto"), (False, "auto", "bfloat16")])
def test_alpha_zero_is_the_base_and_alpha_one_the_final_model(make_run, lora, precision, dtype):
    # the run's evals ran under bf16 autocast (precision bf16) or on bf16 weights (model.dtype): merge's
    # α = 0 and 1 reproduce them only when it builds and scores its models the same way
    updates = {"train": {"steps": 4, "checkpoint_every": 4, "precision": precision}, "eval": {"every": None},
               "model": {"dtype": dtype}}
    if lora:
        updates["model"]["lora"] = {"r": 4, "alpha": 8}
        updates["train"]["lr"] = 3e-2
    run = make_run("m", **updates)
    train(run, progress="quiet")
    run_dir = run.parent / "out"
    ev = train_records(run_dir, "eval")
    data = merge_run(run_dir, [0, 0.5, 1], reuse_baseline=False, write=0.5)
    by = {p["alpha"]: p for p in data["points"]}
    assert data["lora"] is lora
    assert _close(by[0]["metrics"], ev[0]["metrics"]) and _close(by[1]["metrics"], ev[-1]["metrics"])
    assert not _close(by[0.5]["metrics"], by[1]["metrics"])
    assert all(not e["flagged"] or e["delta"] != 0 for e in by[0]["retention"].values())
    saved = json.loads((run_dir / "merge.json").read_text())
    assert [p["alpha"] for p in saved["points"]] == [0, 0.5, 1]
    # the written α = 0.5 folder loads as a plain model and scores what merge measured
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "merge-alpha-0.5")
    assert isinstance(model, torch.nn.Module)
    from keepmix.report.html import render_report

    assert "Merge toward the base" in render_report([run_dir]).read_text()
    # by default α = 0 reuses the baseline record instead of evaluating the base model again
    reused = merge_run(run_dir, [0])["points"][0]
    assert reused["reused"] and reused["metrics"] == ev[0]["metrics"]


def test_merge_needs_a_completed_run_and_numbers(tmp_path):
    with pytest.raises(KeepmixError, match="not a keepmix run directory"):
        merge_run(tmp_path, [0.5])
    with pytest.raises(KeepmixError, match="expected numbers separated by commas"):
        parse_alphas("0,half")


def test_a_warm_started_run_evaluates_alpha_zero_instead_of_reusing_its_baseline(make_run):
    # train.init_from: the step-0 eval scored the starting checkpoint, while α = 0 is the base model
    first = make_run("first", train={"steps": 4, "checkpoint_every": 4}, eval={"every": 4})
    train(first, progress="quiet")
    warm = make_run("warm", train={"steps": 2, "checkpoint_every": None,
                                   "init_from": {"run": str(first.parent / "out"), "step": 4}}, eval={"every": None})
    train(warm, progress="quiet")
    said = []
    point = merge_run(warm.parent / "out", [0], say=said.append)["points"][0]
    base, baseline = train_records(first.parent / "out", "eval")[0], train_records(warm.parent / "out", "eval")[0]
    assert not point["reused"] and any("warm start" in line for line in said)
    assert _close(point["metrics"], base["metrics"], tol=1e-5)  # the base model's numbers ...
    assert not _close(point["metrics"], baseline["metrics"], tol=1e-3)  # ... not the warm start's
    delta = point["retention"]["valid/general/loss"]
    assert delta["baseline"] == baseline["metrics"]["valid/general/loss"]  # retention: against the run's baseline
