"""Documents → fixed-length rows.

Contract: a `DocStream` walks one source's training documents pass by pass, each pass in an order
derived from (seed, source index, pass) alone, so its whole state is three integers (epoch, cursor,
offset) and resuming never replays data. `take_row` fills one row of `seq_len` tokens from that single
source: documents back to back (each already ends with EOS), long documents split across rows, or — with
split_docs=False — a document that does not fit starts the next row and the rest is padding.
`build_rows` turns the planned rows into tensors: labels are -100 wherever the target token is not a
loss target, at the last token of every segment (its successor belongs to another document), and on
padding; `position_ids` restart at 0 for every segment, which transformers reads as packed sequences
(no attention across documents).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from keepmix.data.tokenize import TokenDocs
from keepmix.errors import KeepmixError


@dataclass(frozen=True)
class Segment:
    doc_id: int  # index among the source's training documents
    view: int  # 1 = this document's first pass
    start: int  # first token of the document in this segment
    length: int


@dataclass
class RowPlan:
    source: int
    segments: list[Segment]


class DocStream:
    """One source's documents, pass after pass, each pass in a seeded order."""

    def __init__(self, lengths: np.ndarray, *, seed: int, source_index: int, quality: np.ndarray | None = None):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.seed, self.source_index, self.quality = seed, source_index, quality
        self.epoch, self.cursor, self.offset = 0, 0, 0
        self._perm_epoch, self._perm = -1, None

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, self.source_index, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.lengths)), epoch
        return self._perm

    def take_row(self, seq_len: int, *, split_docs: bool = True, min_quality: float | None = None):
        """Segments filling one row, and the pass numbers that began while filling it."""
        if min_quality is not None and self.quality is not None and not (self.quality >= min_quality).any():
            raise KeepmixError(
                f"no document of source #{self.source_index} reaches quality {min_quality}; lower mixture.quality"
            )
        segments, new_passes, space = [], [], seq_len
        while space > 0:
            if self.cursor == len(self.lengths):
                self.epoch, self.cursor, self.offset = self.epoch + 1, 0, 0
                new_passes.append(self.epoch + 1)
            doc = int(self.order(self.epoch)[self.cursor])
            if self.offset == 0 and min_quality is not None and self.quality is not None and self.quality[doc] < min_quality:
                self.cursor += 1
                continue
            remaining = int(self.lengths[doc]) - self.offset
            if not split_docs and self.offset == 0 and remaining > space and segments:
                break  # starts the next row; the rest of this one is padding
            take = min(remaining, space)
            segments.append(Segment(doc, self.epoch + 1, self.offset, take))
            space -= take
            if take == remaining:
                self.cursor, self.offset = self.cursor + 1, 0
            else:
                self.offset += take
        return segments, new_passes

    @property
    def passes_done(self) -> float:
        return self.epoch + self.cursor / max(len(self.lengths), 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self.offset = int(state["epoch"]), int(state["cursor"]), int(state["offset"])


@dataclass
class Rows:
    """A batch of packed rows as tensors plus what each token belongs to."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, -100 = no loss
    position_ids: torch.Tensor  # (B, T) long
    segment_ids: torch.Tensor  # (B, T) long, index into `segments`, -1 on padding
    sources: torch.Tensor  # (B,) long, source index of each row
    segments: list[tuple[int, int, Segment]]  # (row in this batch, source index, segment), in order

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())


def build_rows(plans: list[RowPlan], docs: list[TokenDocs], seq_len: int, pad_id: int) -> Rows:
    n = len(plans)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), -100, dtype=np.int64)
    position_ids = np.zeros((n, seq_len), dtype=np.int64)
    segment_ids = np.full((n, seq_len), -1, dtype=np.int64)
    segments = []
    for r, plan in enumerate(plans):
        src = docs[plan.source]
        col = 0
        for seg in plan.segments:
            a = int(src.offsets[seg.doc_id]) + seg.start
            toks, mask = src.tokens[a : a + seg.length], src.loss_mask[a : a + seg.length]
            end = col + seg.length
            input_ids[r, col:end] = toks
            # target of position k is token k+1 of the same segment, when it is a loss target
            labels[r, col : end - 1] = np.where(mask[1:], toks[1:], -100)
            position_ids[r, col:end] = np.arange(seg.length)
            segment_ids[r, col:end] = len(segments)
            segments.append((r, plan.source, seg))
            col = end
        position_ids[r, col:] = np.arange(seq_len - col)  # padding is its own sequence
    return Rows(
        torch.from_numpy(input_ids),
        torch.from_numpy(labels),
        torch.from_numpy(position_ids),
        torch.from_numpy(segment_ids),
        torch.tensor([p.source for p in plans], dtype=torch.long),
        segments,
    )


def count_tokens(plans: list[RowPlan], docs: list[TokenDocs]) -> tuple[int, int]:
    """(real tokens, loss targets) of planned rows, without building them: what `build_rows` would give."""
    real = targets = 0
    for plan in plans:
        mask = docs[plan.source].loss_mask
        offsets = docs[plan.source].offsets
        for seg in plan.segments:
            a = int(offsets[seg.doc_id]) + seg.start
            real += seg.length
            targets += int(mask[a + 1 : a + seg.length].sum())  # a segment's first token is never a target
    return real, targets


def eval_plans(docs: TokenDocs, seq_len: int, source: int, max_tokens: int | None = None) -> list[RowPlan]:
    """Held-out documents packed in order, once, without splitting a document that fits in a row."""
    plans, current, space, used = [], [], seq_len, 0
    for d in range(len(docs)):
        length = int(docs.lengths[d])
        if max_tokens is not None and used >= max_tokens:
            break
        start = 0
        while start < length:
            if length - start > space and current and length - start <= seq_len:
                plans.append(RowPlan(source, current))
                current, space = [], seq_len
            take = min(length - start, space)
            current.append(Segment(d, 1, start, take))
            start, space, used = start + take, space - take, used + take
            if space == 0:
                plans.append(RowPlan(source, current))
                current, space = [], seq_len
    if current:
        plans.append(RowPlan(source, current))
    return plans
