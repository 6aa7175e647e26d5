"""Two processes (gloo, CPU) see exactly the data one process sees, and resume exactly.

These launch `torchrun --nproc_per_node 2 -m keepmix train run.yaml`: the README's multi-GPU command
with the device count changed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keepmix.diagnostics.exposures import read_exposures
from tests.conftest import train_records

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RUN = {"train": {"steps": 10, "batch_size": 4, "checkpoint_every": 4}, "eval": {"every": 5}}


def launch(config: Path, processes: int, *args: str, wait: bool = True):
    if processes == 1:
        cmd = [sys.executable, "-m", "keepmix", "train", str(config), "--quiet", "--no-report", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "keepmix", "train", str(config),
               "--quiet", "--no-report", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    return proc


def exposures(run_dir: Path) -> list[tuple]:
    t = read_exposures(run_dir)
    cols = [t.column(c).to_pylist() for c in ("step", "source", "doc_id", "view")]
    return list(zip(*cols))


def test_two_processes_equal_one(make_run):
    one, two = make_run("one", **RUN), make_run("two", **RUN)
    launch(one, 1)
    launch(two, 2)
    a, b = one.parent / "out", two.parent / "out"
    # the same documents in the same global order, step by step
    assert exposures(a) == exposures(b)
    la = [r["loss"] for r in train_records(a)]
    lb = [r["loss"] for r in train_records(b)]
    assert len(la) == len(lb) == 10
    assert lb == pytest.approx(la, rel=1e-4, abs=1e-5)
    assert [r["realized"] for r in train_records(a)] == [r["realized"] for r in train_records(b)]
    ea, eb = train_records(a, "eval"), train_records(b, "eval")
    for x, y in zip(ea, eb):
        assert y["metrics"] == pytest.approx(x["metrics"], rel=1e-4)
    assert train_records(b, "start")[0]["world_size"] == 2
    # no document twice within one pass of its source, across both processes: in global order, the
    # segments of a document (a long one continues in its source's next row) form one unbroken run
    finished = set()
    last = {}
    for step, source, doc, view in exposures(b):
        key = (source, view)
        if last.get(key) != doc:
            assert (source, view, doc) not in finished, (step, source, doc, view)
            if key in last:
                finished.add((source, view, last[key]))
            last[key] = doc


def test_two_process_run_killed_and_resumed_equals_uninterrupted(make_run):
    cfg = {"train": {"steps": 16, "batch_size": 4, "checkpoint_every": 3}, "eval": {"every": 8}}
    whole, killed = make_run("whole", **cfg), make_run("killed", **cfg)
    launch(whole, 2)
    proc = launch(killed, 2, wait=False)
    metrics = killed.parent / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed:\n" + proc.stdout.read())
        if metrics.exists() and '"step": 7,' in metrics.read_text():
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    launch(killed, 2, "--resume")
    a, b = whole.parent / "out", killed.parent / "out"
    assert [r["loss"] for r in train_records(b)] == [r["loss"] for r in train_records(a)]
    assert exposures(a) == exposures(b)
    assert train_records(b, "start")[-1]["resumed_from"] is not None
