"""Exact resume: interrupted runs (stopped, SIGKILLed, killed mid-checkpoint) equal uninterrupted ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import keepmix
from keepmix.errors import NonFiniteLossError
from tests.conftest import deep_update, forgetting_run, train_records

LORA = {"model": {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]}}}
VARIANTS = {"full": {}, "lora": LORA, "bf16": {"train": {"precision": "bf16"}}}  # bf16: autocast on the CPU too


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in train_records(run_dir)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    folder = run_dir / "final"
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stopped_and_resumed_run_is_bit_identical(make_run, variant):
    updates = VARIANTS[variant]
    whole = make_run("whole", **updates)
    parts = make_run("parts", **updates)
    keepmix.train(whole, progress="quiet")
    first = keepmix.train(parts, progress="quiet", stop_at=6)
    assert first.status == "stopped" and first.step == 6
    second = keepmix.train(parts, progress="quiet", resume=True)
    assert second.status == "completed" and second.step == 12
    ref, got = losses(whole.parent / "out"), losses(parts.parent / "out")
    assert [s for s, _ in ref] == list(range(1, 13))
    assert got == ref  # bit-identical floats, every step
    assert_same_weights(final_weights(whole.parent / "out"), final_weights(parts.parent / "out"))
    ref_eval = [r["metrics"] for r in train_records(whole.parent / "out", "eval")]
    got_eval = [r["metrics"] for r in train_records(parts.parent / "out", "eval")]
    assert got_eval == ref_eval


def _run_cli(config: Path, *args: str, env_code: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "keepmix", "train", str(config), "--quiet", "--no-report", *args]
    if env_code is not None:
        cmd = [sys.executable, "-c", env_code, str(config), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            cwd=Path(__file__).resolve().parents[2])


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"training ended before step {step}:\n{proc.stdout.read()}")
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(f'"step": {step},' in line and '"kind": "train"' in line
                                 for line in path.read_text().splitlines()):
            return
        time.sleep(0.005)
    pytest.fail(f"no step {step} within {timeout}s")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "guarded"])
def test_sigkilled_run_resumes_bit_identical(make_run, variant, request):
    # long enough that the kill lands mid-training: 40 steps, checkpoints every 5
    cfg = {"train": {"steps": 40, "checkpoint_every": 5}, "eval": {"every": 20}}
    if variant == "guarded":  # a model that forgets, and a guard that acts (every 2 steps) around the kill
        guard = {"sources": ["general"], "every": 2, "probe_docs": 10, "max_share": 0.5, "gain": 0.25}
        cfg = deep_update(forgetting_run(request.getfixturevalue("general_model"), guard), cfg)
    whole, killed = make_run("whole", **cfg), make_run("killed", **cfg)
    keepmix.train(whole, progress="quiet")
    proc = _run_cli(killed)
    _wait_for_step(killed.parent / "out", 12, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _run_cli(killed, "--resume")
    out, _ = done.communicate(timeout=300)
    assert done.returncode == 0, out
    starts = train_records(killed.parent / "out", "start")
    assert starts[0]["resumed_from"] is None and starts[-1]["resumed_from"] in (5, 10)
    assert losses(killed.parent / "out") == losses(whole.parent / "out")
    assert_same_weights(final_weights(whole.parent / "out"), final_weights(killed.parent / "out"))
    if variant == "guarded":
        shares = [r["guarded"] for r in train_records(killed.parent / "out")]
        assert shares == [r["guarded"] for r in train_records(whole.parent / "out")]
        assert len({s["general"] for s in shares}) > 2  # the guard moved the shares


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(make_run):
    whole, killed = make_run("whole"), make_run("killed")
    keepmix.train(whole, progress="quiet")
    # The second checkpoint (step 12) dies after writing its weights, before its completion marker.
    code = textwrap.dedent("""
        import os, signal, sys
        import keepmix.training.checkpoint as c
        real = c.save_file
        def dying_save_file(tensors, path):
            real(tensors, path)
            if "step-00000012" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
        c.save_file = dying_save_file
        from keepmix.cli import main
        sys.exit(main(["train", sys.argv[1], "--quiet", "--no-report"]))
    """)
    proc = _run_cli(killed, env_code=code)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckpts = killed.parent / "out" / "checkpoints"
    assert (ckpts / ".staging-step-00000012" / "weights.safetensors").exists()
    assert [p.name for p in ckpts.glob("step-*")] == ["step-00000006"]
    keepmix.train(killed, progress="quiet", resume=True)
    assert losses(killed.parent / "out") == losses(whole.parent / "out")
    assert_same_weights(final_weights(whole.parent / "out"), final_weights(killed.parent / "out"))


def test_non_finite_loss_stops_before_the_update(make_run, monkeypatch):
    from keepmix.training import forward

    config = make_run(train={"checkpoint_every": 2})
    real_forward = forward.LossModel.forward
    seen = {"calls": 0}

    def poisoned(self, input_ids, position_ids, labels, token_weights):
        seen["calls"] += 1
        loss, token_loss, correct = real_forward(self, input_ids, position_ids, labels, token_weights)
        if seen["calls"] == 5:  # the 5th training forward: step 5 (one micro-batch per step)
            seen["model"] = self.model
            seen["before"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            loss = loss * float("nan")
        return loss, token_loss, correct

    monkeypatch.setattr(forward.LossModel, "forward", poisoned)
    monkeypatch.setattr("keepmix.training.loop.validation_metrics", lambda *a, **k: {})  # keep counting simple
    with pytest.raises(NonFiniteLossError, match="step 5: the loss or gradient is not finite"):
        keepmix.train(config, progress="quiet")
    for n, p in seen["model"].named_parameters():
        assert torch.equal(p.detach(), seen["before"][n]), n
    run_dir = config.parent / "out"
    assert [r["step"] for r in train_records(run_dir)] == [1, 2, 3, 4]
    assert train_records(run_dir, "end")[-1]["status"] == "non_finite"
    from keepmix.training.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.name == "step-00000004"
    weights = load_checkpoint(ckpt)["weights"]
    params = dict(seen["model"].named_parameters())
    for n, t in weights.items():
        assert torch.equal(t, params[n].detach()), n


# ---- nothing lost: damaged checkpoints fall back, runs without one refuse, failed starts rerun -----------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, only the checksum can tell
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated-weights": lambda ck: _truncate(ck / "weights.safetensors"),
    "missing-optimizer": lambda ck: (ck / "optimizer.pt").unlink(),
    "corrupt-state": lambda ck: (ck / "state.json").write_text('{"step": 8, "sampler": {'),
    "scrambled-weights": lambda ck: _scramble(ck / "weights.safetensors"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(make_run, damage, capsys):
    cfg = {"train": {"checkpoint_every": 4}}
    whole, broken = make_run("whole", **cfg), make_run("broken", **cfg)
    keepmix.train(whole, progress="quiet")
    keepmix.train(broken, progress="quiet", stop_at=8)  # checkpoints at steps 4 and 8
    run_dir = broken.parent / "out"
    DAMAGE[damage](run_dir / "checkpoints" / "step-00000008")
    capsys.readouterr()
    result = keepmix.train(broken, progress="quiet", resume=True)
    said = capsys.readouterr().out
    assert result.status == "completed"
    assert "checkpoint step-00000008 is damaged (" in said and "resuming from step-00000004" in said, said
    start = train_records(run_dir, "start")[-1]
    assert start["resumed_from"] == 4 and list(start["damaged_checkpoints"]) == ["step-00000008"]
    # from step 4 the resumed run is the uninterrupted one, bit for bit
    assert losses(run_dir) == losses(whole.parent / "out")
    assert_same_weights(final_weights(whole.parent / "out"), final_weights(run_dir))
    from keepmix.diagnostics.exposures import read_exposures

    assert read_exposures(run_dir).to_pandas().equals(read_exposures(whole.parent / "out").to_pandas())  # NaN == NaN


def test_resume_with_no_run_yet_starts_one_and_says_so(make_run, capsys):
    config = make_run()
    result = keepmix.train(config, progress="quiet", resume=True)
    assert result.status == "completed"
    assert f"--resume: no run in {config.parent / 'out'} yet; starting a new one" in capsys.readouterr().out
    assert [r["resumed_from"] for r in train_records(config.parent / "out", "start")] == [None]


def test_a_run_that_failed_before_its_first_step_does_not_block_the_rerun(make_run, monkeypatch, capsys):
    from keepmix.training import loop

    config = make_run("rerun")
    reference = make_run("reference")
    keepmix.train(reference, progress="quiet")
    real = loop.run_rows

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(loop, "run_rows", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        keepmix.train(config, progress="quiet")
    run_dir = config.parent / "out"
    assert [r["kind"] for r in train_records(run_dir, "start")] == ["start"]  # the baseline eval was written
    monkeypatch.setattr(loop, "run_rows", real)
    capsys.readouterr()
    keepmix.train(config, progress="quiet")
    assert "stopped before its first training step (no checkpoint): starting it over" in capsys.readouterr().out
    assert len(train_records(run_dir, "start")) == 1 and len(train_records(run_dir, "eval")) == 3
    assert losses(run_dir) == losses(reference.parent / "out")


def test_an_unexpected_error_is_one_paragraph_with_the_traceback_in_the_run_folder(make_run, monkeypatch, capsys):
    from keepmix.cli import main
    from keepmix.training import loop

    config = make_run()
    keepmix.train(config, progress="quiet", stop_at=6)

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(loop, "run_rows", broken)
    assert main(["train", str(config), "--resume", "--quiet", "--no-report"]) == 1
    err = capsys.readouterr().err
    assert "keepmix: error: an unexpected ZeroDivisionError stopped keepmix (division by zero). This is a bug" in err
    assert "Traceback" not in err
    dumps = list((config.parent / "out").glob("keepmix-error-*.txt"))
    assert len(dumps) == 1 and str(dumps[0]) in err
    text = dumps[0].read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text
    assert main(["--debug", "train", str(config), "--resume", "--quiet", "--no-report"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err
