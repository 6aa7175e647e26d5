"""keepmix: continued pre-training on a scheduled, curated data mixture.

Python API: `train(config_or_path)`, `sweep(sweep_yaml)`, `merge(run_dir, alphas)`, `evaluate(config_or_path, models=[...])`, `load_config(path)`.
"""

__version__ = "0.1.0"

from keepmix.config import RunConfig, load_config  # noqa: E402
from keepmix.errors import ConfigError, KeepmixError  # noqa: E402
from keepmix import sweep  # noqa: E402 - a callable package: keepmix.sweep("sweep.yaml")


def train(config, *, resume: bool = False, progress: str = "auto", overrides: dict | None = None,
          stop_at: int | None = None):
    """Train (or resume) the run a `RunConfig` or YAML path describes; returns a `TrainResult`.

    `stop_at` ends this session after that step with a checkpoint, to resume later.
    """
    from keepmix.training.loop import train as _train

    return _train(config, resume=resume, progress=progress, overrides=overrides, stop_at=stop_at)


def evaluate(config, models=("base",), overrides: dict | None = None):
    """The config's held-out and task metrics for each model (folder, hub id, or 'base')."""
    from keepmix.eval.runner import evaluate as _evaluate

    return _evaluate(config, models=list(models), overrides=overrides)


def merge(run_dir, alphas=(0, 0.25, 0.5, 0.75, 1), *, write: float | None = None):
    """Evaluate θ0 + α(θ − θ0) of a run for each α; writes run_dir/merge.json and returns it."""
    from keepmix.sweep.merge import merge_run

    return merge_run(run_dir, list(alphas), write=write)


__all__ = ["sweep", "merge", "train", "evaluate", "load_config", "RunConfig", "ConfigError", "KeepmixError"]
