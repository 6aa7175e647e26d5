"""The sweep file: one base run config and what varies between the arms.

Contract: `load_sweep(path)` reads a sweep YAML (docs/SWEEP.md) and returns a `Sweep` whose arms are
expanded and checked — every arm's run config validated, all problems of all arms in one ConfigError —
before any arm starts. Keys:
  run:     the base run config: a path (relative to the sweep file) or an inline mapping;
  output:  the sweep's folder (arms in <output>/<arm>, the answer in <output>/sweep.{md,json,html});
  arms:    named arms, {name: {key path: value}};
  grid:    {key path: [values]}: every combination is an arm, named by its settings;
  random:  {n, seed, alpha (Dirichlet concentration, 1 = uniform), sources (default all)}: n constant
           mixtures drawn from a Dirichlet over the sources' weights (RegMix-style);
  branch:  {at: N, optimizer: bool, set: {key path: value}}: train the base config once to step N (the
           prefix, <output>/prefix), then start every arm from that checkpoint (train.init_from) for the
           remaining train.steps - N steps with its own settings;
  answer:  {task: [metrics], keep: [metrics], tolerance, fit: auto|linear|loglinear}.
Key paths: keepmix.sweep.keys. Arms are the union of `arms`, the `grid` product and the `random` draws.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keepmix.errors import ConfigError, KeepmixError
from keepmix.sweep.arms import Arm, check_arms
from keepmix.sweep.keys import get_key, set_key, short_name, value_label
from keepmix.yamlfile import read_yaml

TOP_KEYS = ("run", "output", "arms", "grid", "random", "branch", "answer")


@dataclass
class Answer:
    task: list[str] = field(default_factory=list)  # metrics to gain (default: every task metric)
    keep: list[str] = field(default_factory=list)  # metrics to keep (default: every valid/<source>/token_acc)
    tolerance: float | None = None  # default: the run's eval.retention_tolerance
    fit: str = "auto"


@dataclass
class Branch:
    at: int
    optimizer: bool = True
    settings: dict = field(default_factory=dict)  # what the prefix changes in the base config


@dataclass
class Sweep:
    path: Path
    output: Path
    base: dict  # the base run config data
    base_dir: Path  # where the base config's relative paths resolve
    arms: list[Arm]
    branch: Branch | None = None
    answer: Answer = field(default_factory=Answer)

    def arm(self, name: str, settings: dict) -> Arm:
        """An arm of this sweep: the base config with `settings` applied (and the branch's warm start)."""
        data = copy.deepcopy(self.base)
        for key, value in settings.items():
            set_key(data, key, value)
        if self.branch is not None:  # the arm's own train.steps (default the base's) counts the prefix too
            steps = get_key(data, "train.steps", 1000)
            data.setdefault("train", {})["steps"] = steps - self.branch.at
            data["train"]["init_from"] = {"run": str(self.output / "prefix"), "step": self.branch.at,
                                          "optimizer": self.branch.optimizer}
        data["output"] = str(self.output / name)
        return Arm(name, data, dict(settings), source=f"{self.path}: arm {name}", base_dir=self.base_dir)

    def prefix(self) -> Arm | None:
        if self.branch is None:
            return None
        data = copy.deepcopy(self.base)
        for key, value in self.branch.settings.items():
            set_key(data, key, value)
        data.setdefault("train", {})["checkpoint_every"] = self.branch.at
        data["output"] = str(self.output / "prefix")
        return Arm("prefix", data, dict(self.branch.settings), source=f"{self.path}: branch prefix",
                   base_dir=self.base_dir)


def _sweep_problem(path: Path, key: str, text: str) -> ConfigError:
    return ConfigError(str(path), [f"{key}: {text}"])


def load_sweep(path: str | Path, *, output: str | Path | None = None) -> Sweep:
    path = Path(path)
    spec = read_yaml(path)
    if not isinstance(spec, dict):
        raise _sweep_problem(path, "(top level)", f"expected a mapping with run: and grid:/random:/arms:, "
                                                  f"got {type(spec).__name__}")
    problems = [f"{k}: unknown key (expected one of {', '.join(TOP_KEYS)})" for k in spec if k not in TOP_KEYS]
    if "run" not in spec:
        problems.append("run: required: the base run config (a path to run.yaml or a mapping)")
    if problems:
        raise ConfigError(str(path), problems)
    run = spec["run"]
    if isinstance(run, str):
        run_path = (path.parent / run).resolve()
        base, base_dir = read_yaml(run_path), run_path.parent
        if not isinstance(base, dict):
            raise _sweep_problem(path, "run", f"{run_path} holds no run config mapping")
    elif isinstance(run, dict):
        base, base_dir = run, path.parent.resolve()
    else:
        raise _sweep_problem(path, "run", f"expected a path or a mapping, got {run!r}")
    out = Path(output) if output is not None else path.parent / spec.get("output", f"sweeps/{path.stem}")
    sweep = Sweep(path=path, output=out.resolve(), base=base, base_dir=base_dir, arms=[],
                  branch=_branch(path, spec.get("branch"), base), answer=_answer(path, spec.get("answer")))
    settings = _explicit(path, spec.get("arms")) + _grid(path, spec.get("grid")) + \
        _random(path, spec.get("random"), base)
    if not settings:
        raise _sweep_problem(path, "grid", "the sweep has no arms: give grid: (keys with lists of values), "
                                           "random: (n mixtures) or arms: (named settings)")
    sweep.arms = [sweep.arm(name, s) for name, s in settings]
    check = check_arms(([sweep.prefix()] if sweep.branch else []) + sweep.arms)
    if sweep.branch is not None and sweep.branch.at >= check[0].train.steps:
        raise _sweep_problem(path, "branch.at", f"the prefix's {sweep.branch.at} steps leave none of the run's "
                                                f"train.steps ({check[0].train.steps}); expected 1 to "
                                                f"{check[0].train.steps - 1}")
    return sweep


def _explicit(path: Path, arms: Any) -> list[tuple[str, dict]]:
    if arms is None:
        return []
    if not isinstance(arms, dict) or not arms:
        raise _sweep_problem(path, "arms", "expected a mapping {arm name: {key path: value}} with at least one arm")
    out = []
    for name, settings in arms.items():
        if not isinstance(settings, dict):
            raise _sweep_problem(path, f"arms.{name}", f"expected a mapping of key paths to values, got {settings!r}")
        out.append((_folder_name(path, f"arms.{name}", str(name)), dict(settings)))
    return out


def _folder_name(path: Path, key: str, name: str) -> str:
    if not name or name in (".", "..", "prefix", "verify", "logs") or "/" in name or "\\" in name:
        raise _sweep_problem(path, key, f"{name!r} cannot name an arm folder (reserved: prefix, verify, logs)")
    return name


def _grid(path: Path, grid: Any) -> list[tuple[str, dict]]:
    if grid is None:
        return []
    if not isinstance(grid, dict) or not grid:
        raise _sweep_problem(path, "grid", "the grid is empty; expected {key path: [values]}, e.g. "
                                           "mixture.floor: [0, 0.05, 0.1]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _sweep_problem(path, f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        settings = dict(zip(keys, combo))
        name = "_".join(f"{short_name(k)}={value_label(v)}" for k, v in settings.items())
        out.append((name, settings))
    return out


def _random(path: Path, spec: Any, base: dict) -> list[tuple[str, dict]]:
    if spec is None:
        return []
    if not isinstance(spec, dict):
        raise _sweep_problem(path, "random", f"expected {{n, seed, alpha, sources}}, got {spec!r}")
    unknown = [k for k in spec if k not in ("n", "seed", "alpha", "sources")]
    if unknown:
        raise _sweep_problem(path, f"random.{unknown[0]}", "unknown key (expected n, seed, alpha, sources)")
    n, seed, alpha = spec.get("n"), spec.get("seed", 0), spec.get("alpha", 1.0)
    if not isinstance(n, int) or n < 1:
        raise _sweep_problem(path, "random.n", f"expected a whole number of mixtures >= 1, got {n!r}")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise _sweep_problem(path, "random.alpha", f"expected a concentration > 0, got {alpha!r}")
    names = [s.get("name") for s in base.get("sources") or [] if isinstance(s, dict)]
    chosen = spec.get("sources", names)
    missing = [s for s in chosen if s not in names] if isinstance(chosen, list) else [chosen]
    if missing or not chosen:
        raise _sweep_problem(path, "random.sources", f"no source named {missing[0] if missing else None!r} "
                                                     f"(sources: {', '.join(map(str, names))})")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        draw = rng.dirichlet([float(alpha)] * len(chosen))
        weights = {name: 0.0 for name in names}
        weights.update({name: round(float(w), 4) for name, w in zip(chosen, draw)})
        out.append((f"random-{i:02d}", {"mixture.weights": weights}))
    return out


def _branch(path: Path, spec: Any, base: dict) -> Branch | None:
    if spec is None:
        return None
    if not isinstance(spec, dict) or "at" not in spec:
        raise _sweep_problem(path, "branch", "expected {at: STEP, optimizer: true|false, set: {key path: value}}")
    unknown = [k for k in spec if k not in ("at", "optimizer", "set")]
    if unknown:
        raise _sweep_problem(path, f"branch.{unknown[0]}", "unknown key (expected at, optimizer, set)")
    at = spec["at"]
    if not isinstance(at, int) or isinstance(at, bool) or at < 1:
        raise _sweep_problem(path, "branch.at", f"expected the prefix's step count (a whole number >= 1), got {at!r}")
    steps = get_key(base, "train.steps", 1000)
    if isinstance(steps, int) and at >= steps:
        raise _sweep_problem(path, "branch.at", f"step {at} is beyond the run: train.steps is {steps}, so a "
                                                f"branch starts at 1 to {steps - 1}")
    settings = spec.get("set") or {}
    if not isinstance(settings, dict):
        raise _sweep_problem(path, "branch.set", f"expected a mapping of key paths to values, got {settings!r}")
    return Branch(at=at, optimizer=bool(spec.get("optimizer", True)), settings=settings)


def _answer(path: Path, spec: Any) -> Answer:
    if spec is None:
        return Answer()
    if not isinstance(spec, dict):
        raise _sweep_problem(path, "answer", f"expected {{task, keep, tolerance, fit}}, got {spec!r}")
    unknown = [k for k in spec if k not in ("task", "keep", "tolerance", "fit")]
    if unknown:
        raise _sweep_problem(path, f"answer.{unknown[0]}", "unknown key (expected task, keep, tolerance, fit)")
    fit = spec.get("fit", "auto")
    if fit not in ("auto", "linear", "loglinear"):
        raise _sweep_problem(path, "answer.fit", f"expected auto, linear or loglinear, got {fit!r}")
    lists = {}
    for key in ("task", "keep"):
        value = spec.get(key) or []
        lists[key] = [value] if isinstance(value, str) else list(value)
    return Answer(task=lists["task"], keep=lists["keep"], tolerance=spec.get("tolerance"), fit=fit)


def arm_named(sweep: Sweep, name: str) -> Arm:
    """An arm by name, or by its index in the listing (a cluster job's array index)."""
    if name.isdigit() and int(name) < len(sweep.arms):
        return sweep.arms[int(name)]
    for arm in sweep.arms:
        if arm.name == name:
            return arm
    raise KeepmixError(f"--arm {name}: no such arm in {sweep.path} (arms: 0..{len(sweep.arms) - 1}: "
                       f"{', '.join(a.name for a in sweep.arms[:8])}{' ...' if len(sweep.arms) > 8 else ''})")
