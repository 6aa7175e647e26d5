"""train.precision on the CPU: `bf16` runs under bf16 autocast (matmuls in bf16, float32 weights; the held-out
evals too, as on a GPU, so a run's deltas compare like with like), `auto` and `fp32` stay float32, one process may switch between them, and a CPU that only
emulates bf16 is named at the start. (Exact resume under bf16: tests/training/test_resume.py. What bf16
buys on a CPU with AMX: docs/PERFORMANCE.md.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import keepmix
from keepmix.training import precision
from tests.conftest import train_records


@pytest.fixture
def linear_outputs():
    """(training?, dtype) of every nn.Linear output while the fixture lives: what the matmuls ran in."""
    seen: list[tuple[bool, torch.dtype]] = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
            seen.append((module.training, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


def test_the_precision_each_setting_means_on_cuda_and_on_the_cpu():
    assert precision.mixed_precision("auto", cuda=True) == "bf16"
    assert precision.mixed_precision("bf16", cuda=True) == "bf16"
    assert precision.mixed_precision("fp32", cuda=True) == "no"
    assert precision.mixed_precision("auto", cuda=False) == "no"  # the CPU default: the same numbers on every CPU
    assert precision.mixed_precision("fp32", cuda=False) == "no"
    assert precision.mixed_precision("bf16", cuda=False) == "bf16"


def test_bf16_on_a_cpu_that_only_emulates_it_is_named(monkeypatch):
    monkeypatch.setattr(precision, "cpu_multiplies_bf16", lambda: False)
    text = precision.slow_bf16_notice("bf16", cuda=False)
    assert "AMX or AVX512-BF16" in text and "fp32" in text
    assert precision.slow_bf16_notice("auto", cuda=False) is None
    assert precision.slow_bf16_notice("bf16", cuda=True) is None
    monkeypatch.setattr(precision, "cpu_multiplies_bf16", lambda: True)
    assert precision.slow_bf16_notice("bf16", cuda=False) is None


def test_bf16_trains_and_evaluates_in_bf16_with_float32_weights(make_run, linear_outputs):
    settings = {"train": {"steps": 4, "checkpoint_every": None}, "eval": {"every": None}}
    fp32 = keepmix.train(make_run("fp32", **settings), progress="quiet")
    fp32_seen = list(linear_outputs)
    linear_outputs.clear()
    # the same process asks accelerate for another precision, then goes back: both are honoured
    bf16 = keepmix.train(make_run("bf16", train={**settings["train"], "precision": "bf16"}, eval=settings["eval"]),
                         progress="quiet")
    bf16_seen = list(linear_outputs)
    linear_outputs.clear()
    again = keepmix.train(make_run("again", **settings), progress="quiet")

    assert {dtype for training, dtype in fp32_seen} == {torch.float32}
    assert {dtype for training, dtype in bf16_seen} == {torch.bfloat16}
    assert {training for training, _ in bf16_seen} == {True, False}  # the steps, and the step-0 and final evals
    starts = {name: train_records(r.run_dir, "start")[0]["precision"] for name, r in
              (("fp32", fp32), ("bf16", bf16), ("again", again))}
    assert starts == {"fp32": "fp32", "bf16": "bf16", "again": "fp32"}

    ref = [r["loss"] for r in train_records(fp32.run_dir)]
    got = [r["loss"] for r in train_records(bf16.run_dir)]
    assert [r["loss"] for r in train_records(again.run_dir)] == ref  # the fp32 run after bf16 is the fp32 run
    assert got != ref  # bf16 matmuls: not the float32 numbers ...
    assert got == pytest.approx(ref, rel=2e-2)  # ... but the same training
    evals = [[r["metrics"] for r in train_records(run.run_dir, "eval")] for run in (fp32, bf16)]
    for a, b in zip(*evals, strict=True):
        assert b.keys() == a.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=5e-2, abs=5e-3), key
    weights = {}
    for f in sorted(bf16.final_dir.glob("*.safetensors")):
        weights.update(load_file(f))
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}  # float32 master weights
