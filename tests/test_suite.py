"""The suite's own set-up: parallel workers share the cores instead of oversubscribing them."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.conftest import share_the_cores_between_workers


def test_a_worker_and_the_commands_it_starts_take_their_share_of_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(2 * cores))  # more workers than cores: one each
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        share_the_cores_between_workers()
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, check=True)
        assert child.stdout.strip() == "1"
    finally:
        torch.set_num_threads(before)


def test_one_process_keeps_the_threads_it_was_given(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    before = torch.get_num_threads()
    share_the_cores_between_workers()
    assert torch.get_num_threads() == before and os.environ["OMP_NUM_THREADS"] == "7"
