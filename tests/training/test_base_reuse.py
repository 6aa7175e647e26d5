"""The base model's held-out pass in a run's evals: skipped at step 0 (the model is its base), kept for
the evals after it, with the same metrics as computing it every time."""

import pytest

import keepmix
import keepmix.training.forward as forward
from keepmix.training.session import Session
from tests.conftest import train_records


def test_evals_reuse_the_base_and_report_the_same_numbers(make_run, monkeypatch):
    settings = {"train": {"steps": 6, "checkpoint_every": None, "lr": 1e-2}, "eval": {"every": 3, "kl_to_base": True}}
    calls = []  # forward passes of the frozen base's trunk
    init = forward.FrozenBase.__init__

    def counted(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.trunk.register_forward_hook(lambda *_: calls.append(1))

    monkeypatch.setattr(forward.FrozenBase, "__init__", counted)
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
