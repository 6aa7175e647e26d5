"""Sweeps: arms as ordinary run directories, one baseline, the Pareto front, a fitted mixture, merges.

`keepmix.sweep("sweep.yaml", ...)` runs a sweep (keepmix.sweep.run.run_sweep): this package is callable,
so the Python API and the package share the name without one hiding the other.
"""

from __future__ import annotations

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, path, *, parallel: int = 1, arm: str | None = None, collect: bool = False,
                 verify: bool = False, progress: str = "auto", output=None):
        """Run a sweep YAML's arms (or one, or none with collect=True) and write its answer; returns the
        sweep.json data (None when running one arm)."""
        from keepmix.sweep.run import run_sweep

        return run_sweep(path, parallel=parallel, arm=arm, collect=collect, verify=verify, progress=progress,
                         output=output)


sys.modules[__name__].__class__ = _CallablePackage
