"""`keepmix sweep`: run every arm of a sweep (or one, or none), then write the answer.

Contract of `run_sweep(path, ...)`: loads and checks the sweep (every arm's config, every arm folder —
a folder holding another run stops the sweep before any arm starts, nothing changed), trains the branch
prefix once when there is one, then the arms: completed arms are reused, an interrupted arm resumes exactly
from its newest checkpoint, new arms train. The base model is evaluated once per group of arms that share
it (keepmix.sweep.arms.share_baseline): by the prefix, or by the first arm. `parallel` > 1 runs that many
arms at once as child processes (`keepmix sweep FILE --arm NAME`), one GPU each (CUDA_VISIBLE_DEVICES)
when there are GPUs, else CPU processes sharing the cores; their output goes to <output>/logs/<arm>.log.
`arm=` runs one arm only (a cluster job; the baseline arm or prefix must have run first) and writes no
answer. `collect=True` trains nothing: it reads the arms that are there (run elsewhere) and writes the
answer. Every arm trained or resumed gets its report.html (`reports=False`: none). Otherwise the answer
is written when all arms are done; `verify=True` then trains the recommended
mixture as <output>/verify and reports predicted vs measured. Returns the answer (the sweep.json data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from keepmix.errors import KeepmixError
from keepmix.sweep.arms import Arm, arm_state, run_arm, share_baseline
from keepmix.sweep.spec import Sweep, arm_named, load_sweep
from keepmix.training import checkpoint as ckpt


def _prefix_done(prefix: Arm, at: int) -> bool:
    return (ckpt.step_dir(prefix.run_dir / "checkpoints", at) / ckpt.MARKER).exists()


def _baseline_ready(arm: Arm) -> bool:
    other = (arm.config.get("eval") or {}).get("baseline_from")
    if not other:
        return True
    from keepmix.report.metrics import evals, read_metrics

    path = Path(other) / "metrics.jsonl"
    return path.exists() and any(r.get("step") == 0 for r in evals(read_metrics(path)))


def plan(sweep: Sweep, only: str | None = None) -> tuple[Arm | None, dict[str, str]]:
    """The prefix (or None) and each arm's state, after sharing the baseline; raises on a foreign folder.
    `only`: check just that arm's folder (a job running one arm leaves its siblings' folders alone: they
    may be mid-write in other jobs)."""
    prefix = sweep.prefix()
    share_baseline(sweep.arms, first=prefix)
    states = {}
    if prefix is not None and only in (None, "prefix"):
        state = arm_state(prefix)
        states["prefix"] = "completed" if _prefix_done(prefix, sweep.branch.at) else state
    target = arm_named(sweep, only) if only not in (None, "prefix") else None
    for arm in sweep.arms:
        if only is None or arm is target:
            states[arm.name] = arm_state(arm)
    return prefix, states


def run_sweep(path: str | Path, *, parallel: int = 1, arm: str | None = None, collect: bool = False,
              verify: bool = False, progress: str = "auto", output: str | Path | None = None,
              reports: bool = True, say=None) -> dict | None:
    say = say or (lambda text: print(f"keepmix sweep: {text}", flush=True))
    started = time.perf_counter()
    sweep = load_sweep(path, output=output)
    if parallel < 1:
        raise KeepmixError(f"--parallel {parallel}: expected 1 or more arms at once")
    prefix, states = plan(sweep, only=None if collect else arm)
    if collect:
        from keepmix.sweep.answer import write_answer

        return write_answer(sweep, collect=True, say=say)
    if arm == "prefix" and prefix is not None:
        if states["prefix"] != "completed":
            run_arm(prefix, progress=progress, stop_at=sweep.branch.at, say=say)
        return None
    if arm is not None:
        one = arm_named(sweep, arm)
        if prefix is not None and not _prefix_done(prefix, sweep.branch.at):
            raise KeepmixError(f"--arm {one.name}: the branch prefix has not run yet; run it first with "
                               f"`keepmix sweep {sweep.path} --arm prefix` (nothing was changed)")
        if not _baseline_ready(one):
            raise KeepmixError(f"--arm {one.name}: its baseline comes from {one.config['eval']['baseline_from']}, "
                               f"which has no step-0 eval yet; run that arm first (nothing was changed)")
        if run_arm(one, progress=progress, say=say) != "reused" and reports:
            _render_report(one)
        return None
    say(f"{len(sweep.arms)} arms in {sweep.output}: " + ", ".join(f"{n} ({s})" for n, s in states.items()))
    sweep.output.mkdir(parents=True, exist_ok=True)
    if prefix is not None and states["prefix"] != "completed":
        say(f"branch prefix: the base config to step {sweep.branch.at}, shared by every arm")
        run_arm(prefix, progress=progress, stop_at=sweep.branch.at, say=say)
    first = [a for a in sweep.arms if not (a.config.get("eval") or {}).get("baseline_from")]
    rest = [a for a in sweep.arms if a not in first]
    if parallel == 1:
        for one in first + rest:
            if run_arm(one, progress=progress, say=say) != "reused" and reports:
                _render_report(one)
    else:
        _run_parallel(sweep, first, parallel, say, reports)  # the arms that evaluate a baseline go first
        _run_parallel(sweep, rest, parallel, say, reports)
    (sweep.output / "timing.json").write_text(json.dumps({"run_s": round(time.perf_counter() - started, 1),
                                                          "parallel": parallel}) + "\n")
    from keepmix.sweep.answer import write_answer

    answer = write_answer(sweep, say=say)
    if verify and answer.get("recommendation", {}).get("settings"):
        from keepmix.sweep.answer import verify_recommendation

        answer = verify_recommendation(sweep, answer, progress=progress, say=say)
    return answer


def _render_report(arm: Arm) -> None:
    """The arm's report.html, as `keepmix train` leaves one."""
    from keepmix.report.html import render_report

    render_report([arm.run_dir])


def _run_parallel(sweep: Sweep, arms: list[Arm], n: int, say, reports: bool) -> None:
    if not arms:
        return
    logs = sweep.output / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gpus = _gpu_count()
    threads = max(1, (os.cpu_count() or 1) // n)

    def one(index_arm: tuple[int, Arm]) -> tuple[str, int]:
        index, arm = index_arm
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        else:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "keepmix", "sweep", str(sweep.path), "--arm", arm.name, "--quiet",
               "--output", str(sweep.output), *([] if reports else ["--no-report"])]
        with open(logs / f"{arm.name}.log", "a") as log:
            return arm.name, subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    say(f"running {len(arms)} arms, {n} at once ({'one GPU each' if gpus else f'{threads} CPU threads each'}); "
        f"logs in {logs}")
    with ThreadPoolExecutor(n) as pool:
        failed = [(name, rc) for name, rc in pool.map(one, enumerate(arms)) if rc != 0]
    if failed:
        raise KeepmixError("arms failed: " + ", ".join(f"{name} (exit {rc}, see {logs / (name + '.log')})"
                                                       for name, rc in failed)
                           + "; rerun the sweep to resume them")


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
