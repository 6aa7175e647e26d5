"""lm-evaluation-harness tasks scored on the in-memory model: the one module that calls the harness.

Contract:
  - `prepare(task, base_dir)` checks and loads the harness tasks of one `lm_eval` task config, once per
    process (the result is kept, so later evals reuse the loaded documents): the extra is installed; every
    `include_path` folder and every YAML file named in `tasks` exists, and every YAML in them parses (the
    harness itself skips a broken file silently, which would then surface as an unknown task); every
    metric a local task YAML lists is one
    the harness knows (the harness would otherwise try to fetch it from the hub); every name in `tasks`
    is a harness task, group, tag or YAML file; the tasks load (a hub task downloads its data here); and
    every name in `metrics` is one the loaded tasks produce. Each problem is a `KeepmixError` naming the
    task and the problem, so a bad list fails at start-up, not at the first eval.
  - `run(task, model, tokenizer, ...)` scores the model as it is (a LoRA model with its adapter active;
    no save and reload) through the harness's own `HFLM` wrapper and `evaluate`, with the harness's
    prompts, few-shot sets (seeded as `lm_eval` seeds them), filters and metrics; `num_fewshot`, `limit`
    (per harness task), `apply_chat_template` and `bootstrap_iters` are passed through. The global
    random states (python, numpy, torch) are the same after a run as before it, so evals do not change
    training (loading the tasks in `prepare` leaves them alone too). Progress bars and log lines of the
    harness are silenced.
  - Metrics, without the `task/<name>/` prefix: `<entry>/<metric>` and `<entry>/<metric>_stderr` (where
    the harness gives one) and `<entry>/n` (documents scored), for every entry reported: each requested
    task, each requested group that aggregates its tasks (e.g. `mmlu`; its subtasks are not reported),
    and each task of a requested tag or of a group without an aggregate. A metric under a filter other
    than the harness's `none` is `<entry>/<filter>/<metric>` (gsm8k: `gsm8k/strict-match/exact_match`).
  - `directions(task, base_dir)`: {`<entry>`: {metric: higher_is_better}} as the harness declares it,
    for retention.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from keepmix.errors import KeepmixError, raise_all

if TYPE_CHECKING:
    from keepmix.eval.tasks import LmEvalTask

EXTRA = "pip install 'keepmix[lmeval]'"
_NO_FILTER = "none"


@dataclass
class Prepared:
    """The loaded harness tasks of one `lm_eval` task config, and what they report."""

    loaded: dict  # TaskManager.load(): {"tasks": {name: Task}, "groups": {name: Group}, "group_map": {...}}
    entries: list[str]  # the names whose metrics are reported (see the module doc)
    directions: dict[str, dict[str, bool]]  # entry -> metric -> higher is better


_PREPARED: dict[str, Prepared] = {}


def _require_harness(task: LmEvalTask) -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise KeepmixError(
            f"task {task.name!r} (kind lm_eval) needs lm-evaluation-harness, an optional extra: {EXTRA} ({err})"
        ) from None


@contextlib.contextmanager
def _quiet():
    """The harness logs and draws progress bars (on stderr) for every request batch: not in a live table."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _include_paths(task: LmEvalTask, base_dir: Path) -> list[Path]:
    paths = [(Path(base_dir) / Path(p).expanduser()).resolve() for p in task.include_path]
    for p in paths:
        if not p.exists():
            raise KeepmixError(f"include_path: folder not found: {p}")
        if not p.is_dir():
            raise KeepmixError(f"include_path: {p} is a file; give the folder that holds the task YAMLs")
    return paths


