"""Held-out LM metrics: a sharded model needs every process in every forward call (lockstep)."""

from __future__ import annotations

import torch

from keepmix.data import tokenize as tk
from keepmix.data.packing import eval_plans
from keepmix.eval.lm import validation_metrics
from keepmix.training.forward import LossModel
from tests.conftest import TINY_LLAMA, prose_docs


def test_lockstep_validation_calls_the_model_equally_often_on_every_process(tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(tokenizer), **arch))
    loss_model = LossModel(model)
    calls = []
    loss_model.register_forward_hook(lambda *_: calls.append(1))
    docs = tk.tokenize_docs(prose_docs(6), tokenizer, fmt="text", loss_on="all")
    # a row count that two processes cannot split evenly
    seq_len = next(s for s in range(24, 128, 8) if len(eval_plans(docs, s, 0)) % 2 == 1)
    rows = len(eval_plans(docs, seq_len, 0))
    counts = {}
    for rank in (0, 1):
        results = {}
        for lockstep in (False, True):
            calls.clear()
            results[lockstep] = validation_metrics(loss_model, [("prose", docs)], seq_len=seq_len, batch_size=1,
                                                   pad_id=tokenizer.pad_token_id, device="cpu", rank=rank,
                                                   world_size=2, lockstep=lockstep)
            counts[rank, lockstep] = len(calls)
        assert results[True] == results[False]  # the filler call adds nothing to the sums
    assert counts[0, False] == rows // 2 + 1 and counts[1, False] == rows // 2
    assert counts[0, True] == counts[1, True] == rows // 2 + 1
