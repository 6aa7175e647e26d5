"""A tiny sweep: the conftest's 12-step tiny-Llama run as the base config, a sweep file beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


@pytest.fixture
def make_sweep(make_run):
    """Writes the base run (short: 6 steps, one checkpoint at 3) and a sweep file; returns the sweep path."""

    def make(name: str = "sw", run: dict | None = None, **spec) -> Path:
        updates = {"train": {"steps": 6, "checkpoint_every": 3, "warmup": 1}, "eval": {"every": None}}
        for key, value in (run or {}).items():
            updates.setdefault(key, {}).update(value) if isinstance(value, dict) else updates.update({key: value})
        run_path = make_run(name, **updates)
        path = run_path.parent / "sweep.yaml"
        path.write_text(yaml.safe_dump({"run": "run.yaml", "output": "sweep_out", **spec}, sort_keys=False))
        return path

    return make
