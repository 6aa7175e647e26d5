"""`keepmix eval`: the same metrics as a run's evals, for several models side by side."""

from __future__ import annotations

import pytest

from keepmix.eval.runner import evaluate, print_comparison
from keepmix.training.loop import train
from tests.conftest import train_records


# the model as the run builds it: a bf16 run's held-out evals ran under bf16 autocast, a model.dtype run's in
# that dtype with the attention it names, a LoRA run's final/ is an adapter on the config's (here
# from-scratch) base — keepmix eval computes each the same way
@pytest.mark.parametrize("setting", [{"train": {"precision": "auto"}}, {"train": {"precision": "bf16"}},
                                     {"model": {"dtype": "bfloat16", "attn_implementation": "eager"}},
                                     {"model": {"lora": {"r": 4, "alpha": 8}}, "train": {"lr": 3e-2}}],
                         ids=["auto", "bf16-autocast", "bf16-weights", "lora-adapter"])
def test_eval_matches_the_runs_own_evals(make_run, capsys, monkeypatch, setting):
    config = make_run(train={"steps": 4, "checkpoint_every": 4, **setting.get("train", {})},
                      eval={"every": None, "kl_to_base": True}, **({"model": setting["model"]} if "model" in setting else {}))
    train(config, progress="quiet")
    run_dir = config.parent / "out"
    monkeypatch.setattr("keepmix.training.precision.cpu_multiplies_bf16", lambda: False)
    said = []
    results = evaluate(config, models=["base", str(run_dir / "final")], say=said.append)
    # on a CPU that only emulates bf16, a bf16 config's eval says why it is slow
    autocast = setting.get("train", {}).get("precision") == "bf16"
    assert any("AMX or AVX512-BF16" in line for line in said) == autocast
    evals = train_records(run_dir, "eval")
    for key, value in evals[0]["metrics"].items():  # step 0 = the base model
        assert results["base"][key] == pytest.approx(value, rel=1e-5), key
    for key, value in evals[-1]["metrics"].items():  # the end = final/
        assert results[str(run_dir / "final")][key] == pytest.approx(value, rel=1e-5), key
    print_comparison(results)
    out = capsys.readouterr().out
    assert "valid/general/token_acc" in out and "(Δ)" in out


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_checkpoint_evaluates_as_the_run_did_at_its_step(make_run, lora):
    # --model RUN/checkpoints/step-N: the run's model (from the checkpoint's own config) with that step's weights
    config = make_run(train={"steps": 4, "checkpoint_every": 2, **({"lr": 3e-2} if lora else {})},
                      eval={"every": 2}, **({"model": {"lora": {"r": 4, "alpha": 8}}} if lora else {}))
    train(config, progress="quiet")
    run_dir = config.parent / "out"
    steps = {r["step"]: r["metrics"] for r in train_records(run_dir, "eval")}
    folders = {step: str(run_dir / "checkpoints" / f"step-{step:08d}") for step in (2, 4)}
    results = evaluate(config, models=list(folders.values()))
    for step, folder in folders.items():
        assert results[folder].keys() == steps[step].keys()
        for key, value in steps[step].items():
            assert results[folder][key] == pytest.approx(value, rel=1e-5), (step, key)
    assert results[folders[2]] != results[folders[4]]


def test_a_folder_that_holds_no_model_or_a_damaged_checkpoint_is_named(make_run):
    import json
    import shutil

    from keepmix.errors import KeepmixError

    config = make_run(train={"steps": 2, "checkpoint_every": 2}, eval={"every": None},
                      model={"lora": {"r": 4, "alpha": 8}})
    train(config, progress="quiet")
    checkpoint = config.parent / "out" / "checkpoints" / "step-00000002"
    # an adapter trained on another base, which cannot be loaded: named, with the config's own
    adapter = config.parent / "other_adapter"
    shutil.copytree(config.parent / "out" / "final", adapter)
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": "/gone/base"}))
    with pytest.raises(KeepmixError, match=r"could not load the adapter's base model '/gone/base'.*from scratch"):
        evaluate(config, models=[str(adapter)])
    with pytest.raises(KeepmixError, match=r"holds no model \(no config.json"):
        evaluate(config, models=[str(config.parent)])  # the data folder
    with pytest.raises(KeepmixError, match="is a run directory.*checkpoints"):
        evaluate(config, models=[str(config.parent / "out")])
    damaged = config.parent / "damaged"
    shutil.copytree(checkpoint, damaged)
    with open(damaged / "weights.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    with pytest.raises(KeepmixError, match=r"damaged \(weights.safetensors does not match its checksum"):
        evaluate(config, models=[str(damaged)])
    (damaged / "COMPLETE").unlink()
    with pytest.raises(KeepmixError, match="incomplete or damaged .no COMPLETE marker"):
        evaluate(config, models=[str(damaged)])
    (damaged / "sharded").mkdir()
    with pytest.raises(KeepmixError, match=r"sharded \(train.fsdp\) checkpoint"):
        evaluate(config, models=[str(damaged)])


def test_eval_out_makes_its_folder_and_writes_the_results(make_run, capsys):
    import json

    from keepmix.cli import main

    config = make_run()
    out = config.parent / "results" / "nested" / "base.json"
    assert main(["eval", str(config), "--out", str(out)]) == 0
    assert f"written: {out}" in capsys.readouterr().out
    assert "valid/general/loss" in json.loads(out.read_text())["base"]


def test_eval_runs_on_the_configs_threads_and_reads_the_runs_base_states(make_run, monkeypatch):
    # a new process starts on torch's own thread count; the run's (train.threads: 1 here) decides the
    # summation order and keys the base's stored hidden states
    import torch

    from tests.training.test_base_reuse import count_base_passes

    config = make_run(train={"steps": 2, "checkpoint_every": None}, eval={"every": None, "kl_to_base": True})
    train(config, progress="quiet")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calls = count_base_passes(monkeypatch)
        results = evaluate(config, models=["base"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert calls == []  # the run's base states were read, not computed on another thread count
    assert results["base"] == train_records(config.parent / "out", "eval")[0]["metrics"]  # to the bit
