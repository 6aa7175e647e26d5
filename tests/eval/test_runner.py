"""`keepmix eval`: the same metrics as a run's evals, for several models side by side."""

from __future__ import annotations

import pytest

from keepmix.eval.runner import evaluate, print_comparison
from keepmix.training.loop import train
from tests.conftest import train_records


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_eval_matches_the_runs_own_evals(make_run, capsys, monkeypatch, precision):
    # a bf16 run's held-out evals ran under bf16 autocast: keepmix eval scores them under it too
    config = make_run(train={"steps": 4, "checkpoint_every": 4, "precision": precision},
                      eval={"every": None, "kl_to_base": True})
    train(config, progress="quiet")
    run_dir = config.parent / "out"
    monkeypatch.setattr("keepmix.training.precision.cpu_multiplies_bf16", lambda: False)
    said = []
    results = evaluate(config, models=["base", str(run_dir / "final")], say=said.append)
    # on a CPU that only emulates bf16, a bf16 config's eval says why it is slow
    assert any("AMX or AVX512-BF16" in line for line in said) == (precision == "bf16")
    evals = train_records(run_dir, "eval")
    for key, value in evals[0]["metrics"].items():  # step 0 = the base model
        assert results["base"][key] == pytest.approx(value, rel=1e-5), key
    for key, value in evals[-1]["metrics"].items():  # the end = final/
        assert results[str(run_dir / "final")][key] == pytest.approx(value, rel=1e-5), key
    print_comparison(results)
    out = capsys.readouterr().out
    assert "valid/general/token_acc" in out and "(Δ)" in out


def test_eval_out_makes_its_folder_and_writes_the_results(make_run, capsys):
    import json

    from keepmix.cli import main

    config = make_run()
    out = config.parent / "results" / "nested" / "base.json"
    assert main(["eval", str(config), "--out", str(out)]) == 0
    assert f"written: {out}" in capsys.readouterr().out
    assert "valid/general/loss" in json.loads(out.read_text())["base"]
