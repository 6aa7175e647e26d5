"""The frozen base's held-out hidden states on disk, shared by every run that evaluates the same base.

Contract: `BaseHiddenStore(folder, trunk)` loads or saves the final hidden states of a batch of rows (named
by `rows_key`) under a key that names everything they are a function of: the base's weights (a digest of every parameter and
buffer the trunk uses, its names, shapes and dtypes, taken once on first use), its class and attention
implementation (a LoRA model's base, the adapter off, digests as the plain model: its frozen weights under
the plain names), the device kind, the number of CPU threads (a matmul's summation order depends on it),
whether autocast is on for that device and in which dtype (a bf16 run's base is another computation than
a float32 run's), torch's version, and the rows' token and position ids. So a file is only ever read by a computation that
would have produced the same bits: the arms of a demo, a sweep or a merge evaluate their base once between
them, each in its own process. Files are written to a temporary name and renamed, so a reader sees whole
files only; a file that cannot be read all the same is a miss (removed, then written again), and a folder
that cannot be written is no error: the next run computes the base again.
The folder is a cache: deleting it costs one base pass per held-out set.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file, save_file
from torch import nn

from keepmix.model import plain_name


class BaseHiddenStore:
    def __init__(self, folder: str | Path, trunk: nn.Module, frozen_only: bool = False):
        """`frozen_only`: digest only the parameters that do not train (a LoRA model's base weights)."""
        self.folder = Path(folder)
        self._trunk = trunk
        self._frozen_only = frozen_only
        self._weights: str | None = None
        self.hits = self.writes = 0

    def load(self, rows: tuple, device: torch.device) -> torch.Tensor | None:
        """The hidden states saved for `rows` (a `rows_key`) by a base like this one on a device like `device`."""
        path = self._path(rows, device)
        if not path.exists():
            return None
        try:
            hidden = load_file(str(path), device=str(device))["hidden"]
        except Exception:  # noqa: BLE001 — an unreadable file (a damaged disk) is recomputed and replaced
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return hidden

    def save(self, rows: tuple, hidden: torch.Tensor) -> None:
        path = self._path(rows, hidden.device)
        if path.exists():
            return
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
            os.close(handle)
            save_file({"hidden": hidden.detach().contiguous().cpu()}, tmp)
            os.replace(tmp, path)
            self.writes += 1
        except OSError:  # a read-only or full cache folder: the next run computes the base again
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _path(self, rows: tuple, device: torch.device) -> Path:
        digest = xxhash.xxh3_128(self.weights_digest().encode())
        digest.update(repr((_environment(device), rows)).encode())
        return self.folder / f"{digest.hexdigest()}.safetensors"

    def weights_digest(self) -> str:
        if self._weights is None:
            digest = xxhash.xxh3_128()
            config = getattr(self._trunk, "config", None)
            digest.update(repr((type(self._trunk).__name__, getattr(config, "_attn_implementation", None))).encode())
            tensors = [*self._trunk.named_parameters(), *self._trunk.named_buffers()]
            for name, tensor in tensors:
                if self._frozen_only and tensor.requires_grad:
                    continue
                # a LoRA model with its adapter off computes its base model's function to the bit: named as
                # the plain model is (PEFT moves each wrapped weight under `base_layer`), they share files
                digest.update(repr((plain_name(name), tuple(tensor.shape), str(tensor.dtype))).encode())
                digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())  # no copy on a CPU
            self._weights = digest.hexdigest()
        return self._weights


def rows_key(input_ids: torch.Tensor, position_ids: torch.Tensor) -> tuple:
    """What names a batch of rows: its shape and a digest of its token and position ids."""
    digest = xxhash.xxh3_128(input_ids.cpu().numpy().tobytes())
    digest.update(position_ids.cpu().numpy().tobytes())
    return tuple(input_ids.shape), digest.hexdigest()


def _environment(device: torch.device) -> tuple:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{device.type} x{torch.get_num_threads()}"
    # the autocast state where the base runs (or its states are kept): bf16 products give other bits
    autocast = str(torch.get_autocast_dtype(device.type)) if torch.is_autocast_enabled(device.type) else None
    return where, autocast, torch.__version__