def _parse(path: Path) -> dict | None:
    """A task YAML parsed (includes merged) as the harness parses it; None for a YAML that is not a task
    (no `task`/`group` key); a KeepmixError for a file that does not parse."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=False)
    except (yaml.YAMLError, OSError) as err:
        raise KeepmixError(f"{path}: the task YAML does not parse: {' '.join(str(err).split())}") from None
    except ValueError:
        return None  # not a mapping: not a task file
    return cfg if "task" in cfg or "group" in cfg else None


def _local_configs(paths: list[Path], files: list[Path]) -> list[tuple[Path, dict]]:
    """Every task YAML under the folders and every named one, parsed; all that do not parse, together."""
    configs, problems = [], []
    for path in [p for root in paths for p in sorted(root.glob("**/*.yaml"))] + files:
        try:
            cfg = _parse(path)
        except KeepmixError as err:
            problems.append(str(err))
            continue
        if cfg is not None:
            configs.append((path, cfg))
    raise_all(problems, "the task YAMLs")
    return configs


def _check_metric_names(configs: list[tuple[Path, dict]]) -> None:
    import lm_eval.api.metrics  # noqa: F401  (fills the registry)
    from lm_eval.api.registry import metric_registry

    known = ", ".join(sorted(metric_registry.keys()))
    for path, cfg in configs:
        if cfg.get("process_results") is not None:
            continue  # the task computes its own metrics: any name
        for entry in cfg.get("metric_list") or []:
            metric = entry.get("metric") if isinstance(entry, dict) else None
            if not isinstance(metric, str) or "/" in metric or entry.get("hf_evaluate"):
                continue  # a !function metric, or one asked of the `evaluate` library on purpose
            if metric not in metric_registry:
                raise KeepmixError(f"{path}: harness task {cfg.get('task')!r} lists metric {metric!r}, which "
                                   f"lm-evaluation-harness does not produce (known: {known})")


def _specs(task: LmEvalTask, base_dir: Path) -> list[str]:
    """The requested names, a YAML file among them made absolute against the config's folder."""
    out = []
    for name in task.tasks:
        if not name.endswith((".yaml", ".yml")):
            out.append(name)
            continue
        path = (Path(base_dir) / Path(name).expanduser()).resolve()
        if not path.is_file():
            raise KeepmixError(f"tasks: task YAML file not found: {path}")
        out.append(str(path))
    return out


def _task_manager(specs: list[str], paths: list[Path]):
    """A TaskManager over the include_path folders alone when they hold every requested name and no named
    YAML file is a group (indexing the harness's own ~15,000 task files takes seconds), else over them and
    the harness's tasks."""
    from lm_eval.tasks import TaskManager

    def unknown(manager) -> list[str]:
        return [n for n in specs if n not in manager.all_tasks and not Path(n).is_absolute()]

    files = [Path(n) for n in specs if Path(n).is_absolute()]
    local = TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=False)
    if not unknown(local) and not any("group" in (_parse(f) or {}) for f in files):
        return local
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    for name in unknown(manager):
        near = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        where = f" or in include_path ({', '.join(map(str, paths))})" if paths else ""
        raise KeepmixError(f"{name!r} is not an lm-evaluation-harness task, group or tag{where}{hint}")
    return manager


def _entries(loaded: dict) -> list[str]:
    groups, group_map = loaded.get("groups") or {}, loaded.get("group_map") or {}
    children = {c for kids in group_map.values() for c in kids}
    out = []

    def visit(name: str) -> None:
        group = groups.get(name)
        if group is not None and not group.has_aggregation:
            for child in group_map.get(name, []):
                visit(child)
        elif name not in out:
            out.append(name)

    for name in [*groups, *loaded["tasks"]]:
        if name not in children:
            visit(name)
    return out


def _entry_directions(loaded: dict, entry: str) -> dict[str, bool]:
    """A task's own higher_is_better; a group's from its tasks (as the harness reports it)."""
    if entry in loaded["tasks"]:
        return dict(loaded["tasks"][entry].higher_is_better())
    out: dict[str, bool] = {}
    for child in loaded["groups"][entry].get_all_tasks():
        out.update(child.higher_is_better())
    return out


