"""Held-out language-model metrics per source: loss, perplexity, top-1 next-token accuracy.

Contract: every held-out document of a source is packed once, in order (`eval_plans`), and scored with
the same fused head + loss as training, `batch_size` rows at a time under no_grad — memory is bounded by
one batch, never full-vocabulary logits for a split. With several processes each takes a strided share
of the rows and the sums are added up (`reduce`), so the numbers do not depend on the process count
beyond float summation order. With `kl_to_base` (the loss model holds a `FrozenBase`) the same pass also
gives `valid/<source>/kl_to_base`: KL(p_base ‖ p_model) per held-out target token, in nats — how far the
model's next-token distribution has drifted from the base model's on that source (0 at the baseline).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from keepmix.data.packing import build_rows, eval_plans
from keepmix.data.tokenize import TokenDocs
from keepmix.training.forward import run_rows


@torch.no_grad()
def validation_metrics(
    loss_model,
    valid: list[tuple[str, TokenDocs]],
    *,
    seq_len: int,
    batch_size: int,
    pad_id: int,
    device,
    max_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    lockstep: bool = False,
    kl_to_base: bool = False,
) -> dict[str, float]:
    """`lockstep`: every process makes the same number of forward calls (a sharded model needs all of
    them in each), the ones with fewer rows scoring a filler batch that is not counted."""
    was_training = loss_model.training
    loss_model.eval()
    out = {}
    for index, (name, docs) in enumerate(valid):
        if len(docs) == 0:
            continue
        every = eval_plans(docs, seq_len, index, max_tokens)
        plans = every[rank::world_size]
        sources = [docs if j == index else None for j in range(len(valid))]
        most = math.ceil(len(every) / world_size) if lockstep else len(plans)  # rows of the busiest process
        sums = torch.zeros(4, dtype=torch.float64)  # loss, correct, tokens, KL
        for i in range(0, most, batch_size):
            chunk = plans[i : i + batch_size]
            rows = build_rows(chunk or every[:1], sources, seq_len, pad_id)
            mask = rows.labels.reshape(-1) != -100
            zeros = torch.zeros(rows.labels.numel())
            _, token_loss, token_correct, token_kl = run_rows(loss_model, rows, zeros, device,
                                                              *((zeros, mask) if kl_to_base else ()))
            if not chunk:  # lockstep filler: kept this process in the collective, adds nothing
                continue
            sums += torch.stack([
                token_loss.cpu().double()[mask].sum(), token_correct.cpu().double()[mask].sum(), mask.sum().double(),
                token_kl.cpu().double()[mask].sum() if token_kl is not None else torch.zeros((), dtype=torch.float64),
            ])
        loss, correct, tokens, kl = reduce(sums.to(device)).cpu().tolist()
        if tokens == 0:
            continue
        mean = loss / tokens
        out[f"valid/{name}/loss"] = mean
        out[f"valid/{name}/ppl"] = math.exp(min(mean, 50.0))
        out[f"valid/{name}/token_acc"] = correct / tokens
        if kl_to_base:
            out[f"valid/{name}/kl_to_base"] = kl / tokens
    if was_training:
        loss_model.train()
    return out
