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


def test_the_base_runs_once_for_the_held_out_kl_of_every_eval(tokenizer):
    """The base's hidden states of the held-out rows are kept: the second eval runs only the model, and
    its KL to base is the same number as computing the base again; training rows are never kept."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    from keepmix.data.packing import build_rows
    from keepmix.training.forward import FrozenBase, run_rows

    torch.manual_seed(0)
    arch = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=len(tokenizer), **arch))
    base = FrozenBase(model)
    with torch.no_grad():  # the model drifts from its base, so the KL is not 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    docs = tk.tokenize_docs(prose_docs(6), tokenizer, fmt="text", loss_on="all")
    base_calls = []
    base.trunk.register_forward_hook(lambda *_: base_calls.append(1))

    def evaluate(base_model):
        return validation_metrics(LossModel(model, base=base_model), [("prose", docs)], seq_len=32, batch_size=2,
                                  pad_id=tokenizer.pad_token_id, device="cpu", kl_to_base=True)

    first = evaluate(base)
    n_batches = len(base_calls)
    assert n_batches >= 2 and first["valid/prose/kl_to_base"] > 0.01
    second = evaluate(base)
    assert len(base_calls) == n_batches  # every base hidden state came from the first eval
    assert second == first
    fresh = FrozenBase(copy.deepcopy(base.copy), as_is=True)  # the same base, nothing kept
    assert evaluate(fresh) == first

    # a training pass (loss model in train mode) computes the base every time and keeps nothing
    trainee = FrozenBase(copy.deepcopy(base.copy), as_is=True)
    calls = []
    trainee.trunk.register_forward_hook(lambda *_: calls.append(1))
    rows = build_rows(eval_plans(docs, 32, 0)[:2], [docs], 32, tokenizer.pad_token_id)
    loss_model = LossModel(model, base=trainee).train()
    mask = rows.labels.reshape(-1) != -100
    zeros = torch.zeros(rows.labels.numel())
    with torch.no_grad():
        for _ in range(2):
            run_rows(loss_model, rows, zeros, "cpu", zeros, mask)
    assert len(calls) == 2 and trainee._remembered == {}
