"""Fully sharded data parallel (torch FSDP2): weights, gradients and optimizer state split across processes.

Contract: with `train.fsdp: true` and several processes, `shard` applies torch's `fully_shard` to every
transformer block (the classes a transformers model lists in `_no_split_modules`) and then to the
LossModel itself, so between uses each process holds 1/N of every parameter and of its optimizer state,
and gathers one block's weights only for that block's forward and backward. The same code runs on CPU
(gloo; the tests) and on GPUs (NCCL). Sharded checkpoints go through torch.distributed.checkpoint: every
process writes its own shards, in parallel; `full_state_dict` gathers the weights onto the main process
for `final/`. Every collective here must be called by all processes in the same order.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from keepmix.errors import KeepmixError
from keepmix.model import base_model


def block_classes(model: nn.Module) -> set[str]:
    """Names of the classes that form one shard unit: transformers' `_no_split_modules` (its decoder layer)."""
    names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    if not names:
        raise KeepmixError(f"{type(base_model(model)).__name__} does not name its transformer block "
                           f"(_no_split_modules); train.fsdp cannot shard it — train without train.fsdp")
    return names


def shard(loss_model: nn.Module, model: nn.Module, *, bf16: bool) -> nn.Module:
    """Shard the blocks of `model` (inside `loss_model`) and then the rest (embeddings, norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16: weights are gathered and computed in bf16, gradients reduced in fp32, fp32 master weights kept
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    classes = block_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in classes]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    # the root owns what is left; its forward gathers those weights once for the whole step
    fully_shard(loss_model, mp_policy=policy)
    return loss_model


@contextlib.contextmanager
def no_gradient_sync(loss_model: nn.Module):
    """Backward passes inside keep their gradients local (no reduce-scatter), as DDP's no_sync."""
    loss_model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        loss_model.set_requires_gradient_sync(True)


@contextlib.contextmanager
def gathered_root(loss_model: nn.Module):
    """The root's weights (embeddings, final norm, head) gathered, so the wrapped transformers model can
    be called directly (generation in task evals); the blocks gather their own on each call."""
    loss_model.unshard()
    try:
        yield
    finally:
        loss_model.reshard()


def total_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP returns a distributed one)."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper → the torch optimizer


def save_sharded(folder: Path, loss_model: nn.Module, optimizer) -> None:
    """Every process writes its shards of the weights and optimizer state into `folder` (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(loss_model, _inner(optimizer))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))


def load_sharded(folder: Path, loss_model: nn.Module, optimizer) -> None:
    """Restore what `save_sharded` wrote, each process reading its own shards (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    inner = _inner(optimizer)
    model_sd, optim_sd = get_state_dict(loss_model, inner)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as err:  # DCP raises several kinds (CheckpointException, RuntimeError, KeyError)
        raise KeepmixError(f"{folder}: sharded checkpoint could not be read ({type(err).__name__}: {err})") from None
    set_state_dict(loss_model, inner, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All of `model`'s weights, whole, on the CPU of the main process (others get {}; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
