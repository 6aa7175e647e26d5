"""The base model's held-out pass in a run's evals: skipped at step 0 (the model is its base), kept for
the evals after it, with the same metrics as computing it every time."""

import pytest

import keepmix
import keepmix.training.forward as forward
from keepmix.training.session import Session
from tests.conftest import train_records

_INIT = forward.FrozenBase.__init__


def count_base_passes(monkeypatch) -> list:
    """A list that gets one entry per forward pass of any FrozenBase's trunk made from now on."""
    calls = []

    def counted(self, *args, **kwargs):
        _INIT(self, *args, **kwargs)
        self.trunk.register_forward_hook(lambda *_: calls.append(1))

    monkeypatch.setattr(forward.FrozenBase, "__init__", counted)
    return calls


def test_evals_reuse_the_base_and_report_the_same_numbers(make_run, monkeypatch):
    settings = {"train": {"steps": 6, "checkpoint_every": None, "lr": 1e-2}, "eval": {"every": 3, "kl_to_base": True}}
    calls = count_base_passes(monkeypatch)
    reused = keepmix.train(make_run("reused", **settings), progress="quiet")
    computed_in_reused_run = len(calls)

    # the same run computing the base in every eval: nothing kept, no step-0 shortcut
    calls.clear()
    monkeypatch.setattr(forward, "REMEMBER_BYTES", 0)
    monkeypatch.setattr(Session, "starts_from_base", property(lambda self: False))
    plain = keepmix.train(make_run("plain", **settings), progress="quiet")
    assert computed_in_reused_run == 0  # step 0 skipped the base; steps 3 and 6 found it kept
    assert len(calls) >= 3  # the plain run computed it in every eval

    evals_reused, evals_plain = train_records(reused.run_dir, "eval"), train_records(plain.run_dir, "eval")
    assert [e["step"] for e in evals_reused] == [0, 3, 6]
    for a, b in zip(evals_reused, evals_plain, strict=True):
        assert a["metrics"].keys() == b["metrics"].keys()
        for key, value in b["metrics"].items():
            assert a["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), (a["step"], key)
    assert evals_reused[0]["metrics"]["valid/general/kl_to_base"] == 0.0
    assert evals_reused[-1]["metrics"]["valid/general/kl_to_base"] > 0.01  # the model really drifted


def test_runs_of_the_same_base_share_its_hidden_states_on_disk(make_run, monkeypatch):
    """The demo's second arm: its baseline comes from the first, so its own evals never ran the base;
    the base's held-out hidden states that the first arm wrote are read instead, to the same bits."""
    import yaml

    settings = {"train": {"steps": 4, "checkpoint_every": None, "lr": 1e-2}, "eval": {"every": None, "kl_to_base": True}}
    first = make_run("arms", **settings)
    keepmix.train(first, progress="quiet")
    written = sorted((first.parent / "cache" / "base_hidden").glob("*.safetensors"))
    assert written  # the first arm's step-0 eval (the model is its base) wrote the base's states

    config = yaml.safe_load(first.read_text())
    config["mixture"]["schedule"] = [{"at": 0.0, "weights": {"general": 0.2, "qa": 0.8}}]
    config["eval"]["baseline_from"] = "out"
    runs = {}
    for name, cache in (("shared", "cache"), ("alone", "cache_alone")):
        path = first.parent / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**config, "output": name, "cache_dir": cache}))
        calls = count_base_passes(monkeypatch)
        runs[name] = (keepmix.train(path, progress="quiet"), len(calls))
    (shared, shared_calls), (alone, alone_calls) = runs["shared"], runs["alone"]
    assert shared_calls == 0 and alone_calls > 0  # the base ran only where nothing was on disk
    final_shared = train_records(shared.run_dir, "eval")[-1]["metrics"]
    final_alone = train_records(alone.run_dir, "eval")[-1]["metrics"]
    assert final_shared == final_alone  # bit for bit, KL included
    assert final_shared["valid/general/kl_to_base"] > 0.01
    assert sorted((first.parent / "cache" / "base_hidden").glob("*.safetensors")) == written  # nothing new


def test_a_lora_runs_base_states_serve_keepmix_eval_of_its_base_model(make_run, monkeypatch):
    """A LoRA run's base is its model with the adapter off — the plain base model's computation, which
    keepmix eval and merge load — so they read the states the run wrote instead of running the base (KL 0
    to the bit for the base model itself)."""
    from keepmix.eval.runner import evaluate

    config = make_run(model={"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}},
                      train={"steps": 4, "checkpoint_every": None, "lr": 3e-2}, eval={"every": None, "kl_to_base": True})
    keepmix.train(config, progress="quiet")
    store = config.parent / "cache" / "base_hidden"
    written = sorted(store.glob("*.safetensors"))
    assert written
    calls = count_base_passes(monkeypatch)
    results = evaluate(config, ["base"])
    assert calls == [] and sorted(store.glob("*.safetensors")) == written  # read, not computed again
    assert results["base"]["valid/general/kl_to_base"] == 0.0 and results["base"]["valid/qa/kl_to_base"] == 0.0