def _load(task: LmEvalTask, base_dir: Path) -> Prepared:
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    paths = _include_paths(task, base_dir)
    specs = _specs(task, base_dir)
    _check_metric_names(_local_configs(paths, [Path(n) for n in specs if Path(n).is_absolute()]))
    manager = _task_manager(specs, paths)
    try:
        loaded = manager.load(specs)
    except Exception as err:  # the harness raises whatever its dataset and config code raises
        raise KeepmixError(f"lm-evaluation-harness could not load {', '.join(task.tasks)}: "
                           f"{type(err).__name__}: {' '.join(str(err).split())[:500]}") from None
    for name, harness_task in loaded["tasks"].items():
        if getattr(harness_task, "UNSAFE_CODE", False) or getattr(harness_task, "MULTIMODAL", False):
            raise KeepmixError(f"harness task {name!r} runs model-written code or needs images; an in-loop "
                               f"eval supports text tasks only")
        # as lm_eval's simple_evaluate does it: a task whose config fixes 0 shots keeps 0
        if task.num_fewshot is not None and harness_task.get_config("num_fewshot") != 0:
            harness_task.set_config(key="num_fewshot", value=task.num_fewshot)
        elif harness_task.get_config("num_fewshot") is None:
            harness_task.set_config(key="num_fewshot", value=0)
        harness_task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    entries = _entries(loaded)
    directions = {e: _entry_directions(loaded, e) for e in entries}
    produced = {m for d in directions.values() for m in d}
    for metric in task.metrics or []:
        if metric not in produced:
            raise KeepmixError(f"metrics: {metric!r} is not a metric these harness tasks produce "
                               f"(they produce: {', '.join(sorted(produced)) or 'none'})")
    return Prepared(loaded, entries, directions)


@contextlib.contextmanager
def _same_random_state(device: torch.device):
    py, npy = random.getstate(), np.random.get_state()
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def prepare(task: LmEvalTask, base_dir: Path) -> Prepared:
    """The checked and loaded harness tasks of `task` (see the module doc); loaded once per process."""
    _require_harness(task)
    key = json.dumps([task.model_dump(mode="json"), str(Path(base_dir).resolve())], sort_keys=True)
    if key not in _PREPARED:
        with _quiet(), _same_random_state(torch.device("cpu")):
            _PREPARED[key] = _load(task, base_dir)
    return _PREPARED[key]


def directions(task: LmEvalTask, base_dir: Path) -> dict[str, dict[str, bool]]:
    return prepare(task, base_dir).directions


def _flatten(results: dict, prepared: Prepared, keep: list[str] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for entry in prepared.entries:
        row = results["results"][entry]
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # name, alias, sample_len; a stderr the harness could not compute is "N/A"
            metric, filter_name = key.split(",", 1)
            if keep is not None and metric.removesuffix("_stderr") not in keep:
                continue
            path = metric if filter_name == _NO_FILTER else f"{filter_name}/{metric}"
            out[f"{entry}/{path}"] = float(value)
        out[f"{entry}/n"] = float(row.get("sample_len", 0))
    return out


def run(task: LmEvalTask, model, tokenizer, *, base_dir: Path, batch_size: int) -> dict[str, float]:
    """The harness's metrics of `model` as it is now (see the module doc), without `task/<name>/`."""
    prepared = prepare(task, base_dir)
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    try:
        with _quiet(), _same_random_state(device):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            results = evaluate(lm=lm, task_dict=prepared.loaded, limit=task.limit,
                               bootstrap_iters=task.bootstrap_iters, log_samples=False,
                               apply_chat_template=task.apply_chat_template,
                               fewshot_as_multiturn=task.apply_chat_template)
    except KeepmixError:
        raise
    except Exception as err:
        raise KeepmixError(f"task {task.name!r}: lm-evaluation-harness failed on {', '.join(task.tasks)}: "
                           f"{type(err).__name__}: {' '.join(str(err).split())[:500]}") from err
    return _flatten(results, prepared, task.metrics)
