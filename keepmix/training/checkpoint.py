"""Atomic checkpoints: a folder counts only once it is complete.

Contract: `save_checkpoint` writes everything a resume needs into a staging folder
(`checkpoints/.staging-step-N`), writes a COMPLETE marker last, then publishes it by renaming to
`checkpoints/step-N` and prunes older complete ones down to `keep`. A crash at any point leaves the
previous complete checkpoint usable; `latest_checkpoint` ignores anything without the marker.
Contents: trainable weights (safetensors), optimizer and LR-scheduler state (torch.save, loaded with
weights_only=True), RNG states, and a JSON `state.json` (counters, sampler, anything JSON-able). Under
FSDP the weights and optimizer state are instead in `sharded/` (torch.distributed.checkpoint), which every
process writes into the staging folder before the main process publishes it (`staging_dir` first).

Verification: `manifest.json` (written after every other file, before the marker) lists each file with
its size and xxh3-64 checksum. `verify_checkpoint` re-reads every file against it and names the first
file that is missing, short, long or altered; `read_checkpoint` verifies and then loads everything, so a
resume either holds the whole checkpoint in memory or has changed nothing. `intact_checkpoint` walks
the complete checkpoints from the newest down and returns the first that reads back whole, with the
problems of the newer ones it passed over.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
import yaml
from safetensors.torch import load_file, save_file

from keepmix.errors import KeepmixError

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
SHARDED = "sharded"  # torch.distributed.checkpoint folder: one file per process + .metadata
_CHUNK = 1 << 22  # hash in 4 MiB reads: flat memory whatever the checkpoint's size


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
    write_manifest(staging)
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


def _file_hash(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict:
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name not in (MARKER, MANIFEST))
    return {"version": 1, "hash": "xxh3_64",
            "files": {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "xxh3_64": _file_hash(f)}
                      for f in files}}


def write_manifest(folder: Path) -> None:
    """manifest.json over every file of the folder but the marker (call it after the last of them)."""
    (folder / MANIFEST).write_text(json.dumps(_manifest(folder), indent=1))


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the manifest is there with its size and checksum; else what is wrong."""
    if not (path / MARKER).exists():
        return f"no {MARKER} marker"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        entries = [(name, int(e["size"]), str(e["xxh3_64"])) for name, e in files.items()]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {err})"
    for name, size, checksum in entries:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size} (truncated or overwritten)"
        if _file_hash(f) != checksum:
            return f"{name} does not match its checksum (its bytes were altered)"
    return None


@dataclass
class Found:
    """The checkpoint a resume uses (loaded whole), and the newer ones it passed over, with why."""

    path: Path | None
    loaded: dict | None
    damaged: list[tuple[Path, str]] = field(default_factory=list)


def read_checkpoint(path: Path) -> dict:
    """Verify the manifest, then load everything; KeepmixError naming the file when it is damaged."""
    problem = verify_checkpoint(path)
    if problem is not None:
        raise KeepmixError(f"{path}: checkpoint is damaged: {problem}")
    return load_checkpoint(path)


def intact_checkpoint(root: Path) -> Found:
    """The newest complete checkpoint that verifies and loads, and the damaged newer ones."""
    damaged = []
    for path in reversed(complete_checkpoints(root)):
        try:
            return Found(path, read_checkpoint(path), damaged)
        except KeepmixError as err:
            damaged.append((path, str(err).removeprefix(f"{path}: checkpoint is damaged: ")))
    return Found(None, None, damaged)


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
            "config": yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").exists() else None,
        }
    except (OSError, ValueError, RuntimeError, yaml.YAMLError, pickle.UnpicklingError) as err:
        raise KeepmixError(f"{path}: checkpoint is damaged ({err})") from None
