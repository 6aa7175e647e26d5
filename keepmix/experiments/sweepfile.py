"""An experiment's arms as a `keepmix sweep`: the sweep written as YAML in the experiment's folder, run by
the sweep's own runner, and the evals its arms logged.

Contract: `run_sweep_spec(out, name, spec)` writes `spec` (a sweep mapping, docs/SWEEP.md) to
`<out>/<name>.yaml`, runs it with `keepmix.sweep.run.run_sweep` (completed arms reused, interrupted ones
resumed, the branch prefix trained once) and returns the loaded `Sweep`, so the caller finds each arm's
folder (`sweep.arms`, `sweep.output / "prefix"`). `eval_at(run_dir, step)` is the metrics of that run's
eval at `step` (None: its last one); a run without that eval is a `KeepmixError`.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from keepmix.errors import KeepmixError
from keepmix.report.metrics import evals, read_metrics
from keepmix.sweep.run import run_sweep
from keepmix.sweep.spec import Sweep, load_sweep


def run_sweep_spec(out: Path, name: str, spec: dict, *, progress: str = "auto", say=None) -> Sweep:
    """Write the sweep to <out>/<name>.yaml, run it (no per-arm report.html) and return it loaded."""
    path = Path(out) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    run_sweep(path, progress=progress, reports=False, say=say)
    return load_sweep(path)


def eval_at(run_dir: Path, step: int | None = None) -> dict:
    """The metrics of the run's eval at `step`, or of its last eval when step is None."""
    records = evals(read_metrics(Path(run_dir) / "metrics.jsonl"))
    if not records:
        raise KeepmixError(f"{run_dir}: the run logged no eval")
    if step is None:
        return records[-1]["metrics"]
    for record in records:
        if record["step"] == step:
            return record["metrics"]
    raise KeepmixError(f"{run_dir}: no eval at step {step} (evals at steps {[r['step'] for r in records]})")
