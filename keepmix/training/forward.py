"""One forward pass over packed rows: loss, per-token losses and top-1 correctness.

Contract: `LossModel` wraps a causal LM so that a single module call returns (loss, token_loss,
token_correct) for a micro-batch of packed rows; distributed wrappers (DDP/FSDP) wrap this module, so
gradient synchronisation sees every parameter it uses. The LM head and cross-entropy go through the
fused chunked path (no full-vocabulary logits) unless `loss_impl="full"`. `token_weights` carries the
loss normalisation: the scalar loss is sum(token_weights * CE).
`RowStats` turns the detached per-token outputs into per-source sums and per-segment losses — the
training metrics and the exposure log — without another forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from keepmix.data.packing import Rows
from keepmix.model import trunk_and_head
from keepmix.training.losses import full_linear_cross_entropy, fused_linear_cross_entropy


class LossModel(nn.Module):
    def __init__(self, model: nn.Module, loss_impl: str = "fused"):
        super().__init__()
        self.model = model
        self.loss_impl = loss_impl
        # a plain tuple, not submodules: they are already inside `model`, and registering them again
        # would put every weight twice into a state dict (a sharded checkpoint saved them twice)
        self._parts = trunk_and_head(model)

    @property
    def trunk(self) -> nn.Module:
        return self._parts[0]

    @property
    def head(self) -> nn.Module:
        return self._parts[1]

    def forward(self, input_ids, position_ids, labels, token_weights):
        # use_cache=False matters: with a cache, transformers ignores the document boundaries that the
        # position_ids mark and lets packed documents attend to each other.
        hidden = self.trunk(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        fn = fused_linear_cross_entropy if self.loss_impl == "fused" else full_linear_cross_entropy
        # about 64M float32 logits (256 MB) per chunk, whatever the vocabulary
        chunk = min(max(2**26 // self.head.weight.shape[0], 128), 8192)
        return fn(hidden.reshape(-1, hidden.shape[-1]), self.head.weight, labels.reshape(-1),
                  token_weights.reshape(-1), bias=self.head.bias, chunk_size=chunk)


class RowStats:
    """Per-source and per-segment sums of one step's detached per-token results."""

    def __init__(self, n_sources: int):
        self.loss = torch.zeros(n_sources, dtype=torch.float64)
        self.correct = torch.zeros(n_sources, dtype=torch.float64)
        self.tokens = torch.zeros(n_sources, dtype=torch.float64)
        self.rows = torch.zeros(n_sources, dtype=torch.float64)
        self.segment_loss: list[torch.Tensor] = []
        self.segment_tokens: list[torch.Tensor] = []

    def add(self, rows: Rows, token_loss: torch.Tensor, token_correct: torch.Tensor) -> None:
        valid = (rows.labels.reshape(-1) != -100).to(torch.float64)
        tl = token_loss.detach().reshape(-1).to(torch.float64).cpu() * valid
        tc = token_correct.detach().reshape(-1).to(torch.float64).cpu() * valid
        row_source = rows.sources.repeat_interleave(rows.input_ids.shape[1])
        self.loss.index_add_(0, row_source, tl)
        self.correct.index_add_(0, row_source, tc)
        self.tokens.index_add_(0, row_source, valid)
        self.rows.index_add_(0, rows.sources, torch.ones(len(rows.sources), dtype=torch.float64))
        seg = rows.segment_ids.reshape(-1)
        keep = seg >= 0
        n_seg = len(rows.segments)
        self.segment_loss.append(torch.zeros(n_seg, dtype=torch.float64).index_add_(0, seg[keep], tl[keep]))
        self.segment_tokens.append(torch.zeros(n_seg, dtype=torch.float64).index_add_(0, seg[keep], valid[keep]))

    def vector(self) -> torch.Tensor:
        """Everything that is summed across processes, in one tensor."""
        return torch.cat([self.loss, self.correct, self.tokens, self.rows])

    @staticmethod
    def split(vector: torch.Tensor, n_sources: int) -> dict[str, torch.Tensor]:
        parts = vector.reshape(4, n_sources)
        return {"loss": parts[0], "correct": parts[1], "tokens": parts[2], "rows": parts[3]}


def run_rows(loss_model: nn.Module, rows: Rows, token_weights: torch.Tensor, device) -> tuple:
    return loss_model(
        rows.input_ids.to(device), rows.position_ids.to(device), rows.labels.to(device), token_weights.to(device)
    )
