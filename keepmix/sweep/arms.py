"""One arm runner for keepmix: where an arm's folder is, whether it is reused, how the baseline is shared.

Contract: an `Arm` is a name, a run config (plain data, absolute paths, `output` = the arm's folder) and
the settings that make it differ from its siblings. `arm_state` reads the folder without writing:
'new' (nothing there), 'completed' (a completed run of this very config: reused, not retrained),
'unfinished' (a run of this config with a checkpoint: resumed exactly with --resume), 'restart' (a run of
this config stopped before its first checkpoint: nothing to resume, started over), or it raises a
`KeepmixError` naming the folder and the keys that differ (a run of another config is never touched).
`share_baseline` points every arm's `eval.baseline_from` at the first arm that evaluates the same model on
the same held-out data and tasks (`config.baseline_changes`), so the base model is evaluated once per such
group. `run_arm` trains, resumes or reuses one arm; `run_arms` does that in order. The demo, the
experiments and `keepmix sweep` all run their arms through here.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from keepmix.config import RunConfig, baseline_changes, changed_keys, config_to_dict, parse_config
from keepmix.errors import ConfigError, KeepmixError

# Keys that may differ between a completed arm and the arm asked for, with the arm still reused: they
# change where caches live and how fast the run goes, not what it computes.
REUSE_SAFE_KEYS = ("cache_dir", "trackers", "train.threads", "train.keep_freed_memory", "train.device",
                   "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "eval.baseline_from")


@dataclass
class Arm:
    name: str
    config: dict  # run config data; `output` is the arm's folder
    settings: dict = field(default_factory=dict)  # key path -> value: what this arm changes
    source: str = ""  # names the arm in errors ("sweep.yaml: arm lr=3e-4")
    base_dir: Path = Path(".")  # relative paths in `config` resolve here

    @property
    def run_dir(self) -> Path:
        return (self.base_dir / self.config["output"]).resolve()

    def parse(self, *, links: bool = True) -> RunConfig:
        """The validated run config; links=False leaves out eval.baseline_from and train.init_from, whose
        targets exist only once earlier arms have run."""
        data = copy.deepcopy(self.config)
        if not links:
            (data.get("eval") or {}).pop("baseline_from", None)
            (data.get("train") or {}).pop("init_from", None)
        return parse_config(data, source=self.source or f"arm {self.name}", base_dir=self.base_dir)


def check_arms(arms: list[Arm]) -> list[RunConfig]:
    """Every arm's config validated before any arm starts: one ConfigError listing each arm's problems."""
    problems, configs = [], []
    names = [arm.name for arm in arms]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"arm {name!r}: two arms have this name (their folders would collide)")
    for arm in arms:
        try:
            configs.append(arm.parse(links=False))
        except ConfigError as err:
            problems += [f"arm {arm.name}: {p}" for p in err.problems]
    if problems:
        raise ConfigError(arms[0].source.split(":")[0] if arms and arms[0].source else "arms", problems)
    return configs


def _status(run_dir: Path) -> str | None:
    from keepmix.report.metrics import read_metrics, run_status

    path = run_dir / "metrics.jsonl"
    return run_status(read_metrics(path)).status if path.exists() else None


def arm_state(arm: Arm, cfg: RunConfig | None = None) -> str:
    """'new', 'completed' or 'unfinished' (see the module doc); a foreign run is a KeepmixError."""
    run_dir = arm.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise KeepmixError(f"arm {arm.name}: {run_dir} is a file; expected a run folder (nothing was changed)")
    saved = run_dir / "config.yaml"
    if not saved.exists():
        if run_dir.is_dir() and any(p.name != "logs" for p in run_dir.iterdir()):
            raise KeepmixError(f"arm {arm.name}: {run_dir} holds files but no keepmix run (no config.yaml); "
                               f"nothing was changed. Move it away or set another sweep output.")
        return "new"
    cfg = cfg or arm.parse(links=False)  # the links' targets may not exist yet; compare them as given
    want = config_to_dict(cfg)
    init = (arm.config.get("train") or {}).get("init_from")
    if init:
        want["train"]["init_from"] = {"run": str((arm.base_dir / init["run"]).resolve()), "step": init["step"],
                                      "optimizer": init.get("optimizer", False)}
    have = yaml.safe_load(saved.read_text()) or {}
    differ = changed_keys(have, want, safe=REUSE_SAFE_KEYS)
    if differ:
        raise KeepmixError(f"arm {arm.name}: {run_dir} holds a run of another config ({', '.join(differ)} "
                           f"differ); it is not this arm's, and nothing was changed. Move it away or set "
                           f"another sweep output.")
    status = _status(run_dir)
    if status == "completed":
        return "completed"
    from keepmix.training.checkpoint import latest_checkpoint

    if latest_checkpoint(run_dir / "checkpoints") is not None:
        return "unfinished"
    return "restart" if status is not None else "new"


def share_baseline(arms: list[Arm], first: Arm | None = None) -> None:
    """Set each arm's eval.baseline_from to the first arm (or `first`, e.g. a branch prefix) that scores
    the same untouched model on the same held-out data; an arm unlike every earlier one evaluates its own."""
    evaluators: list[tuple[Arm, dict]] = []
    for arm in ([first] if first else []) + arms:
        arm.config.setdefault("eval", {})["baseline_from"] = None
        mine = config_to_dict(arm.parse(links=False))
        for other, theirs in evaluators:
            if not baseline_changes(theirs, mine):
                arm.config["eval"]["baseline_from"] = str(other.run_dir)
                break
        else:
            evaluators.append((arm, mine))


def run_arm(arm: Arm, *, progress: str = "auto", stop_at: int | None = None, keep_checkpoints: bool = True,
            say=print) -> str:
    """Train, resume or reuse one arm; returns what happened: 'trained', 'resumed' or 'reused'."""
    from keepmix.training.loop import train

    state = arm_state(arm)
    if state == "completed":
        say(f"arm {arm.name}: reusing the completed run in {arm.run_dir}")
        return "reused"
    cfg = arm.parse()
    if state == "unfinished":
        say(f"arm {arm.name}: resuming the interrupted run in {arm.run_dir}")
    if state == "restart":  # this arm's own run, stopped before its first checkpoint: nothing to resume
        say(f"arm {arm.name}: {arm.run_dir} stopped before its first checkpoint; starting it over")
        shutil.rmtree(arm.run_dir)
    result = train(cfg, resume=state == "unfinished", progress=progress, stop_at=stop_at)
    if result.status not in ("completed", "stopped") or (result.status == "stopped" and stop_at is None):
        raise KeepmixError(f"arm {arm.name} ended with status {result.status!r}; see {arm.run_dir}/metrics.jsonl")
    if not keep_checkpoints and result.status == "completed":
        shutil.rmtree(arm.run_dir / "checkpoints", ignore_errors=True)  # final/ holds the trained weights
    return "resumed" if state == "unfinished" else "trained"


def run_arms(arms: list[Arm], *, progress: str = "auto", keep_checkpoints: bool = True, say=print) -> dict[str, str]:
    """Check every arm, share the baseline, then run them one after another; {arm: what happened}."""
    check_arms(arms)
    share_baseline(arms)
    for arm in arms:
        arm_state(arm)  # a foreign folder anywhere stops the arms before the first one starts
    return {arm.name: run_arm(arm, progress=progress, keep_checkpoints=keep_checkpoints, say=say) for arm in arms}
