"""`train.compile`: torch.compile for the training steps — the repeated decoder block once, or the model.

Contract: `compile_for_training(loss_model, model, how, cache_dir)` returns the module to train with:
  "blocks"  every block of the model's largest list of identical layers (`repeated_blocks`: a decoder's
            30 LlamaDecoderLayers) is compiled in place (`nn.Module.compile`); the layers share their code,
            and dynamo treats their weights as inputs, so the first layer's graph serves all of them —
            one compile whatever the depth (measured in docs/PERFORMANCE.md), the state dict unchanged;
            a model without such a list is compiled whole, with a message saying so;
  "model"   the whole loss model, `torch.compile(loss_model)` (one graph of every layer: its compile time
            grows with depth).
Compiled artefacts (inductor's FX-graph and AOT-autograd caches) go under `<cache_dir>/inductor`
unless TORCHINDUCTOR_CACHE_DIR is set, so a second run of the same model and shapes compiles from cache.
`eager_while(compiled)` is the context evals run in: evaluation, task generation and the guard's probe
run the layers eagerly (`torch.compiler.set_stance("force_eager")`), since their shapes change from call
to call (a KV cache growing a token at a time) and each new shape would be another compile.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's largest nn.ModuleList of two or more modules of one class (a decoder's layers)."""
    best = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


def compile_for_training(loss_model: nn.Module, model: nn.Module, how: str, cache_dir: Path | None,
                         log=print) -> nn.Module:
    if cache_dir is not None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) / "inductor")
    if how == "blocks":
        blocks = repeated_blocks(model)
        if blocks is not None:
            for block in blocks:
                block.compile(dynamic=False)
            return loss_model
        log("train.compile: blocks: the model has no list of repeated layers; compiling it whole")
    return torch.compile(loss_model)


def eager_while(compiled: bool):
    """A context in which compiled modules run eagerly (evals: shapes that change from call to call)."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()
