"""Atomic checkpoints: a folder counts only once it is complete.

Contract: `save_checkpoint` writes everything a resume needs into a staging folder
(`checkpoints/.staging-step-N`), writes a COMPLETE marker last, then publishes it by renaming to
`checkpoints/step-N` and prunes older complete ones down to `keep`. A crash at any point leaves the
previous complete checkpoint usable; `latest_checkpoint` ignores anything without the marker.
Contents: trainable weights (safetensors), optimizer and LR-scheduler state (torch.save, loaded with
weights_only=True), RNG states, and a JSON `state.json` (counters, sampler, anything JSON-able). Under
FSDP the weights and optimizer state are instead in `sharded/` (torch.distributed.checkpoint), which every
process writes into the staging folder before the main process publishes it (`staging_dir` first).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from keepmix.errors import KeepmixError

MARKER = "COMPLETE"
SHARDED = "sharded"  # torch.distributed.checkpoint folder: one file per process + .metadata


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def rng_state() -> dict:
    # keepmix derives data randomness from (seed, source, pass); only torch's generators (dropout) carry state.
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_path(root: Path, step: int) -> Path:
    return root / f".staging-step-{step:08d}"


def staging_dir(root: Path, step: int) -> Path:
    """A fresh, empty staging folder for step `step` (the main process makes it)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = staging_path(root, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def save_checkpoint(root: Path, step: int, *, weights: dict[str, torch.Tensor] | None, optimizer: dict | None,
                    scheduler: dict, state: dict, keep: int, extra_files: dict[str, str] | None = None,
                    staging: Path | None = None) -> Path:
    """Write the rest of a checkpoint into `staging` (made here if not given) and publish it.

    weights/optimizer None: they are already in `staging/sharded` (FSDP, written by every process).
    """
    staging = staging or staging_dir(root, step)
    if weights is not None:
        save_file({n: t.contiguous().cpu() for n, t in weights.items()}, staging / "weights.safetensors")
    if optimizer is not None:
        torch.save(optimizer, staging / "optimizer.pt")
    torch.save(scheduler, staging / "scheduler.pt")
    torch.save(rng_state(), staging / "rng.pt")
    (staging / "state.json").write_text(json.dumps(state))
    for name, text in (extra_files or {}).items():
        (staging / name).write_text(text)
    for f in staging.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    (staging / MARKER).write_text(str(step))
    final = step_dir(root, step)
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(root)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    found = [p for p in root.glob("step-*") if (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    """Everything saved, loaded without unpickling arbitrary objects."""
    if not (path / MARKER).exists():
        raise KeepmixError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    sharded = path / SHARDED
    try:
        return {
            # a sharded (FSDP) checkpoint keeps weights and optimizer state in `sharded/`, read by every process
            "sharded": sharded if sharded.is_dir() else None,
            "weights": None if sharded.is_dir() else load_file(path / "weights.safetensors"),
            "optimizer": None if sharded.is_dir() else torch.load(path / "optimizer.pt", weights_only=True),
            "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
            "rng": torch.load(path / "rng.pt", weights_only=True),
            "state": json.loads((path / "state.json").read_text()),
        }
    except (OSError, ValueError, RuntimeError) as err:
        raise KeepmixError(f"{path}: checkpoint is damaged ({err})") from None
