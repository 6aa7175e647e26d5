"""One forward pass over packed rows: loss, per-token losses and top-1 correctness.

Contract: `LossModel` wraps a causal LM so that a single module call returns (loss, token_loss,
token_correct) for a micro-batch of packed rows; distributed wrappers (DDP/FSDP) wrap this module, so
gradient synchronisation sees every parameter it uses. The LM head and cross-entropy go through the
fused chunked path (no full-vocabulary logits) unless `loss_impl="full"`. `token_weights` carries the
loss normalisation: the scalar loss is sum(token_weights * CE). With a `FrozenBase` and `kl_mask`, the
same pass also computes KL(p_base ‖ p_model) at the masked positions and adds sum(kl_weights * KL); the
base forward runs only on the rows that hold a masked position, and the call returns a fourth output,
the per-token KL.
`FrozenBase` is the base model's distribution: a frozen copy of the starting weights, or — for a LoRA
model — the model itself with its adapter disabled (no second copy in memory). Its hidden states are a
fixed function of the rows, and evals score the same held-out rows every time: `hidden(..., remember=True)`
(what an eval's pass asks for) keeps them, keyed by the rows' token and position ids, up to
`REMEMBER_BYTES`, so from the second eval on the base costs only its head (the KL needs the base's whole
distribution, which is the head's product). With a `store` folder they are also kept on disk
(keepmix.training.base_store), so the other runs of the same base — a demo's or a sweep's arms, a merge —
read them instead of running the base. Training rows are not kept. While the model still *is* its
base (`LossModel.base_is_self`: the step-0 eval of a run that starts from the base's weights), the KL is
0 by definition: the pass skips the base and the KL arithmetic, returns a KL of 0, and keeps the model's
own hidden states as the base's for the evals after it.
`RowStats` turns the detached per-token outputs into per-source sums and per-segment losses — the
training metrics and the exposure log — without another forward pass.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from keepmix.data.packing import Rows
from keepmix.model import adapter_disabled, is_adapted, trunk_and_head
from keepmix.training.base_store import BaseHiddenStore, rows_key
from keepmix.training.losses import BaseLogits, full_linear_cross_entropy, fused_linear_cross_entropy


REMEMBER_BYTES = 1 << 30  # base hidden states an eval may keep (SmolLM2, 3 x 3,072 held-out tokens: 21 MB)


class FrozenBase:
    """Final hidden states and head of the model as it was before training (never trained, never saved)."""

    def __init__(self, model: nn.Module, *, as_is: bool = False, store: str | Path | None = None):
        """`as_is`: `model` is itself the base (a separately loaded one), used frozen without a copy.
        `store`: a folder where the remembered hidden states are also kept for other runs (BaseHiddenStore)."""
        self._model = model
        # LoRA: the base is the same model with the adapter off; otherwise a frozen copy made now,
        # before the first update (and, on resume, before the checkpoint's weights are loaded)
        if as_is:
            self.copy = model.requires_grad_(False).eval()
        else:
            self.copy = None if is_adapted(model) else copy.deepcopy(model).requires_grad_(False).eval()
        self.trunk, self.head = trunk_and_head(self.copy if self.copy is not None else model)
        self._remembered: dict[tuple, torch.Tensor] = {}
        self._remembered_bytes = 0
        self.store = None if store is None else BaseHiddenStore(store, self.trunk, frozen_only=self.copy is None)

    def to(self, device) -> FrozenBase:
        if self.copy is not None:
            self.copy.to(device)
        return self

    @torch.no_grad()
    def hidden(self, input_ids, position_ids, remember: bool = False) -> torch.Tensor:
        """The base's final hidden states of the rows; `remember`: keep them for the same rows next time."""
        key = rows_key(input_ids, position_ids) if remember else None
        if key is not None and key in self._remembered:
            return self._remembered[key]
        if key is not None and self.store is not None:
            stored = self.store.load(key, input_ids.device)
            if stored is not None:
                self._keep(key, stored)
                return stored
        if self.copy is not None:
            out = self.trunk(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        else:
            with adapter_disabled(self._model):
                out = self.trunk(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        if key is not None and self._keep(key, out) and self.store is not None:
            self.store.save(key, out)
        return out

    def remember(self, input_ids, position_ids, hidden: torch.Tensor) -> None:
        """Keep `hidden` as the base's hidden states of these rows (the model is still the base)."""
        key = rows_key(input_ids, position_ids)
        if self._keep(key, hidden.detach()) and self.store is not None:
            self.store.save(key, hidden)

    def _keep(self, key: tuple, hidden: torch.Tensor) -> bool:
        """Remember `hidden` under `key` if the budget allows; whether it is remembered now."""
        size = hidden.numel() * hidden.element_size()
        if key not in self._remembered and self._remembered_bytes + size <= REMEMBER_BYTES:
            self._remembered[key] = hidden
            self._remembered_bytes += size
        return key in self._remembered


class LossModel(nn.Module):
    def __init__(self, model: nn.Module, loss_impl: str = "fused", base: FrozenBase | None = None):
        super().__init__()
        self.model = model
        self.loss_impl = loss_impl
        # a plain tuple, not submodules: they are already inside `model`, and registering them again
        # would put every weight twice into a state dict (a sharded checkpoint saved them twice);
        # the frozen base is no submodule either: nothing of it is trained, synchronised or saved
        self._parts = trunk_and_head(model)
        self._base = (base,)
        self.base_is_self = False  # set for the step-0 eval of a run whose weights are still the base's

    @property
    def trunk(self) -> nn.Module:
        return self._parts[0]

    @property
    def head(self) -> nn.Module:
        return self._parts[1]

    @property
    def base(self) -> FrozenBase | None:
        return self._base[0]

    def forward(self, input_ids, position_ids, labels, token_weights, kl_weights=None, kl_mask=None):
        # use_cache=False matters: with a cache, transformers ignores the document boundaries that the
        # position_ids mark and lets packed documents attend to each other.
        hidden = self.trunk(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        fn = fused_linear_cross_entropy if self.loss_impl == "fused" else full_linear_cross_entropy
        # about 64M float32 logits (256 MB) per chunk, whatever the vocabulary
        chunk = min(max(2**26 // self.head.weight.shape[0], 128), 8192)
        flat = hidden.reshape(-1, hidden.shape[-1])
        base = None
        if kl_mask is not None:
            if self.base is None:
                raise ValueError("LossModel: a KL mask was given but the model has no FrozenBase")
            if self.base_is_self and not self.training:
                rows = kl_mask.reshape(input_ids.shape).any(dim=1).nonzero().squeeze(1)
                if rows.numel():
                    self.base.remember(input_ids[rows], position_ids[rows], hidden[rows])
                out = fn(flat, self.head.weight, labels.reshape(-1), token_weights.reshape(-1), bias=self.head.bias,
                         chunk_size=chunk)
                return (*out, torch.zeros_like(out[1]))  # KL(p ‖ p) = 0
            base = self._base_logits(input_ids, position_ids, flat, kl_weights, kl_mask)
        return fn(flat, self.head.weight, labels.reshape(-1), token_weights.reshape(-1), bias=self.head.bias,
                  chunk_size=chunk, base=base)

    def _base_logits(self, input_ids, position_ids, flat, kl_weights, kl_mask) -> BaseLogits:
        """The base's hidden states, computed only for the rows that hold a KL position."""
        b, t = input_ids.shape
        rows = kl_mask.reshape(b, t).any(dim=1).nonzero().squeeze(1)
        base_hidden = flat.new_zeros(b, t, self.base.head.weight.shape[1])
        if rows.numel():
            # an eval (the loss model in eval mode) scores the same held-out rows every time
            base_hidden[rows] = self.base.hidden(input_ids[rows], position_ids[rows],
                                                 remember=not self.training).to(base_hidden.dtype)
        return BaseLogits(base_hidden.reshape(b * t, -1), self.base.head.weight, self.base.head.bias,
                          kl_weights.reshape(-1).detach(), kl_mask.reshape(-1))


class RowStats:
    """Per-source and per-segment sums of one step's detached per-token results."""

    FIELDS = ("loss", "correct", "tokens", "rows", "kl", "kl_tokens")

    def __init__(self, n_sources: int):
        for name in self.FIELDS:
            setattr(self, name, torch.zeros(n_sources, dtype=torch.float64))
        self.segment_loss: list[torch.Tensor] = []
        self.segment_tokens: list[torch.Tensor] = []

    def add(self, rows: Rows, token_loss: torch.Tensor, token_correct: torch.Tensor,
            token_kl: torch.Tensor | None = None, kl_mask: torch.Tensor | None = None) -> None:
        valid = (rows.labels.reshape(-1) != -100).to(torch.float64)
        tl = token_loss.detach().reshape(-1).to(torch.float64).cpu() * valid
        tc = token_correct.detach().reshape(-1).to(torch.float64).cpu() * valid
        row_source = rows.sources.repeat_interleave(rows.input_ids.shape[1])
        self.loss.index_add_(0, row_source, tl)
        self.correct.index_add_(0, row_source, tc)
        self.tokens.index_add_(0, row_source, valid)
        self.rows.index_add_(0, rows.sources, torch.ones(len(rows.sources), dtype=torch.float64))
        if token_kl is not None:
            at = kl_mask.reshape(-1).to(torch.float64).cpu() * valid
            self.kl.index_add_(0, row_source, token_kl.detach().reshape(-1).to(torch.float64).cpu() * at)
            self.kl_tokens.index_add_(0, row_source, at)
        seg = rows.segment_ids.reshape(-1)
        keep = seg >= 0
        n_seg = len(rows.segments)
        self.segment_loss.append(torch.zeros(n_seg, dtype=torch.float64).index_add_(0, seg[keep], tl[keep]))
        self.segment_tokens.append(torch.zeros(n_seg, dtype=torch.float64).index_add_(0, seg[keep], valid[keep]))

    def vector(self) -> torch.Tensor:
        """Everything that is summed across processes, in one tensor."""
        return torch.cat([getattr(self, name) for name in self.FIELDS])

    @classmethod
    def split(cls, vector: torch.Tensor, n_sources: int) -> dict[str, torch.Tensor]:
        return dict(zip(cls.FIELDS, vector.reshape(len(cls.FIELDS), n_sources)))


def run_rows(loss_model: nn.Module, rows: Rows, token_weights: torch.Tensor, device,
             kl_weights: torch.Tensor | None = None, kl_mask: torch.Tensor | None = None) -> tuple:
    """(loss, token_loss, token_correct, token_kl or None) of one micro-batch."""
    args = [rows.input_ids.to(device), rows.position_ids.to(device), rows.labels.to(device), token_weights.to(device)]
    if kl_mask is None:
        return (*loss_model(*args), None)
    return loss_model(*args, kl_weights.to(device), kl_mask.to(device))
